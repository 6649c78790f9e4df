"""The standard localisation battery: where in the student (positions × components × layers) the trait lives.

For each student and each evaluation question, dynamic weight grafting evaluates every battery mask in one
batched forward (mech.interventions.graft), in both modes:
- sufficiency: the student's update only inside the mask — how much of the student's effect does it recover?
- necessity: the update everywhere except inside the mask — how much survives without it?
The effect is the trait's first-token log P over the target's token variants. The fraction recovered is
``(m_mask − m_base) / (m_student − m_base)`` on means over questions (ratios of means, because a single
question's effect can be ~0). Fractions are then summarised over the students of a group (training seeds)
with a 95 % t-interval. Activation patching and AtP grids (one question, denoising: the student's activations
into the base) give the per-token heatmaps. With ``sampled`` set, the primary position sets also get the paper's
own metric, the sampled rate, with the update grafted while each answer is written (``sampled_rates``).

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
from mech.interventions.graft import DECODE_POLICIES, REST_FROM, graft_generate, graft_metric, is_lora_student
from mech.interventions.mask import Mask
from mech.interventions.positions import resolve_positions, spec_label
from mech.interventions.result import Effect

POSITION_SETS = ("shared", "non_shared", "default_system", "template", "user", "readout", "shared_minus_readout")
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
    null_sets: int = 0  # random same-size position sets per named set in null_positions (0: no null)
    null_positions: tuple[str, ...] = ("shared", "shared_minus_readout")
    null_questions: int = 10  # the null runs on the first this-many questions: 200 sets x 50 questions is too slow
    seed: int = 0  # the null sets and the bootstrap
    n_boot: int = 2000
    # full-FT students: where embeddings, norms and lm_head come from (mech.interventions.graft). "masked" grafts
    # them per position with the mask, so a position mask holds the student's whole update there and the empty mask
    # is the base, as for LoRA; "student" leaves the student's trained embeddings and norms on everywhere (every
    # fraction offset by them); "base" keeps them out of every mask (the all-on mask then shows how much of the
    # effect the projections carry). LoRA students are unaffected
    rest_from: str = "masked"
    # a second metric for the primary masks: the sampled trait rate with the update grafted during generation
    # (graft_generate); ``sampled`` answers per question and mask, 0: off. Each named position set runs with all
    # components and layers (sufficiency) beside the references "all" (the student) and "none"; generated tokens
    # keep the readout's weight (decode policy "as_last"), so a mask without the readout is off while writing
    sampled: int = 0
    sampled_positions: tuple[str, ...] = ("shared", "non_shared", "readout", "shared_minus_readout")
    sampled_decode: str = "as_last"
    sampled_tokens: int = 6  # as the trait evaluation's max_new_tokens

    def __post_init__(self) -> None:
        # checked here, before any student is trained or loaded; a count beyond the list was once clipped silently
        n = len(questions(self.category))
        if not 1 <= self.n_questions <= n:
            raise MechError(f"n_questions must be between 1 and {n} (the {self.category} questions), got "
                            f"{self.n_questions}: pass --n-questions in that range")
        if self.rest_from not in REST_FROM:
            raise MechError(f"rest_from must be one of {', '.join(REST_FROM)}, got {self.rest_from!r}")
        if self.null_sets < 0 or self.n_boot < 1 or self.null_questions < 1:
            raise MechError(f"null_sets must be >= 0, n_boot and null_questions >= 1, got {self.null_sets}, "
                            f"{self.n_boot} and {self.null_questions}: pass e.g. --null-sets 200")
        if self.sampled < 0 or self.sampled_tokens < 1:
            raise MechError(f"sampled must be >= 0 and sampled_tokens >= 1, got {self.sampled} and "
                            f"{self.sampled_tokens}: pass e.g. --sampled 20, or 0 to skip the sampled metric")
        odd = [p for p in self.sampled_positions if p not in POSITION_SETS]
        if odd:
            raise MechError(f"unknown sampled position set(s) {', '.join(odd)}: choose from {', '.join(POSITION_SETS)}")
        if self.sampled_decode not in DECODE_POLICIES:
            raise MechError(f"sampled_decode must be one of {', '.join(DECODE_POLICIES)}, got {self.sampled_decode!r}")
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


@dataclass
class QuestionMetrics:
    """One student's battery per question: the base's, the student's and each mask's metric, [Q] and [Q, K]."""

    masks: list[Mask]
    base: torch.Tensor
    student: torch.Tensor
    mask: torch.Tensor


def _rendered_questions(tok, cfg: LocaliseConfig) -> list[Rendered]:
    ctx = Context.parse(cfg.eval_context)
    return [render(tok, ctx, q) for q in questions(cfg.category)[: cfg.n_questions]]


def dwg_questions(student: Any, base: Any, tok, cfg: LocaliseConfig,
                  progress: Callable[[int, int], None] | None = None) -> QuestionMetrics:
    """Every battery mask's metric on every question (one batched graft per question)."""
    ids = first_token_ids(tok, cfg.target).ids
    train_r = _train_rendered(tok, cfg)
    rendered = _rendered_questions(tok, cfg)
    masks = battery_masks(cfg, set(rendered[0].segments))
    lp_base = next_token_logprobs(base, [r.input_ids for r in rendered], pad_id(tok))
    lp_student = next_token_logprobs(student, [r.input_ids for r in rendered], pad_id(tok))
    grafted_base = None if is_lora_student(student) else base
    per_q = []
    for i, r in enumerate(rendered):
        per_q.append(graft_metric(student, grafted_base, r, masks, ids, train_rendered=train_r,
                                  rest_from=cfg.rest_from))
        if progress:
            progress(i + 1, len(rendered))
    return QuestionMetrics(masks, target_logp(lp_base, ids), target_logp(lp_student, ids), torch.stack(per_q))


