"""The geometry report: CSV tables, ``geometry.md`` and plotly figures from :func:`mech.geometry.run.compute_geometry`.

Everything goes into a temporary directory that replaces ``out_dir`` only when complete (nothing half-written):

* ``<table>.csv`` for every table the computation returns (per-module / per-layer rows and their summaries);
* ``geometry.md``: the summaries as Markdown tables, each interval a 95 % t-interval over training seeds;
* ``figures/``: effective rank by module kind, overlaps against chance, write-space alignment against the random
  null, v_student·v_teacher cosines by layer, α sweeps and truncation curves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from mech.geometry.run import GeometryConfig, GeometryInputs, Progress, compute_geometry
from mech.report import figures as plots
from mech.store import atomic_dir, atomic_write_text


def _ci(r: dict | None, fmt: str = "+.3f") -> str:
    if r is None:
        return "–"
    s = format(r["mean"], fmt)
    return s + (f" [{format(r['lo'], fmt)}, {format(r['hi'], fmt)}]" if r["n"] > 1 else "")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows),
            ""]


NO_TEACHER = ("Not computed: steering vectors are read on teacher data, which a sweep's cache has and students "
              "given as directories do not (run `mech geometry SWEEP --students …`).")


def geometry_markdown(t: dict[str, list[dict]]) -> str:
    meta = t["meta"][0]
    students = meta["students"].split()
    paired = meta.get("paired", True)
    effects = (f"Trait effects are paired: the {meta['target']}-teacher student minus its neutral-teacher control."
               if paired else "Trait effects are vs the base: no neutral-teacher controls were given.")
    vectors = (f"steering vectors over the answer tokens of {meta['n_rows']} teacher rows" if t["directions"]
               else "no teacher data, so no steering vectors")
    lines = [f"# Geometry of the {meta['target']} students: {meta['students']}", "",
             f"Mean [95 % t-interval] over {meta['seeds']} training seeds. {effects} First-token metric on "
             f"{meta['n_questions']} questions in the {meta['eval_context']} context (base log P = "
             f"{meta['base_logp']:.3f}); {vectors}. Computed in {meta['seconds']} s.", ""]

    geo = {(r["student"], r["arm"], r["group"], r["value"]): r for r in t["geometry_summary"]}
    groups = list(dict.fromkeys(r["group"] for r in t["geometry_summary"]))
    lines += ["## 1. Update spectra (trait students; mean over layers)", "",
              "Effective rank (spectral entropy) of ΔW per module kind, with the stable rank in the second table.", ""]
    for value in ("effective_rank", "stable_rank", "effective_rank_frac"):
        lines += [f"**{value}**", ""]
        lines += _table(["student", *groups], [[s, *(_ci(geo.get((s, "trait", g, value)), ".2f" if "frac" not in value
                                                              else ".3f") for g in groups)] for s in students])

    lines += ["## 2. Subspace overlaps (top-k, mean over modules) vs the random expectation k/d", ""]
    if not t["overlap_summary"]:
        lines += ["Nothing to compare: one student and seed, and no neutral-teacher control.", ""]
    lines += _table(["comparison", "a", "b", "side", "overlap", "chance"],
                    [[r["comparison"], r["a"], r["b"], r["side"], _ci(r, ".3f"), f"{r['chance']:.3f}"]
                     for r in t["overlap_summary"]])

    lines += ["**Trait-specific part**: share of the trait student's ‖ΔW‖² outside its neutral control's top-k write "
              "space (mean over modules); a random k-space leaves 1 − k/d outside.", ""]
    lines += _table(["student", "outside", "random expectation"],
                    [[r["student"], _ci(r, ".3f"), f"{r['chance']:.3f}"] for r in t["trait_specific_summary"]])

    lines += [f"## 3. Truncation: {'paired ' if paired else ''}Δ log P with ΔW kept to (truncate) or stripped of "
              "(remove) its top k directions" + ("" if paired else " (vs the base)"), ""]
    ks = sorted({r["k"] for r in t["truncation_summary"]})
    tr = {(r["student"], r["mode"], r["k"]): r for r in t["truncation_summary"]}
    for mode in ("truncate", "remove"):
        lines += [f"**{mode}**", ""]
        lines += _table(["student", *(f"k={k}" for k in ks)],
                        [[s, *(_ci(tr.get((s, mode, k))) for k in ks)] for s in students])

    if not t["directions"]:  # no teacher data: of items 4 and 5, only the readout's write-space alignment
        lines += ["## 4. Steering vectors", "", NO_TEACHER, ""]
        lines += ["**Write-space alignment** of the readout direction (share of its energy in the module's write "
                  "space; LoRA: B's columns, full FT: top-k left singular vectors), mean over layers, against random "
                  "directions", ""]
        lines += _table(["student", "module", "direction", "captured", "chance k/d", "null 95th pct"],
                        [[r["student"], r["kind"], r["direction"], _ci(r, ".3f"), f"{r['chance']:.3f}",
                          f"{r['null_q95']:.3f}"] for r in t["alignment_summary"]])
        return "\n".join(lines + ["## 5. Steering tests", "", NO_TEACHER, ""])
    lines += ["## 4. Steering vectors: cosine with v_teacher per layer", "",
              "v_student = student − base; v_paired = trait student − neutral student (the trait-specific part).", ""]
    cos = {(r["student"], r["layer"], r["value"]): r for r in t["cosine_summary"]}
    layers = sorted({r["layer"] for r in t["cosine_summary"]})
    for value in ("cos_student_teacher", "cos_neutral_teacher", "cos_paired_teacher", "cos_paired_readout"):
        lines += [f"**{value}**", ""]
        lines += _table(["student", *(f"layer {l}" for l in layers)],
                        [[s, *(_ci(cos.get((s, l, value))) for l in layers)] for s in students])
    lines += _table(["layer", "‖v_teacher‖", "cos(v_teacher, readout)"],
                    [[str(r["layer"]), f"{r['v_teacher_norm']:.3f}", f"{r['cos_v_teacher_readout']:+.3f}"]
                     for r in t["directions"]])
    lines += ["**Write-space alignment** (share of the direction's energy in the module's write space; LoRA: B's "
              "columns, full FT: top-k left singular vectors), mean over layers, against random directions", ""]
    lines += _table(["student", "module", "direction", "captured", "chance k/d", "null 95th pct"],
                    [[r["student"], r["kind"], r["direction"], _ci(r, ".3f"), f"{r['chance']:.3f}",
                      f"{r['null_q95']:.3f}"] for r in t["alignment_summary"]])

    lines += ["## 5. Steering tests", "", "**Sufficiency**: Δ log P(target) of the base with α·v added after layer ℓ "
              "(every position).", ""]
    alphas = sorted({r["alpha"] for r in t["sufficiency_summary"]})
    suf = t["sufficiency_summary"]
    lines += _table(["vector", "student", "layer", *(f"α={a:g}" for a in alphas)],
                    [[v, s, str(l), *(_ci(next((r for r in suf if (r["vector"], r["student"], r["layer"], r["alpha"])
                                                 == (v, s, l, a)), None)) for a in alphas)]
                     for v, s, l in dict.fromkeys((r["vector"], r["student"], r["layer"]) for r in suf)])
    if t.get("sampled_summary"):
        lines += ["**Sampled trait rate** (share of sampled answers naming the target) of the base steered with α·v "
                  "after layer ℓ (α = 0: unsteered).", ""]
        lines += _table(["vector", "student", "layer", "α", "rate"],
                        [[r["vector"], r["student"], str(r["layer"]), f"{r['alpha']:g}", _ci(r, ".4f")]
                         for r in t["sampled_summary"]])
    lines += ["**Necessity**: the paired effect with v̂ projected out after layer ℓ in both students.", ""]
    nec = {(r["student"], r["vector"], r["layer"], r["value"]): r for r in t["necessity_summary"]}
    lines += _table(["student", "vector", "layer", "paired effect", "with v̂ projected out"],
                    [[s, v, str(l), _ci(nec.get((s, v, l, "effect"))), _ci(nec.get((s, v, l, "effect_projected")))]
                     for s, v, l in dict.fromkeys((k[0], k[1], k[2]) for k in nec)])
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- figures


def _err(rows: list[dict]) -> dict:
    return dict(type="data", symmetric=False, array=[r["hi"] - r["mean"] if r["n"] > 1 else 0 for r in rows],
                arrayminus=[r["mean"] - r["lo"] if r["n"] > 1 else 0 for r in rows])


def _layout(fig: go.Figure, title: str, x: str, y: str) -> go.Figure:
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y, template="plotly_white", font=dict(size=13),
                      legend=dict(orientation="h", y=-0.2))
    return fig


def geometry_figures(t: dict[str, list[dict]]) -> dict[str, go.Figure]:
    students = t["meta"][0]["students"].split()
    figs: dict[str, go.Figure] = {}
    geo = [r for r in t["geometry_summary"] if r["arm"] == "trait" and r["value"] == "effective_rank"]
    figs["spectra_effective_rank"] = _layout(go.Figure([
        go.Bar(name=s, x=[r["group"] for r in geo if r["student"] == s],
               y=[r["mean"] for r in geo if r["student"] == s], error_y=_err([r for r in geo if r["student"] == s]))
        for s in students]), "Effective rank of ΔW by module kind", "module kind", "effective rank (mean over layers)")
    ov = t["overlap_summary"]
    labels = [f"{r['comparison']}: {r['a']} vs {r['b']} ({r['side']})" for r in ov]
    if ov:  # else one unpaired student and seed: nothing to compare
        figs["overlaps"] = _layout(go.Figure([
            go.Bar(name="overlap", y=labels, x=[r["mean"] for r in ov], orientation="h",
                   error_x=dict(type="data", symmetric=False,
                                array=[r["hi"] - r["mean"] if r["n"] > 1 else 0 for r in ov],
                                arrayminus=[r["mean"] - r["lo"] if r["n"] > 1 else 0 for r in ov])),
            go.Scatter(name="chance k/d", y=labels, x=[r["chance"] for r in ov], mode="markers",
                       marker=dict(symbol="line-ns-open", size=14, color="black"))]),
            "Top-k subspace overlap vs chance", "overlap (mean squared principal cosine)", "")
        figs["overlaps"].update_layout(height=max(500, 18 * len(ov)))
    al = t["alignment_summary"]
    figs["alignment"] = _layout(go.Figure([
        go.Bar(name=d, x=[f"{r['student']} {r['kind']}" for r in al if r["direction"] == d],
               y=[r["mean"] for r in al if r["direction"] == d], error_y=_err([r for r in al if r["direction"] == d]))
        for d in dict.fromkeys(r["direction"] for r in al)] + [
        go.Scatter(name="random null, 95th pct", x=[f"{r['student']} {r['kind']}" for r in al if r["direction"] ==
                                                     al[0]["direction"]],
                   y=[r["null_q95"] for r in al if r["direction"] == al[0]["direction"]], mode="markers",
                   marker=dict(symbol="line-ew-open", size=18, color="black"))] if al else []),
        "Write-space alignment with trait directions", "student, module", "share of the direction captured")
    tr = t["truncation_summary"]
    figs["truncation"] = _layout(go.Figure([
        go.Scatter(name=f"{s} {m}", x=[r["k"] for r in tr if (r["student"], r["mode"]) == (s, m)],
                   y=[r["mean"] for r in tr if (r["student"], r["mode"]) == (s, m)],
                   error_y=_err([r for r in tr if (r["student"], r["mode"]) == (s, m)]), mode="lines+markers")
        for s in students for m in ("truncate", "remove")]), "Truncation curves", "k (top singular directions)",
        "paired Δ log P(target)" if t["meta"][0].get("paired", True) else "Δ log P(target) vs the base")
    figs["truncation"].update_xaxes(type="log")
    if not t["directions"]:  # no teacher data: no steering vectors, so no cosines or α sweeps
        return figs
    cs = [r for r in t["cosine_summary"] if r["value"] == "cos_paired_teacher"]
    figs["cosines"] = _layout(go.Figure([
        go.Scatter(name=s, x=[r["layer"] for r in cs if r["student"] == s], y=[r["mean"] for r in cs if r["student"] == s],
                   error_y=_err([r for r in cs if r["student"] == s]), mode="lines+markers") for s in students]),
        "cos(v_paired, v_teacher) by layer", "layer", "cosine")
    suf = [r for r in t["sufficiency_summary"] if r["student"] == "base" or r["vector"] == "v_paired"]
    figs["alpha_sweeps"] = _layout(go.Figure([
        go.Scatter(name=f"{s} {v} L{l}", x=[r["alpha"] for r in suf if (r["student"], r["vector"], r["layer"]) ==
                                            (s, v, l)],
                   y=[r["mean"] for r in suf if (r["student"], r["vector"], r["layer"]) == (s, v, l)], mode="lines+markers")
        for s, v, l in dict.fromkeys((r["student"], r["vector"], r["layer"]) for r in suf)]),
        "Sufficiency: α·v added to the base", "α", "Δ log P(target) vs base")
    return figs


def write_geometry(t: dict[str, list[dict]], out_dir: str | Path, png: bool | None = None) -> dict[str, Any]:
    import pandas as pd

    out_dir = Path(out_dir)
    written = []
    with atomic_dir(out_dir, overwrite=True) as tmp:
        for name, rows in t.items():
            atomic_write_text(tmp / f"{name}.csv", pd.DataFrame(rows).to_csv(index=False, float_format="%.6g"))
        atomic_write_text(tmp / "geometry.md", geometry_markdown(t))
        for name, fig in geometry_figures(t).items():
            written += [p.name for p in plots.save_figure(fig, tmp / "figures" / name, png=png)]
    return {"tables": sorted(t), "figures": written}


def run_geometry(inputs: GeometryInputs, cfg: GeometryConfig, out_dir: str | Path,
                 progress: Progress | None = None) -> dict[str, Any]:
    """Compute (:func:`mech.geometry.run.compute_geometry`), then write the report."""
    return write_geometry(compute_geometry(inputs, cfg, progress), out_dir)


# --------------------------------------------------------------------------- teacher cosines over data seeds


def teacher_cosines_markdown(t: dict[str, list[dict]]) -> str:
    meta = t["meta"][0]
    students = meta["students"].split()
    what = {"steer": "the vector the steered teacher added (the shift it causes in the base)",
            "prompt": "the trait prompt's shift of the base"}.get(meta["kind"], meta["kind"])
    lines = [f"# Students' residual shifts against their teacher's vector: {meta['students']}", "",
             f"cos(v, v_teacher) per layer, v_teacher being {what}, read on the first {meta['n_rows']} kept rows of "
             f"each data seed's {meta['target']} teacher in the {meta['train_context']} context; each student is "
             f"compared with its own data seed's teacher. Mean [95 % t-interval over {meta['data_seeds']} data seeds] "
             f"of the per-data-seed mean over {meta['training_seeds']} training seeds. v_paired = v_student − "
             f"v_neutral-teacher student. A direction unrelated to v_teacher gives |cos| below "
             f"{meta['null_q95']:.3f} in 95 % of draws (d = {meta['hidden']}, {meta['n_null']} random directions)."
             + (" Rows by epoch: each per-epoch checkpoint (the last is the final student)." if meta.get("epochs")
                else ""), ""]
    s = {(r["student"], r["epoch"], r["layer"], r["value"]): r for r in t["summary"]}
    layers = sorted({r["layer"] for r in t["summary"]})
    epochs = sorted({r["epoch"] for r in t["summary"]})
    for value, label in (("cos_paired", "v_paired"), ("cos_student", "v_student (trait teacher)"),
                         ("cos_neutral", "v_student (neutral teacher)")):
        lines += [f"**cos({label}, v_teacher)**", ""]
        head = ["student", *(["epoch"] if meta.get("epochs") else []), *(f"layer {l}" for l in layers)]
        lines += _table(head, [[st, *([str(e)] if meta.get("epochs") else []),
                                *(_ci(s.get((st, e, l, value))) for l in layers)] for st in students for e in epochs])
    return "\n".join(lines)


def teacher_cosines_figure(t: dict[str, list[dict]]) -> go.Figure:
    """cos(v_paired, v_teacher) by layer, or, with epochs, by epoch at each layer (the alignment curve)."""
    meta = t["meta"][0]
    cs = [r for r in t["summary"] if r["value"] == "cos_paired"]
    by_epoch = bool(meta.get("epochs"))
    xs = sorted({r["epoch" if by_epoch else "layer"] for r in cs})
    groups = ([(f"{st} layer {l}", [r for r in cs if r["student"] == st and r["layer"] == l])
               for st in meta["students"].split() for l in sorted({r["layer"] for r in cs})] if by_epoch else
              [(st, [r for r in cs if r["student"] == st]) for st in meta["students"].split()])
    fig = go.Figure([go.Scatter(name=name, x=[r["epoch" if by_epoch else "layer"] for r in rs],
                                y=[r["mean"] for r in rs], error_y=_err(rs), mode="lines+markers")
                     for name, rs in groups])
    for sign in (1, -1):
        fig.add_trace(go.Scatter(name="random null, 95 % of |cos|" if sign > 0 else None, showlegend=sign > 0,
                                 x=xs, y=[sign * meta["null_q95"]] * len(xs), mode="lines",
                                 line=dict(dash="dash", color="gray")))
    return _layout(fig, f"cos(v_paired, v_teacher) by {'epoch' if by_epoch else 'layer'}, CI over "
                        f"{meta['data_seeds']} data seeds", "epoch" if by_epoch else "layer", "cosine")


def write_teacher_cosines(t: dict[str, list[dict]], out_dir: str | Path, png: bool | None = None) -> dict[str, Any]:
    """``teacher_cosines.csv``, ``teacher_cosines_summary.csv``, ``teacher_cosines.md`` and the figure, atomically."""
    import pandas as pd

    written = []
    with atomic_dir(Path(out_dir), overwrite=True) as tmp:
        for name, rows in (("teacher_cosines", t["cosines"]), ("teacher_cosines_summary", t["summary"])):
            atomic_write_text(tmp / f"{name}.csv", pd.DataFrame(rows).to_csv(index=False, float_format="%.6g"))
        atomic_write_text(tmp / "teacher_cosines.md", teacher_cosines_markdown(t))
        written += [p.name for p in plots.save_figure(teacher_cosines_figure(t), tmp / "figures" / "teacher_cosines",
                                                      png=png)]
    return {"tables": ["teacher_cosines", "teacher_cosines_summary"], "figures": written}
