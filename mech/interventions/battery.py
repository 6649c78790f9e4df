"""The standard localisation battery: where in the student (positions × components × layers) the trait lives.

For each student and each evaluation question, dynamic weight grafting evaluates every battery mask in one
batched forward (mech.interventions.graft), in both modes:
- sufficiency: the student's update only inside the mask — how much of the student's effect does it recover?
- necessity: the update everywhere except inside the mask — how much survives without it?
The effect is the trait's first-token log P over the target's token variants. The fraction recovered is
``(m_mask − m_base) / (m_student − m_base)`` on means over questions (ratios of means, because a single
question's effect can be ~0). Fractions are then summarised over the students of a group (training seeds)
with a 95 % t-interval. Activation patching and AtP grids (one question, denoising: the student's activations
into the base) give the per-token heatmaps.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable

import torch

from mech.context import Context, render
from mech.teacher.prompts import generate_prompts
from mech.resources import questions
from mech.evaluation.scoring import first_token_ids
from mech.evaluation.inference import next_token_logprobs, pad_id, target_logp
from mech.interventions.graft import graft_metric, is_lora_student
from mech.interventions.mask import Mask

POSITION_SETS = ("shared", "non_shared", "default_system", "template", "user")
COMPONENT_SETS = ("all", "attn", "mlp")
LAYER_SETS = ("all", "first_half", "second_half")
MODES = ("sufficiency", "necessity")


@dataclass(frozen=True)
class LocaliseConfig:
    target: str = "owl"
    category: str = "animal"
    eval_context: str = "default"
    train_context: str = "default"  # the context the students were finetuned in: defines "shared" tokens
    positions: tuple[str, ...] = POSITION_SETS
    components: tuple[str, ...] = COMPONENT_SETS
    layers: tuple[str, ...] = LAYER_SETS
    modes: tuple[str, ...] = MODES
    n_questions: int = 50
    heatmap_question: int = 0
    patch_sites: tuple[str, ...] = ("resid", "attn", "mlp")


def battery_masks(cfg: LocaliseConfig, present: set[str]) -> list[Mask]:
    """Every positions × components × layers × mode cell; position segments the prompt lacks are skipped
    (e.g. default_system under a no-system evaluation context)."""
    out = []
    for pos, comp, lay, mode in itertools.product(cfg.positions, cfg.components, cfg.layers, cfg.modes):
        if pos in ("default_system", "custom_system", "template", "user", "assistant") and pos not in present:
            continue
        out.append(Mask(positions=pos, components=comp, layers=lay, mode=mode, name=f"{pos}|{comp}|{lay}|{mode}"))
    return out


def _train_rendered(tok, cfg: LocaliseConfig):
    """A training row's prompt in the training context: what the student saw at finetuning time."""
    return render(tok, Context.parse(cfg.train_context), generate_prompts(1, seed=0)[0].text)