def dwg_student(student: Any, base: Any, tok, cfg: LocaliseConfig,
                progress: Callable[[int, int], None] | None = None) -> list[Effect]:
    """Battery results for one student: one Effect per mask (metrics are means over the questions)."""
    qm = dwg_questions(student, base, tok, cfg, progress)
    m_base, m_student = qm.base.mean().item(), qm.student.mean().item()
    return [_mask_effect(m, v, m_base, m_student) for m, v in zip(qm.masks, qm.mask.mean(0))]


# --------------------------------------------------------------------------------------------- statistics


def duplicate_masks(masks: list[Mask], model: Any, rendered: list[Rendered], train_r: Rendered) -> dict[str, str]:
    """{mask name: the earlier mask it equals}: masks whose update is on in exactly the same (module, position)
    cells on every question give the same number (necessity(X) is sufficiency(complement X); ``non_shared``
    is ``user`` when the contexts match), so each region is reported once."""
    import hashlib

    first: dict[str, str] = {}
    out = {}
    for m in masks:
        h = hashlib.sha256()
        for r in rendered:
            h.update(m.resolve(model, r, train_r).grid().numpy().tobytes())
        key = h.hexdigest()
        if key in first:
            out[m.name] = first[key]
        else:
            first[key] = m.name
    return out


def crossed_bootstrap(values: Any, n_boot: int, seed: int, level: float = 0.95) -> tuple[Any, Any]:
    """Percentile interval of the grand mean of ``values`` [..., students, questions], students and questions
    resampled independently (a crossed two-way bootstrap); returns (lo, hi) over the leading axes."""
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    n_s, n_q = v.shape[-2:]
    rng = np.random.default_rng(seed)
    ws = np.stack([np.bincount(rng.integers(0, n_s, n_s), minlength=n_s) for _ in range(n_boot)]) / n_s
    wq = np.stack([np.bincount(rng.integers(0, n_q, n_q), minlength=n_q) for _ in range(n_boot)]) / n_q
    stats = np.einsum("bs,bq,...sq->...b", ws, wq, v)
    alpha = (1 - level) / 2
    return np.quantile(stats, alpha, axis=-1), np.quantile(stats, 1 - alpha, axis=-1)


def _t_pvalue(per_student: Any) -> float:
    """Two-sided one-sample t-test of the per-student means against 0 (nan with fewer than 2 students)."""
    import numpy as np
    from scipy import stats

    x = np.asarray(per_student, dtype=np.float64)
    if len(x) < 2:
        return float("nan")
    if np.ptp(x) == 0:
        return 0.0 if x[0] != 0 else 1.0
    return float(stats.ttest_1samp(x, 0.0).pvalue)


