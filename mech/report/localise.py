"""The localisation battery's report: CSV tables, Markdown and figures from a computed :class:`Localisation`.

:func:`mech.interventions.battery.compute_localise` returns the data; :func:`write_localise` writes

* ``localise_students.csv``: one row per student × mask (:meth:`mech.interventions.result.Effect.to_rows`
  columns plus ``group`` and ``student_dir``);
* ``localise.csv``: one row per group × mask, the fraction's mean and 95 % CI over the group's students;
* ``localise.md``: the summary as a sufficiency / necessity table (a row equal to an earlier one by construction
  is shown as "= that row"), then the paired tests and the random-position nulls;
* ``localise_tests.csv``: per group × mask reported once, the paired effect with its bootstrap interval, p, Holm
  and BH; ``localise_null.csv``: per group × position set, "beats random" against same-size random sets;
* ``figures/dwg_<group>``: the sufficiency fractions as a mask-row heatmap, and
  ``figures/<method>_<site>_<group>``: per-token patching and AtP heatmaps (:mod:`mech.report.heatmaps`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from mech.interventions.battery import (
    HEATMAP_METHODS,
    GroupGrids,
    LocaliseConfig,
    Localisation,
    Progress,
    compute_localise,
)
from mech.report import figures as plots
from mech.report import heatmaps
from mech.store import atomic_write_text


def _cell(name: str) -> str:
    """A mask name inside a Markdown table cell: its '|' separators would split the cell."""
    return name.replace("|", "/")


_REST = {"student": "from the student, outside every mask", "base": "from the base (only projections are grafted)",
         "masked": "grafted per position with the mask"}


def localise_markdown(summary: list[dict], cfg: LocaliseConfig, duplicates: dict[str, str] | None = None,
                      tests: list[dict] | None = None, nulls: list[dict] | None = None,
                      sampled: list[dict] | None = None) -> str:
    lines = [f"# Localisation of the {cfg.target} trait", "",
             f"Fraction of the student's first-token Δ log P({cfg.target}) recovered with its update only inside "
             "the mask (sufficiency) or everywhere except the mask (necessity); mean [95 % CI] over the students of "
             f"each group. Evaluation context: {cfg.eval_context}; shared = tokens of the evaluation prompt also in "
             f"the training context ({cfg.train_context}). Full-FT students' embeddings, norms and lm_head: "
             f"{_REST[cfg.rest_from]}.", "",
             "| group | positions | components | layers | sufficiency | necessity |", "|---|---|---|---|---|---|"]
    idx = {(r["group"], r["position"], r["site"], r["layer"], r["mode"]): r for r in summary}

    dup = duplicates or {}

    def fmt(r):
        if r is None:
            return "–"
        if r["name"] in dup:  # the same cells switched on as an earlier row: one region, one number
            return f"= {_cell(dup[r['name']])}"
        return f"{r['fraction']:+.2f}" + (f" [{r['lo']:+.2f}, {r['hi']:+.2f}]" if r["n"] > 1 else "")

    for (g, p, c, l, m) in sorted({k[:4] + ("",) for k in idx}):
        lines.append(f"| {g} | {p} | {c} | {l} | {fmt(idx.get((g, p, c, l, 'sufficiency')))} | "
                     f"{fmt(idx.get((g, p, c, l, 'necessity')))} |")
    if tests:
        lines += ["", "## Paired effects, each region once", "",
                  f"Effect: {tests[0]['effect']}; mean first-token Δ log P({cfg.target}) over students and questions, "
                  "95 % crossed bootstrap over students and questions; fraction of the unmasked paired effect; p: "
                  "t over the students' means, adjusted over this group's battery (Holm, BH). Rows equal to one "
                  "here by construction are listed under 'equals'.", "",
                  "| group | mask | paired Δ [95 % CI] | fraction | p | p Holm | p BH | equals |",
                  "|---|---|---|---|---|---|---|---|"]
        for t in tests:
            lines.append(f"| {t['group']} | {_cell(t['name'])} | {t['paired']:+.3f} [{t['paired_lo']:+.3f}, "
                         f"{t['paired_hi']:+.3f}] | {t['paired_fraction']:+.2f} | {t['p']:.3g} | {t['p_holm']:.3g} | "
                         f"{t['p_bh']:.3g} | {_cell(t['equals']) or '–'} |")
    if nulls:
        lines += ["", "## Does the region beat random positions?", "",
                  "The update on at the region's positions only (all components and layers) against the same "
                  "number of random prompt positions per question (the readout kept when the region holds it, "
                  "else never drawn); p = (1 + #null ≥ observed) / (1 + n).", "",
                  "| group | positions | mean size / prompt | observed | null mean | null 95th pct | n | p |",
                  "|---|---|---|---|---|---|---|---|"]
        for n in nulls:
            lines.append(f"| {n['group']} | {n['position']} | {n['set_size']:.1f} / {n['prompt_len']:.1f} | "
                         f"{n['observed']:+.3f} | {n['null_mean']:+.3f} | {n['null_q95']:+.3f} | {n['n_null']} | "
                         f"{n['p']:.3g} |")
    if sampled:
        # a region reported once may go by another name there (non_shared is shared's necessity): both find it
        first = {f"{t['group']}/{name}": t["paired_fraction"] for t in tests or []
                 for name in [t["name"], *filter(None, t["equals"].split(", "))]}
        lines += ["", "## A second metric: the sampled rate with the update grafted while the answer is written", "",
                  f"{cfg.sampled} answers per question and mask (temperature 1, {cfg.sampled_tokens} tokens), the "
                  "update on at the mask's positions (all components and layers; 'all' is the student, 'none' no "
                  f"prompt position) and, for the tokens written, the decode policy '{cfg.sampled_decode}'. Effect: "
                  f"{sampled[0]['effect']}, on the share of answers naming {cfg.target}; 95 % crossed bootstrap over "
                  "students and questions; fraction of the 'all' row; beside it the first-token fraction of the "
                  "same region (sufficiency) from the table above; '–' where the 'all' row's paired effect is 0 "
                  "(the two students wrote the same answers from the same seeds).", "",
                  "| group | mask | rate | paired Δ rate [95 % CI] | fraction (sampled) | fraction (first token) |",
                  "|---|---|---|---|---|---|"]
        for r in sampled:
            ft = first.get(f"{r['group']}/{r['name']}|all|all|sufficiency")
            lines.append(f"| {r['group']} | {r['name']} | {r['rate']:.3f} | {r['paired_rate']:+.4f} "
                         f"[{r['paired_rate_lo']:+.4f}, {r['paired_rate_hi']:+.4f}] | "
                         f"{'–' if r['fraction'] != r['fraction'] else format(r['fraction'], '+.2f')} | "
                         f"{'–' if ft is None else f'{ft:+.2f}'} |")
    return "\n".join(lines) + "\n"


def mask_rows_figure(loc: Localisation, group: str) -> Any:
    """The group's sufficiency fractions, one row per mask, with the base (0) and student (1) marked."""
    suff = loc.mask_rows(group, "sufficiency")
    return heatmaps.mask_rows_heatmap(
        [r["fraction"] for r in suff], [r["name"].rsplit("|", 1)[0] for r in suff],
        title=f"DWG sufficiency: fraction of the {group} students' effect recovered",
        zlabel="fraction recovered", references={"base": 0.0, "student": 1.0},
        errors=[(r["hi"] - r["lo"]) / 2 if r["n"] > 1 else 0.0 for r in suff])