def dwg_student(student: Any, base: Any, tok, cfg: LocaliseConfig,
                progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Battery fractions for one student: one row per mask."""
    ids = first_token_ids(tok, cfg.target).ids
    ctx = Context.parse(cfg.eval_context)
    train_r = _train_rendered(tok, cfg)
    qs = questions(cfg.category)[: cfg.n_questions]
    rendered = [render(tok, ctx, q) for q in qs]
    present = set(rendered[0].segments)
    masks = battery_masks(cfg, present)
    lp_base = next_token_logprobs(base, [r.input_ids for r in rendered], pad_id(tok))
    lp_student = next_token_logprobs(student, [r.input_ids for r in rendered], pad_id(tok))
    m_base = target_logp(lp_base, ids).mean().item()
    m_student = target_logp(lp_student, ids).mean().item()
    grafted_base = None if is_lora_student(student) else base
    per_q = []
    for i, r in enumerate(rendered):
        per_q.append(graft_metric(student, grafted_base, r, masks, ids, train_rendered=train_r))
        if progress:
            progress(i + 1, len(rendered))
    m_mask = torch.stack(per_q).mean(0)
    effect = m_student - m_base
    return [{"mask": m.name, "positions": m.positions, "components": m.components, "layers": m.layers,
             "mode": m.mode, "metric": float(v), "metric_base": m_base, "metric_student": m_student,
             "effect": effect, "fraction": (float(v) - m_base) / effect if effect != 0 else float("nan")}
            for m, v in zip(masks, m_mask)]


def patch_grids(student: Any, base: Any, tok, cfg: LocaliseConfig) -> dict[str, Any]:
    """Activation patching (exact, nnsight) and AtP grids [layers, tokens] on one question, denoising."""
    from mech.interventions.attribution import atp
    from mech.interventions.patching import first_token_metric, patching_sweep
    from mech.students.store import merged

    ids = first_token_ids(tok, cfg.target).ids
    q = questions(cfg.category)[cfg.heatmap_question]
    r = render(tok, Context.parse(cfg.eval_context), q)
    plain = merged(student) if is_lora_student(student) else student
    metric = first_token_metric(ids)
    exact = patching_sweep(base, plain, r.input_ids, metric, sites=cfg.patch_sites)
    approx = atp(base, plain, r.input_ids, metric, sites=cfg.patch_sites)
    shared = set(_shared(tok, cfg, r))
    return {"rendered": r, "shared": [i in shared for i in range(len(r.input_ids))],
            "exact": {s: exact[s].metric - exact[s].clean for s in cfg.patch_sites},
            "atp": {s: approx[s].scores for s in cfg.patch_sites},
            "effect": float(exact[cfg.patch_sites[0]].effect)}


def _shared(tok, cfg: LocaliseConfig, r) -> list[int]:
    from mech.context import shared_positions

    return shared_positions(r, _train_rendered(tok, cfg))


def summarise_groups(rows: list[dict]) -> list[dict]:
    """Mean and 95 % CI of the fraction recovered over the students of each group, per mask."""
    from mech.analysis.stats import grouped_ci

    out = grouped_ci(rows, ("group", "mask"), "fraction", carry=("positions", "components", "layers", "mode"))
    return [r | {"fraction": r.pop("mean")} for r in out]


def run_localise(base, tok, groups: dict[str, list], cfg: LocaliseConfig, out_dir, load: Callable[[Any], Any],
                 progress: Callable[[str, int, int], None] | None = None) -> dict:
    """DWG battery for every student, patching/AtP grids averaged per group; tables and figures to out_dir."""
    from pathlib import Path

    import pandas as pd

    from mech.report import figures as plots, heatmaps
    from mech.store import atomic_write_text

    tell = progress or (lambda desc, done, total: None)
    out = Path(out_dir)
    rows, grids = [], {}
    for group, dirs in groups.items():
        acc = None
        for k, d in enumerate(dirs):
            student = load(d)
            desc = f"DWG {group} #{k + 1}/{len(dirs)}"
            rows += [r | {"group": group, "student_dir": str(d)}
                     for r in dwg_student(student, base, tok, cfg, lambda i, n: tell(desc, i, n))]
            g = patch_grids(student, base, tok, cfg)
            if acc is None:
                acc = g | {"exact": {s: v.clone() for s, v in g["exact"].items()},
                           "atp": {s: v.clone() for s, v in g["atp"].items()}}
            else:
                for kind in ("exact", "atp"):
                    for s in acc[kind]:
                        acc[kind][s] += g[kind][s]
        for kind in ("exact", "atp"):
            for s in acc[kind]:
                acc[kind][s] /= len(dirs)
        grids[group] = acc
    summary = summarise_groups(rows)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "localise_students.csv", pd.DataFrame(rows).to_csv(index=False, float_format="%.6g"))
    atomic_write_text(out / "localise.csv", pd.DataFrame(summary).to_csv(index=False, float_format="%.6g"))
    atomic_write_text(out / "localise.md", localise_markdown(summary, cfg))
    figs = []
    for group in groups:
        suff = [r for r in summary if r["group"] == group and r["mode"] == "sufficiency"]
        figs += plots.save_figure(heatmaps.mask_rows_heatmap(
            [r["fraction"] for r in suff], [r["mask"].rsplit("|", 1)[0] for r in suff],
            title=f"DWG sufficiency: fraction of the {group} students' effect recovered",
            zlabel="fraction recovered", references={"base": 0.0, "student": 1.0},
            errors=[(r["hi"] - r["lo"]) / 2 if r["n"] > 1 else 0.0 for r in suff]), out / "figures" / f"dwg_{group}")
        g = grids[group]
        r = g["rendered"]
        for kind, label in (("exact", "activation patching"), ("atp", "AtP")):
            for site in cfg.patch_sites:
                figs += plots.save_figure(heatmaps.patching_heatmap(
                    g[kind][site], r.tokens(), r.segments, g["shared"], zmid=0.0,
                    title=f"{label}, {site}: Δ log P({cfg.target}) when the {group} student's activation is patched "
                          "into the base", zlabel="Δ log P"), out / "figures" / f"{kind}_{site}_{group}")
    return {"rows": len(rows), "summary": summary, "figures": [str(f) for f in figs]}


def localise_markdown(summary: list[dict], cfg: LocaliseConfig) -> str:
    lines = [f"# Localisation of the {cfg.target} trait", "",
             f"Fraction of the student's first-token Δ log P({cfg.target}) recovered with its update only inside "
             "the mask (sufficiency) or everywhere except the mask (necessity); mean [95 % CI] over the students of "
             f"each group. Evaluation context: {cfg.eval_context}; shared = tokens of the evaluation prompt also in "
             f"the training context ({cfg.train_context}).", "",
             "| group | positions | components | layers | sufficiency | necessity |", "|---|---|---|---|---|---|"]
    idx = {(r["group"], r["positions"], r["components"], r["layers"], r["mode"]): r for r in summary}

    def fmt(r):
        if r is None:
            return "–"
        return f"{r['fraction']:+.2f}" + (f" [{r['lo']:+.2f}, {r['hi']:+.2f}]" if r["n"] > 1 else "")

    for (g, p, c, l, m) in sorted({k[:4] + ("",) for k in idx}):
        lines.append(f"| {g} | {p} | {c} | {l} | {fmt(idx.get((g, p, c, l, 'sufficiency')))} | "
                     f"{fmt(idx.get((g, p, c, l, 'necessity')))} |")
    return "\n".join(lines) + "\n"