def paired_tests(owl: list[QuestionMetrics], neutral: list[QuestionMetrics] | None, duplicates: dict[str, str],
                 cfg: LocaliseConfig, group: str) -> list[dict]:
    """Per mask reported once: the effect (owl student − its neutral student, both grafted with the mask; without
    neutral students, owl student − base), mean over students and questions, its crossed-bootstrap 95 % interval,
    the same as a fraction of the unmasked paired effect, and p (t over students) adjusted by Holm and BH over
    the group's battery."""
    import numpy as np

    from mech.analysis.hypotheses import adjust

    masks = owl[0].masks
    a = np.stack([q.mask.numpy().T for q in owl])  # [S, K, Q]
    full = np.stack([q.student.numpy() for q in owl])  # [S, Q]
    if neutral is not None:
        a = a - np.stack([q.mask.numpy().T for q in neutral])
        full = full - np.stack([q.student.numpy() for q in neutral])
        effect = "owl - neutral student, same mask"
    else:
        a = a - np.stack([q.base.numpy() for q in owl])[:, None, :]
        full = full - np.stack([q.base.numpy() for q in owl])
        effect = "student - base"
    keep = [k for k, m in enumerate(masks) if m.name not in duplicates]
    per_mask = a.transpose(1, 0, 2)  # [K, S, Q]
    lo, hi = crossed_bootstrap(per_mask, cfg.n_boot, cfg.seed)
    p = [_t_pvalue(per_mask[k].mean(-1)) for k in keep]
    finite = [i for i, x in enumerate(p) if x == x]
    holm, bh = adjust([p[i] for i in finite])
    ph, pb = [float("nan")] * len(p), [float("nan")] * len(p)
    for j, i in enumerate(finite):
        ph[i], pb[i] = holm[j], bh[j]
    denom = float(full.mean())
    rows = []
    for j, k in enumerate(keep):
        m = masks[k]
        mean = float(per_mask[k].mean())
        rows.append({"group": group, "name": m.name, "position": spec_label(m.positions),
                     "site": spec_label(m.components), "layer": spec_label(m.layers), "mode": m.mode,
                     "effect": effect, "paired": mean, "paired_lo": float(lo[k]), "paired_hi": float(hi[k]),
                     "paired_fraction": mean / denom if denom else float("nan"), "paired_full": denom,
                     "p": p[j], "p_holm": ph[j], "p_bh": pb[j], "n_students": int(a.shape[0]),
                     "equals": ", ".join(n for n, e in duplicates.items() if e == m.name)})
    return rows


def sampled_masks(cfg: LocaliseConfig, present: set[str]) -> list[Mask]:
    """The sampled metric's masks: "all" (the student), "none", then each of ``cfg.sampled_positions`` the prompt
    has, with all components and layers, sufficiency."""
    named = [p for p in cfg.sampled_positions if p not in SEGMENT_LABELS or p in present]
    return [Mask("all", name="all"), Mask("none", name="none"), *(Mask(p, name=p) for p in named)]


@dataclass
class SampledRates:
    """One student's sampled trait rate per question and mask [Q, K] (share of ``cfg.sampled`` answers naming the
    target), and the base model's per question [Q] from the same seeds."""

    masks: list[Mask]
    rate: Any
    base: Any


def _question_seed(cfg: LocaliseConfig, q: int) -> int:
    return cfg.seed * 1_000_003 + q  # the same draws for a student and its neutral twin: paired samples


def sampled_rates(student: Any, base: Any, tok, cfg: LocaliseConfig,
                  progress: Callable[[int, int], None] | None = None, with_base: bool = True) -> SampledRates:
    """The sampled metric of ``cfg.sampled`` answers per question under each of :func:`sampled_masks`, the
    update grafted while the answer is written (mech.interventions.graft.graft_generate); ``with_base`` also
    samples the base model from the same seeds (what an unpaired effect subtracts; else ``base`` rates are NaN)."""
    import numpy as np

    from mech.evaluation.inference import decode_answer, eos_id, sample, stop_ids
    from mech.evaluation.scoring import mentions

    train_r = _train_rendered(tok, cfg)
    rendered = _rendered_questions(tok, cfg)
    masks = sampled_masks(cfg, set(rendered[0].segments))
    n, stops, eos, pad = cfg.sampled, stop_ids(tok), eos_id(tok), pad_id(tok)

    def rate(tokens: list[list[int]]) -> list[float]:
        hits = [mentions(decode_answer(tok, t, stops), cfg.target) for t in tokens]
        return [float(np.mean(hits[k:k + n])) for k in range(0, len(hits), n)]

    grafted_base = None if is_lora_student(student) else base
    rates, base_rates = [], []
    for q, r in enumerate(rendered):
        seed = _question_seed(cfg, q)
        rates.append(rate(graft_generate(student, grafted_base, r, masks, max_new_tokens=cfg.sampled_tokens,
                                         decode_policy=cfg.sampled_decode, eos_id=eos, pad_id=pad, temperature=1.0,
                                         seed=seed, train_rendered=train_r, rest_from=cfg.rest_from, n_samples=n)))
        base_rates += rate(sample(base, [r.input_ids], seed=seed, max_new_tokens=cfg.sampled_tokens, eos_id=eos,
                                  pad_id=pad, batch_size=n, n_samples=n)) if with_base else [float("nan")]
        if progress:
            progress(q + 1, len(rendered))
    return SampledRates(masks, np.asarray(rates), np.asarray(base_rates))