def token_figures(grids: GroupGrids, cfg: LocaliseConfig, group: str) -> dict[str, Any]:
    """``{"<method>_<site>": figure}``: per-token heatmaps of the metric change, one per method and site."""
    r = grids.rendered
    out = {}
    for method, label in HEATMAP_METHODS.items():
        for site in cfg.patch_sites:
            out[f"{method}_{site}"] = heatmaps.patching_heatmap(
                grids.change[method][site], r.tokens(), r.segments, grids.shared, zmid=0.0,
                title=f"{label}, {site}: Δ log P({cfg.target}) when the {group} student's activation is patched "
                      "into the base", zlabel="Δ log P")
    return out


def localise_figures(loc: Localisation) -> dict[str, Any]:
    """Every localisation figure of every group, by file stem (``dwg_<group>``, ``<method>_<site>_<group>``)."""
    figs: dict[str, Any] = {}
    for group, grids in loc.grids.items():
        figs[f"dwg_{group}"] = mask_rows_figure(loc, group)
        figs.update({f"{stem}_{group}": fig for stem, fig in token_figures(grids, loc.cfg, group).items()})
    return figs


def write_figures(figs: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """``figs`` (:func:`localise_figures`) under ``out_dir/figures``; the files written."""
    return [p for stem, fig in figs.items() for p in plots.save_figure(fig, Path(out_dir) / "figures" / stem)]


def write_tables(loc: Localisation, out_dir: str | Path) -> list[Path]:
    """``localise_students.csv``, ``localise.csv`` and ``localise.md`` in ``out_dir``; the files written."""
    import pandas as pd

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"localise_students.csv": pd.DataFrame(loc.rows).to_csv(index=False, float_format="%.6g"),
             "localise.csv": pd.DataFrame(loc.summary).to_csv(index=False, float_format="%.6g"),
             "localise.md": localise_markdown(loc.summary, loc.cfg, loc.duplicates, loc.tests, loc.nulls, loc.sampled)}
    if loc.tests:
        files["localise_tests.csv"] = pd.DataFrame(loc.tests).to_csv(index=False, float_format="%.6g")
    if loc.sampled:
        files["localise_sampled.csv"] = pd.DataFrame(loc.sampled).to_csv(index=False, float_format="%.6g")
    if loc.nulls:
        files["localise_null.csv"] = pd.DataFrame(loc.nulls).to_csv(index=False, float_format="%.6g")
    for name, text in files.items():
        atomic_write_text(out / name, text)
    return [out / name for name in files]


def write_localise(loc: Localisation, out_dir: str | Path) -> dict:
    """Tables and figures of a computed battery; ``{"rows", "summary", "tables", "figures", "figure_objects"}``
    (the last for a report that inlines them)."""
    tables = write_tables(loc, out_dir)
    objects = localise_figures(loc)
    figs = write_figures(objects, out_dir)
    return {"rows": len(loc.rows), "summary": loc.summary, "tables": [str(t) for t in tables],
            "figures": [str(f) for f in figs], "figure_objects": objects}


def run_localise(base: Any, tok: Any, groups: dict[str, list], cfg: LocaliseConfig, out_dir: str | Path,
                 load: Callable[[Any], Any], progress: Progress | None = None,
                 controls: dict[str, list] | None = None) -> dict:
    """Compute the battery (:func:`mech.interventions.battery.compute_localise`), then write its report."""
    return write_localise(compute_localise(base, tok, groups, cfg, load, progress, controls), out_dir)
