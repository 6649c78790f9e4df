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

This module computes and returns data (:class:`Localisation`: rows, summaries, heatmap grids);
:mod:`mech.report.localise` writes the tables and figures.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from mech.context import SEGMENT_LABELS, Context, Rendered, render
from mech.errors import MechError
from mech.teacher.prompts import generate_prompts
from mech.resources import questions
from mech.evaluation.scoring import first_token_ids
from mech.evaluation.inference import next_token_logprobs, pad_id, target_logp
from mech.interventions.graft import graft_metric, is_lora_student
from mech.interventions.mask import Mask
from mech.interventions.positions import resolve_positions, spec_label
from mech.interventions.result import Effect

POSITION_SETS = ("shared", "non_shared", "default_system", "template", "user")
COMPONENT_SETS = ("all", "attn", "mlp")
LAYER_SETS = ("all", "first_half", "second_half")
MODES = ("sufficiency", "necessity")
HEATMAP_METHODS = {"exact": "activation patching", "atp": "AtP"}  # grid key -> what computed it

Progress = Callable[[str, int, int], None]


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

    def __post_init__(self) -> None:
        # checked here, before any student is trained or loaded; a count beyond the list was once clipped silently
        n = len(questions(self.category))
        if not 1 <= self.n_questions <= n:
            raise MechError(f"n_questions must be between 1 and {n} (the {self.category} questions), got "
                            f"{self.n_questions}: pass --n-questions in that range")
        if not 0 <= self.heatmap_question < n:
            raise MechError(f"heatmap_question must be between 0 and {n - 1} (the {self.category} questions), got "
                            f"{self.heatmap_question}")


def battery_masks(cfg: LocaliseConfig, present: set[str]) -> list[Mask]:
    """Every positions × components × layers × mode cell; position segments the prompt lacks are skipped
    (e.g. default_system under a no-system evaluation context)."""
    out = []
    for pos, comp, lay, mode in itertools.product(cfg.positions, cfg.components, cfg.layers, cfg.modes):
        if pos in SEGMENT_LABELS and pos not in present:
            continue
        out.append(Mask(positions=pos, components=comp, layers=lay, mode=mode, name=f"{pos}|{comp}|{lay}|{mode}"))
    return out


def _train_rendered(tok, cfg: LocaliseConfig):
    """A training row's prompt in the training context: what the student saw at finetuning time."""
    return render(tok, Context.parse(cfg.train_context), generate_prompts(1, seed=0)[0].text)


def _mask_effect(mask: Mask, value: torch.Tensor, m_base: float, m_student: float) -> Effect:
    """One battery mask's mean metric as a one-cell Effect labelled by the mask's specs."""
    return Effect(method="dwg", site=spec_label(mask.components), layers=[spec_label(mask.layers)],
                  positions=[spec_label(mask.positions)], values=value.reshape(1, 1), base=m_base,
                  student=m_student, mode=mask.mode, name=mask.name)


def dwg_student(student: Any, base: Any, tok, cfg: LocaliseConfig,
                progress: Callable[[int, int], None] | None = None) -> list[Effect]:
    """Battery results for one student: one Effect per mask (metrics are means over the questions)."""
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
    return [_mask_effect(m, v, m_base, m_student) for m, v in zip(masks, m_mask)]


@dataclass
class StudentGrids:
    """Per-token patching results of one student on the heatmap question: ``{method: {site: Effect}}``."""

    rendered: Rendered
    shared: list[bool]
    effects: dict[str, dict[str, Effect]]


def patch_grids(student: Any, base: Any, tok, cfg: LocaliseConfig) -> StudentGrids:
    """Activation patching (exact, nnsight) and AtP grids [layers, tokens] on one question, denoising."""
    from mech.interventions.attribution import atp
    from mech.interventions.patching import first_token_metric, patching_sweep
    from mech.students.store import merged

    ids = first_token_ids(tok, cfg.target).ids
    q = questions(cfg.category)[cfg.heatmap_question]
    r = render(tok, Context.parse(cfg.eval_context), q)
    plain = merged(student) if is_lora_student(student) else student
    metric = first_token_metric(ids)
    exact = patching_sweep(base, plain, r, metric, sites=cfg.patch_sites)
    approx = atp(base, plain, r, metric, sites=cfg.patch_sites)
    shared = resolve_positions("shared", r, _train_rendered(tok, cfg)).tolist()
    return StudentGrids(rendered=r, shared=shared, effects={"exact": exact, "atp": approx})


@dataclass
class GroupGrids:
    """A group's per-token heatmaps: the metric change [layers, tokens] per method and site, mean over students."""

    rendered: Rendered
    shared: list[bool]
    change: dict[str, dict[str, torch.Tensor]]  # {method: {site: [n_layers, n_tokens]}}
    n_students: int


def mean_grids(grids: list[StudentGrids]) -> GroupGrids:
    """The students' grids averaged cell by cell (they share the heatmap question, hence its tokens)."""
    first = grids[0]
    change = {}
    for method, sites in first.effects.items():
        # summed in student order, as the battery always has, so heatmaps reproduce to the last bit
        change[method] = {site: sum((g.effects[method][site].change for g in grids[1:]),
                                    first.effects[method][site].change.clone()) / len(grids)
                          for site in sites}
    return GroupGrids(rendered=first.rendered, shared=first.shared, change=change, n_students=len(grids))


def student_rows(effects: list[Effect], group: str, student_dir: Any) -> list[dict]:
    """A student's battery as table rows (Effect.to_rows) tagged with its group and directory."""
    return [r | {"group": group, "student_dir": str(student_dir)} for e in effects for r in e.to_rows()]


def summarise_groups(rows: list[dict]) -> list[dict]:
    """Mean and 95 % CI of the fraction recovered over the students of each group, per mask."""
    from mech.analysis.stats import grouped_ci

    out = grouped_ci(rows, ("group", "name"), "fraction", carry=("site", "layer", "position", "mode"))
    return [r | {"fraction": r.pop("mean")} for r in out]


@dataclass
class Localisation:
    """Everything the battery computed: per-student rows, per-group summaries and heatmap grids."""

    cfg: LocaliseConfig
    rows: list[dict] = field(default_factory=list)  # one per student × mask (Effect.to_rows + group, student_dir)
    summary: list[dict] = field(default_factory=list)  # one per group × mask: fraction (mean), lo, hi, n, sd
    grids: dict[str, GroupGrids] = field(default_factory=dict)  # per group

    def mask_rows(self, group: str, mode: str = "sufficiency") -> list[dict]:
        """The group's summary rows of one mode, in battery order (what the mask-row heatmap shows)."""
        return [r for r in self.summary if r["group"] == group and r["mode"] == mode]


def compute_localise(base: Any, tok, groups: dict[str, list], cfg: LocaliseConfig, load: Callable[[Any], Any],
                     progress: Progress | None = None) -> Localisation:
    """DWG battery for every student and patching/AtP grids averaged per group; nothing is written."""
    tell = progress or (lambda desc, done, total: None)
    out = Localisation(cfg)
    for group, dirs in groups.items():
        grids = []
        for k, d in enumerate(dirs):
            student = load(d)
            desc = f"DWG {group} #{k + 1}/{len(dirs)}"
            effects = dwg_student(student, base, tok, cfg, lambda i, n: tell(desc, i, n))
            out.rows += student_rows(effects, group, d)
            grids.append(patch_grids(student, base, tok, cfg))
        out.grids[group] = mean_grids(grids)
    out.summary = summarise_groups(out.rows)
    return out