def sampled_tests(owl: list[SampledRates], neutral: list[SampledRates] | None, cfg: LocaliseConfig,
                  group: str) -> list[dict]:
    """Per sampled mask: the paired effect on the sampled rate (owl student − its neutral student under the same
    mask and seeds; without neutral students, student − base), mean over students and questions, its crossed
    bootstrap 95 % interval, and its fraction of the "all" mask's (the unmasked student's) paired effect."""
    import numpy as np

    raw = np.stack([s.rate for s in owl])  # [S, Q, K]
    a = raw
    if neutral is not None:
        a = a - np.stack([s.rate for s in neutral])
        effect = "owl - neutral student, same mask and seeds"
    else:
        a = a - np.stack([s.base for s in owl])[:, :, None]
        effect = "student - base"
    per_mask = a.transpose(2, 0, 1)  # [K, S, Q]
    lo, hi = crossed_bootstrap(per_mask, cfg.n_boot, cfg.seed)
    full = float(per_mask[0].mean())
    rows = []
    for k, m in enumerate(owl[0].masks):
        mean = float(per_mask[k].mean())
        rows.append({"group": group, "name": m.name, "effect": effect, "paired_rate": mean,
                     "paired_rate_lo": float(lo[k]), "paired_rate_hi": float(hi[k]),
                     "fraction": mean / full if full else float("nan"), "rate": float(raw[:, :, k].mean()),
                     "n_students": int(a.shape[0]), "n_samples": cfg.sampled * a.shape[1],
                     "decode_policy": cfg.sampled_decode})
    return rows


def null_sets(spec: str, rendered: list[Rendered], train_r: Rendered, n_sets: int, seed: int) -> list[list[Mask]]:
    """Per question, ``n_sets`` random position sets of the size of ``spec``'s (all components, all layers,
    sufficiency), the readout handled as in ``spec``: kept in every set when ``spec`` holds it, else never drawn."""
    import numpy as np

    out = []
    for q, r in enumerate(rendered):
        named = resolve_positions(spec, r, train_r)
        last = len(r) - 1
        has_readout = bool(named[last])
        pool = np.arange(last)  # every position but the readout
        k = int(named.sum()) - int(has_readout)
        rng = np.random.default_rng([seed, q])
        masks = []
        for j in range(n_sets):
            pick = sorted(int(i) for i in rng.choice(pool, size=k, replace=False))
            pos = tuple(pick + [last] if has_readout else pick)
            masks.append(Mask(positions=pos if pos else "none", name=f"null:{spec}:{j}"))
        out.append(masks)
    return out


def null_test(owl: list[Any], neutral: list[Any] | None, base: Any, tok, cfg: LocaliseConfig, spec: str,
              group: str) -> dict:
    """"``spec`` beats random": the effect recovered by the update at ``spec``'s positions alone (all components
    and layers; paired against the neutral students when given, else vs the base) against ``cfg.null_sets``
    random same-size position sets, on the first ``cfg.null_questions`` questions; p = (1 + #null >= observed) /
    (1 + n)."""
    import numpy as np

    ids = first_token_ids(tok, cfg.target).ids
    train_r = _train_rendered(tok, cfg)
    rendered = _rendered_questions(tok, cfg)[: cfg.null_questions]
    nulls = null_sets(spec, rendered, train_r, cfg.null_sets, cfg.seed)
    named = Mask(positions=spec, name=spec)

    def run(student: Any) -> Any:  # [Q, 1 + n]
        gb = None if is_lora_student(student) else base
        return np.stack([graft_metric(student, gb, r, [named, *ns], ids, train_rendered=train_r, batch_size=64,
                                      rest_from=cfg.rest_from)
                         .numpy() for r, ns in zip(rendered, nulls)])

    vals = np.stack([run(s) for s in owl])  # [S, Q, 1 + n]
    if neutral is not None:
        vals = vals - np.stack([run(s) for s in neutral])
    else:
        lp = next_token_logprobs(base, [r.input_ids for r in rendered], pad_id(tok))
        vals = vals - target_logp(lp, ids).numpy()[None, :, None]
    stat = vals.mean(axis=(0, 1))
    observed, null = float(stat[0]), stat[1:]
    return {"group": group, "position": spec, "observed": observed, "null_mean": float(null.mean()),
            "null_q95": float(np.quantile(null, 0.95)), "n_null": int(len(null)),
            "p": float((1 + (null >= observed).sum()) / (1 + len(null))),
            "effect": "owl - neutral student" if neutral is not None else "student - base",
            "set_size": float(np.mean([int(resolve_positions(spec, r, train_r).sum()) for r in rendered])),
            "prompt_len": float(np.mean([len(r) for r in rendered]))}


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
    """Everything the battery computed: per-student rows, per-group summaries and heatmap grids; the paired,
    multiplicity-adjusted tests per mask reported once, and the random-position-set nulls."""

    cfg: LocaliseConfig
    rows: list[dict] = field(default_factory=list)  # one per student × mask (Effect.to_rows + group, student_dir)
    summary: list[dict] = field(default_factory=list)  # one per group × mask: fraction (mean), lo, hi, n, sd
    grids: dict[str, GroupGrids] = field(default_factory=dict)  # per group
    tests: list[dict] = field(default_factory=list)  # per group × mask reported once (paired_tests)
    duplicates: dict[str, str] = field(default_factory=dict)  # mask name -> the mask it equals
    nulls: list[dict] = field(default_factory=list)  # per group × null position set (null_test)
    sampled: list[dict] = field(default_factory=list)  # per group × sampled mask (sampled_tests), when cfg.sampled

    def mask_rows(self, group: str, mode: str = "sufficiency") -> list[dict]:
        """The group's summary rows of one mode, in battery order (what the mask-row heatmap shows)."""
        return [r for r in self.summary if r["group"] == group and r["mode"] == mode]


def compute_localise(base: Any, tok, groups: dict[str, list], cfg: LocaliseConfig, load: Callable[[Any], Any],
                     progress: Progress | None = None, controls: dict[str, list] | None = None) -> Localisation:
    """DWG battery for every student and patching/AtP grids averaged per group; with ``controls`` (per group, the
    neutral-teacher student of each student, same order) the paired tests and nulls are owl − neutral;
    nothing is written."""
    tell = progress or (lambda desc, done, total: None)
    out = Localisation(cfg)
    rendered = _rendered_questions(tok, cfg)
    out.duplicates = duplicate_masks(battery_masks(cfg, set(rendered[0].segments)), base, rendered,
                                     _train_rendered(tok, cfg))
    for group, dirs in groups.items():
        grids, owl, neutral, owl_rates, neutral_rates = [], [], [], [], []
        pair = (controls or {}).get(group)
        if pair is not None and len(pair) != len(dirs):
            raise MechError(f"group {group}: {len(dirs)} students but {len(pair)} neutral controls: pair each")
        for k, d in enumerate(dirs):
            student = load(d)
            desc = f"DWG {group} #{k + 1}/{len(dirs)}"
            qm = dwg_questions(student, base, tok, cfg, lambda i, n: tell(desc, i, n))
            owl.append(qm)
            m_base, m_student = qm.base.mean().item(), qm.student.mean().item()
            out.rows += student_rows([_mask_effect(m, v, m_base, m_student) for m, v in zip(qm.masks, qm.mask.mean(0))],
                                     group, d)
            if cfg.patch_sites:  # () skips the per-token heatmaps
                grids.append(patch_grids(student, base, tok, cfg))
            if cfg.sampled:
                owl_rates.append(sampled_rates(student, base, tok, cfg, lambda i, n: tell(f"sampled {desc}", i, n),
                                               with_base=pair is None))
            if pair is not None:
                control = load(pair[k])
                neutral.append(dwg_questions(control, base, tok, cfg, lambda i, n: tell(f"{desc} neutral", i, n)))
                if cfg.sampled:
                    neutral_rates.append(sampled_rates(control, base, tok, cfg,
                                                       lambda i, n: tell(f"sampled {desc} neutral", i, n),
                                                       with_base=False))
        if grids:
            out.grids[group] = mean_grids(grids)
        out.tests += paired_tests(owl, neutral or None, out.duplicates, cfg, group)
        if owl_rates:
            out.sampled += sampled_tests(owl_rates, neutral_rates or None, cfg, group)
        if cfg.null_sets:
            students = [load(d) for d in dirs]
            controls_ = [load(d) for d in pair] if pair is not None else None
            for spec in cfg.null_positions:
                tell(f"null {group} {spec}", 0, 0)
                out.nulls.append(null_test(students, controls_, base, tok, cfg, spec, group))
    out.summary = summarise_groups(out.rows)
    return out
