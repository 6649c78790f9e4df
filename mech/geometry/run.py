"""Geometry of a sweep's students, as data: update spectra, subspace overlaps, truncation curves, steering
vectors, write-space alignment and steering tests (issue 9, items 1-5).

The computation reads a :class:`GeometryInputs`, made either from a sweep's cache
(:func:`mech.sweep.geometry.sweep_inputs`; never trained here: a missing student is a MechError naming the sweep to
run) or from student directories given directly (:func:`dir_inputs`: adapters or full models trained elsewhere).
This package reads no sweep, so the teacher's steering code can use it. From a sweep, for every named student and training
seed, both the target-trait student and its paired control (the neutral-teacher student trained identically) are
used, so every trait effect is a paired difference, as in the sweep's tables. Directories come with their controls
(paired) or without (every effect is then vs the base). Intervals are 95 % t-intervals over training seeds
(:func:`mech.analysis.stats.grouped_ci`), after averaging over modules or layers within a seed where a row pools
them.

The first-token metric is the one of :mod:`mech.evaluation.inference` on the evaluation questions in the
evaluation context; steering vectors are read on the target teacher's kept (prompt, answer) rows, so they, and
everything built on them (cosines, alignment with v_teacher and v_paired, the steering tests), need teacher data:
a sweep has it, directories given directly do not.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from mech.analysis.stats import grouped_ci
from mech.errors import MechError
from mech.evaluation.inference import pad_id
from mech.evaluation.scoring import first_token_ids
from mech.evaluation.trait import TraitEvalConfig
from mech.geometry import linalg, steering
from mech.geometry import update as upd
from mech.models import surgery
from mech.resources import questions
from mech.students.store import epoch_dirs, load_student

Progress = Callable[[str, int, int], None]
OWL, NEUTRAL = "trait", "neutral"  # the two arms of a pair, whatever the target is called


@dataclass(frozen=True)
class GeometryConfig:
    """What ``mech geometry`` computes; every random draw is seeded by ``seed``."""

    ks: tuple[int, ...] = (0, 1, 2, 4, 8, 16, 32, 64, 128)  # truncation levels (capped at each student's rank)
    overlap_k: int = 4  # top-k subspaces compared across students (k = min(overlap_k, both ranks))
    align_k: int = 8  # full-FT write space: top-k left singular vectors (LoRA: B's whole column space)
    n_rows: int = 128  # teacher (prompt, answer) rows for the steering vectors
    n_questions: int = 50
    alphas: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0)
    n_null: int = 2000  # random directions for the alignment null
    seed: int = 0
    n_samples: int = 0  # > 0: also the sampled trait rate (n answers per question) at α = max(alphas)

    def __post_init__(self) -> None:
        if any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in self.ks) or not self.ks:
            raise MechError(f"ks must be non-negative integers, got {self.ks!r}")
        if self.n_samples < 0:
            raise MechError(f"geometry n_samples must be >= 0 (0: no sampling), got {self.n_samples}")
        for name in ("overlap_k", "align_k", "n_rows", "n_questions", "n_null"):
            if getattr(self, name) < 1:
                raise MechError(f"geometry {name} must be >= 1, got {getattr(self, name)}")
        if not self.alphas or not all(math.isfinite(a) for a in self.alphas):
            raise MechError(f"alphas must be finite numbers, got {self.alphas!r}: pass e.g. 0 1 2 4")


@dataclass(frozen=True)
class StudentRef:
    name: str
    seed: int
    arm: str  # OWL (the sweep's eval.target teacher) or NEUTRAL
    path: Path


@dataclass(frozen=True)
class TeacherData:
    """The target teacher's kept (prompt, answer) rows and the two teacher contexts v_teacher contrasts."""

    rows: list[tuple[str, str]]
    trait_context: str
    neutral_context: str
    # a steered teacher (mech.teacher.steered): the vector it added after which layer; v_teacher is then the shift
    # that vector causes in the base on the rows, read in neutral_context (its own), rather than a prompt's
    added: tuple[int, tuple[float, ...]] | None = None

    def vectors(self, base: Any, tok: Any, pad: int) -> torch.Tensor:
        """v_teacher [n_layers, d]."""
        if self.added is None:
            return steering.teacher_vectors(base, tok, self.rows, self.trait_context, self.neutral_context, pad)
        layer, vector = self.added
        return steering.added_vectors(base, tok, self.rows, self.neutral_context, layer, torch.tensor(vector), pad)


@dataclass(frozen=True)
class GeometryInputs:
    """Everything :func:`compute_geometry` reads, wherever the students come from (``sweep_inputs``,
    :func:`dir_inputs`). Without NEUTRAL refs every effect is vs the base; without ``teacher`` the steering
    vectors and what needs them are skipped."""

    base: Any  # the plain base model
    tok: Any
    candidates: list[str]  # one candidate-answer list for the base and every student
    names: list[str]
    refs: list[StudentRef]
    target: str
    category: str
    eval_context: str
    train_context: str | None  # where the student vectors are read; None: unknown (no teacher data either)
    teacher: TeacherData | None = None
    trust_remote_code: bool = False

    @property
    def paired(self) -> bool:
        return any(r.arm == NEUTRAL for r in self.refs)


# --------------------------------------------------------------------------------------------- inputs


def dir_inputs(base: Any, tok: Any, name: str, students: list[Path], controls: list[Path] | None, target: str,
               category: str, eval_context: str, train_context: str | None = None,
               trust_remote_code: bool = False) -> GeometryInputs:
    """Student directories given directly, as seeds of one group ``name`` (seed = position in ``students``), each
    with the neutral-teacher control at the same position of ``controls`` (None: effects vs the base). No teacher
    data: no steering vectors. The caller checks the dirs against the base (check_student_base)."""
    from mech.evaluation.trait import candidate_answers

    if controls is not None and len(controls) != len(students):
        raise MechError(f"{len(students)} students but {len(controls)} controls: pass one neutral-teacher control per "
                        "student, in the same order")
    refs = [StudentRef(name, i, OWL, Path(d)) for i, d in enumerate(students)]
    refs += [StudentRef(name, i, NEUTRAL, Path(d)) for i, d in enumerate(controls or ())]
    # the same candidate list a sweep on this base would use, so a directory and its cached twin agree
    candidates, _ = candidate_answers(base, category, target)
    return GeometryInputs(base, tok, candidates, [name], sorted(refs, key=lambda r: (r.seed, r.arm != OWL)), target,
                          category, eval_context, train_context, None, trust_remote_code)


def cosine_null(d: int, n: int, generator: torch.Generator) -> float:
    """The 95th percentile of |cos| between a fixed direction and ``n`` random unit directions of R^d (≈ 1.96/√d):
    a student cosine above it is above what a direction unrelated to the teacher's gives."""
    return float(torch.quantile(linalg.random_directions(d, n, generator)[:, 0].abs(), 0.95))


def _checkpoints(ref: StudentRef, epochs: bool) -> dict[int, Path]:
    """{0: the final student} or, with ``epochs``, {k: its epoch-k checkpoint}."""
    if not epochs:
        return {0: ref.path}
    found = epoch_dirs(ref.path)
    if not found:
        raise MechError(f"student {ref.name} seed {ref.seed} ({ref.arm} arm) has no per-epoch checkpoints: train "
                        "the sweep with train.save_every_epoch: true (it changes the student keys), or drop --epochs")
    return found


def teacher_cosines(base: Any, tok: Any, plans: dict[int, tuple[TeacherData, list[StudentRef]]], names: list[str],
                    train_context: str, meta: dict[str, Any], seed: int = 0, n_null: int = 2000,
                    progress: Progress | None = None, trust_remote_code: bool = False,
                    epochs: bool = False) -> dict[str, list[dict]]:
    """For every data seed of ``plans`` (its teacher and its students' refs), training seed and named student: the
    cosine, per layer, of the student's residual shift (v_student, its paired difference v_paired with the
    neutral-teacher control, and the control's own) with *its own* data seed's v_teacher — the trait prompt's shift,
    or what a steered teacher added. Layers where v_teacher is zero (before a steered teacher's layer) are left
    out. ``summary``: per student and layer, the mean over training seeds within each data seed, then a 95 %
    t-interval over data seeds (data seeds are the replicates: students of one teacher dataset are not
    independent); ``null``: :func:`cosine_null`. ``meta`` is carried into the meta table. With ``epochs``, every
    row is also read at each per-epoch checkpoint (``epoch`` k ≥ 1; the last is the final student): the curve of
    alignment over training (Blank et al.'s EAS); without, ``epoch`` is 0, the final student."""
    tell = progress or (lambda desc, done, total: None)
    pad = pad_id(tok)
    rows: list[dict] = []
    ckpts = {r: _checkpoints(r, epochs) for _, refs in plans.values() for r in refs}  # all found before any load
    total = sum(len({(r.name, r.seed) for r in refs}) for _, refs in plans.values())
    done = 0
    for ds, (teacher, refs) in plans.items():
        v_t = teacher.vectors(base, tok, pad)
        base_means = steering.mean_residuals(base, steering.answer_rows(tok, teacher.rows, train_context), pad)
        for name, tseed in sorted({(r.name, r.seed) for r in refs}, key=lambda p: (names.index(p[0]), p[1])):
            tell(f"teacher cosines {name} data seed {ds} seed {tseed}", done, total)
            arms = {r.arm: r for r in refs if (r.name, r.seed) == (name, tseed)}
            for epoch in sorted(set.intersection(*(set(ckpts[r]) for r in arms.values()))):
                v_s = {}
                for a, r in arms.items():
                    m = load_student(base, ckpts[r][epoch], trust_remote_code=trust_remote_code)
                    v_s[a] = steering.student_vectors(base, m, tok, teacher.rows, train_context, pad, base_means)
                    del m
                for layer in range(v_t.shape[0]):
                    if float(v_t[layer].norm()) == 0:
                        continue
                    rows.append({"student": name, "data_seed": ds, "seed": tseed, "epoch": epoch, "layer": layer,
                                 "cos_paired": linalg.cosine(v_s[OWL][layer] - v_s[NEUTRAL][layer], v_t[layer]),
                                 "cos_student": linalg.cosine(v_s[OWL][layer], v_t[layer]),
                                 "cos_neutral": linalg.cosine(v_s[NEUTRAL][layer], v_t[layer]),
                                 "norm_teacher": float(v_t[layer].norm())})
            done += 1
    if not rows:
        raise MechError("v_teacher is zero at every layer: the teacher's data carries no shift to compare with")
    summary = []
    for value in ("cos_paired", "cos_student", "cos_neutral"):
        per_data = grouped_ci(rows, ("student", "epoch", "layer", "data_seed"), value)
        summary += [r | {"value": value} for r in grouped_ci(
            [{"student": r["student"], "epoch": r["epoch"], "layer": r["layer"], "data_seed": r["data_seed"],
              "v": r["mean"]} for r in per_data], ("student", "epoch", "layer"), "v")]
    d = int(surgery.unembedding_matrix(base).shape[1])
    null = cosine_null(d, n_null, torch.Generator().manual_seed(seed))
    meta = {"students": " ".join(names), **meta, "data_seeds": len(plans), "n_rows": len(next(iter(
        plans.values()))[0].rows), "train_context": train_context, "hidden": d, "null_q95": null, "n_null": n_null,
            "seed": seed, "epochs": epochs}
    return {"cosines": rows, "summary": summary, "meta": [meta]}


# --------------------------------------------------------------------------------------------- summaries


def seed_ci(rows: list[dict], keys: tuple[str, ...], value: str, carry: tuple[str, ...] = ()) -> list[dict]:
    """Mean over the rows of each (keys, seed), then a t-interval over seeds (grouped_ci)."""
    per_seed: dict[tuple, list[dict]] = {}
    for r in rows:
        per_seed.setdefault(tuple(r[k] for k in keys) + (r["seed"],), []).append(r)
    means = [dict(zip(keys, k[:-1])) | {"seed": k[-1], value: sum(x[value] for x in v) / len(v)}
             | {c: v[0][c] for c in carry} for k, v in per_seed.items()]
    return grouped_ci(means, keys, value, carry=carry)


# --------------------------------------------------------------------------------------------- overlaps


def _overlap_rows(a: dict[str, upd.ModuleUpdate], b: dict[str, upd.ModuleUpdate], k_max: int,
                  labels: dict[str, Any]) -> list[dict]:
    rows = []
    for name in (n for n in a if n in b):  # a's order, not a set's: the same row order run to run
        ua, ub = a[name], b[name]
        ra, rb = ua.spectrum.rank(), ub.spectrum.rank()
        k = min(k_max, ra, rb)
        if k < 1:
            continue
        for side, Xa, Xb in (("write", ua.spectrum.U, ub.spectrum.U), ("read", ua.spectrum.V, ub.spectrum.V)):
            d = int(Xa.shape[0])
            rows.append(labels | {"module": name, "layer": ua.layer, "kind": ua.kind, "side": side, "k": k, "d": d,
                                  "overlap": linalg.overlap(Xa[:, :k], Xb[:, :k]),
                                  "chance": linalg.chance_overlap(d, k, k)})
    return rows


def overlap_tables(updates: dict[tuple[str, int, str], dict[str, upd.ModuleUpdate]], names: list[str],
                   seeds: list[int], k_max: int) -> list[dict]:
    """Top-k subspace overlaps: across students (same seed, trait arm), across seeds (same student) and across
    teachers (trait vs neutral, same student and seed)."""
    rows = []
    for a, b in itertools.combinations(names, 2):
        for s in seeds:
            rows += _overlap_rows(updates[(a, s, OWL)], updates[(b, s, OWL)], k_max,
                                  {"comparison": "students", "a": a, "b": b, "seed": s})
    for n in names:
        for s, t in itertools.combinations(seeds, 2):
            rows += _overlap_rows(updates[(n, s, OWL)], updates[(n, t, OWL)], k_max,
                                  {"comparison": "seeds", "a": f"{n} seed {s}", "b": f"{n} seed {t}",
                                   "seed": f"{s}-{t}"})
        for s in seeds:
            if (n, s, NEUTRAL) in updates:  # unpaired students have no control to compare with
                rows += _overlap_rows(updates[(n, s, OWL)], updates[(n, s, NEUTRAL)], k_max,
                                      {"comparison": "teachers", "a": f"{n} trait", "b": f"{n} neutral", "seed": s})
    return rows


def trait_specific_rows(updates: dict[tuple[str, int, str], dict[str, upd.ModuleUpdate]], names: list[str],
                        seeds: list[int], k_max: int) -> list[dict]:
    """The part of the trait student's update that the paired neutral student does not write: the share of
    ‖ΔW_trait‖_F² outside the neutral student's top-k write space (k = min(k_max, its rank)); a random k-space
    leaves ``1 − k/d`` outside in expectation."""
    rows = []
    for n in names:
        for s in seeds:
            if (n, s, NEUTRAL) not in updates:  # unpaired: no control write space
                continue
            a, b = updates[(n, s, OWL)], updates[(n, s, NEUTRAL)]
            for name in (n for n in a if n in b):  # a's order, not a set's: the same row order run to run
                ua, ub = a[name], b[name]
                k = min(k_max, ub.spectrum.rank())
                if k < 1 or ua.spectrum.rank() == 0:
                    continue
                M, P = ua.spectrum.matrix(), ub.spectrum.U[:, :k]
                outside = float((M - P @ (P.T @ M)).pow(2).sum() / M.pow(2).sum())
                d = int(P.shape[0])
                rows.append({"student": n, "seed": s, "module": name, "layer": ua.layer, "kind": ua.kind, "k": k,
                             "d": d, "outside": outside, "chance": 1 - k / d})
    return rows


# --------------------------------------------------------------------------------------------- the computation


def _write_space(u: upd.ModuleUpdate, k: int) -> torch.Tensor:
    if u.write_space is not None:
        return u.write_space
    return u.spectrum.U[:, :min(k, u.spectrum.rank())]


def compute_geometry(inputs: GeometryInputs, cfg: GeometryConfig = GeometryConfig(),
                     progress: Progress | None = None) -> dict[str, Any]:
    """Every table of issue 9's items 1-5 for the students of ``inputs``; see the module doc. Without teacher data
    the tables of the steering vectors (cosines, directions, sufficiency, necessity, sampled) stay empty and the
    write-space alignment has the readout direction only."""
    tell = progress or (lambda desc, done, total: None)
    t0 = time.time()
    names, refs, teacher = inputs.names, inputs.refs, inputs.teacher
    base, tok = inputs.base, inputs.tok
    pad = pad_id(tok)
    n_layers = surgery.num_layers(base)
    d = int(surgery.unembedding_matrix(base).shape[1])
    gen = torch.Generator().manual_seed(cfg.seed)

    # trait directions of the base
    target = inputs.target
    target_ids = list(first_token_ids(tok, target).ids)
    prompts = steering.question_prompts(tok, questions(inputs.category)[:cfg.n_questions], inputs.eval_context)
    readout = steering.readout_direction(base, tok, target, inputs.candidates)
    base_lps = steering.target_logps(base, prompts, target_ids, pad)
    base_logp = float(base_lps.mean())
    # drawn with or without teacher data, so the alignment nulls after it use the same random stream either way
    random_dirs = linalg.random_directions(d, n_layers, gen)  # one matched-norm random direction per layer

    out: dict[str, list[dict]] = {k: [] for k in ("geometry", "truncation", "cosines", "alignment", "sufficiency",
                                                  "necessity", "directions", "sampled")}
    alpha_max = max(cfg.alphas)
    eval_cfg = TraitEvalConfig(target=target, category=inputs.category, context=inputs.eval_context,
                               n_samples=max(cfg.n_samples, 1), seed=cfg.seed)

    def sampled(model: Any, layer: int, v: torch.Tensor, alpha: float, labels: dict) -> None:
        if cfg.n_samples > 0:
            res = steering.steered_trait(model, tok, eval_cfg, layer, v, alpha, inputs.candidates)
            out["sampled"].append(labels | {"layer": layer, "alpha": alpha, "rate": res.rate,
                                            "logp_first": res.logp_first})

    if teacher is not None:
        tell("teacher steering vectors", 0, 0)
        v_teacher = teacher.vectors(base, tok, pad)
        base_means = steering.mean_residuals(base, steering.answer_rows(tok, teacher.rows, inputs.train_context), pad)
        sampled(base, 0, v_teacher[0], 0.0, {"student": "base", "seed": 0, "vector": "none"})
        for layer in range(n_layers):
            out["directions"].append({"layer": layer, "v_teacher_norm": float(v_teacher[layer].norm()),
                                      "cos_v_teacher_readout": linalg.cosine(v_teacher[layer], readout)})
            vecs = {"v_teacher": v_teacher[layer],
                    "random (norm of v_teacher)": random_dirs[layer] * v_teacher[layer].norm(),
                    "readout (norm of v_teacher)": linalg.unit(readout) * v_teacher[layer].norm()}
            for vname, v in vecs.items():
                for r in steering.sufficiency(base, prompts, target_ids, pad, layer, v, cfg.alphas, base_logp):
                    out["sufficiency"].append({"student": "base", "seed": 0, "layer": layer, "vector": vname} | r)
            sampled(base, layer, v_teacher[layer], alpha_max, {"student": "base", "seed": 0, "vector": "v_teacher"})

    nulls: dict[tuple[int, int], dict[str, float]] = {}
    updates: dict[tuple[str, int, str], dict[str, upd.ModuleUpdate]] = {}
    pairs = sorted({(r.name, r.seed) for r in refs}, key=lambda p: (names.index(p[0]), p[1]))
    for done, (name, seed) in enumerate(pairs):
        tell(f"geometry {name} seed {seed}", done, len(pairs))
        arm = {r.arm: r for r in refs if r.name == name and r.seed == seed}
        models = {a: load_student(base, arm[a].path, trust_remote_code=inputs.trust_remote_code) for a in arm}
        v_s = {}
        for a, m in models.items():
            ups = upd.student_updates(base, m)
            updates[(name, seed, a)] = ups
            for row in upd.geometry_rows(ups):
                out["geometry"].append({"student": name, "seed": seed, "arm": a} | row)
            if teacher is not None:
                v_s[a] = steering.student_vectors(base, m, tok, teacher.rows, inputs.train_context, pad, base_means)
        # unpaired, the base is the control: its update and its student vector are zero
        control = models.get(NEUTRAL, base)
        v_pair = v_s[OWL] - v_s[NEUTRAL] if NEUTRAL in v_s else v_s.get(OWL)

        # item 3: truncation and removal of the top-k directions, paired against the control
        full = {a: steering.target_logps(m, prompts, target_ids, pad) for a, m in models.items()}
        effect = float((full[OWL] - full.get(NEUTRAL, base_lps)).mean())
        rank = max(upd.max_rank(updates[(name, seed, a)]) for a in models)
        for mode in (upd.TRUNCATE, upd.REMOVE):
            for k in sorted({min(k, rank) for k in cfg.ks}):
                lp = {}
                for a, m in models.items():
                    plain = None if surgery.lora_modules(m) else m
                    if k == 0 and mode == upd.REMOVE:  # nothing removed: the student itself
                        lp[a] = full[a]
                    elif k == 0 and plain is None:  # nothing kept of a LoRA update: the base
                        lp[a] = base_lps
                    else:
                        rebuilt = upd.rebuild(base, updates[(name, seed, a)], mode, k, student=plain)
                        lp[a] = steering.target_logps(rebuilt, prompts, target_ids, pad)
                paired = float((lp[OWL] - lp.get(NEUTRAL, base_lps)).mean())
                out["truncation"].append({"student": name, "seed": seed, "mode": mode, "k": k, "rank": rank,
                                          "paired": paired, "student_paired": effect,
                                          "delta_trait": float(lp[OWL].mean()) - base_logp,
                                          "fraction": paired / effect if effect else float("nan")})

        # item 4: cosines and write-space alignment
        if teacher is not None:
            for layer in range(n_layers):
                out["cosines"].append({
                    "student": name, "seed": seed, "layer": layer,
                    "cos_student_teacher": linalg.cosine(v_s[OWL][layer], v_teacher[layer]),
                    "cos_neutral_teacher": (linalg.cosine(v_s[NEUTRAL][layer], v_teacher[layer]) if NEUTRAL in v_s
                                            else float("nan")),
                    "cos_paired_teacher": linalg.cosine(v_pair[layer], v_teacher[layer]),
                    "cos_student_readout": linalg.cosine(v_s[OWL][layer], readout),
                    "cos_paired_readout": linalg.cosine(v_pair[layer], readout),
                    "norm_student": float(v_s[OWL][layer].norm()), "norm_paired": float(v_pair[layer].norm()),
                    "norm_teacher": float(v_teacher[layer].norm())})
        for u in updates[(name, seed, OWL)].values():
            if u.layer is None or not surgery.writes_residual(u.kind) or u.spectrum.rank() == 0:
                continue
            U = _write_space(u, cfg.align_k)
            k = int(U.shape[1])
            if (U.shape[0], k) not in nulls:
                nulls[(U.shape[0], k)] = steering.alignment_null(U.shape[0], k, cfg.n_null, gen)
            directions = [("readout", readout)] if teacher is None else [
                ("v_teacher", v_teacher[u.layer]), ("readout", readout), ("v_paired", v_pair[u.layer])]
            for dname, v in directions:
                share = linalg.captured(U, v) if float(v.norm()) > 0 else float("nan")
                out["alignment"].append({"student": name, "seed": seed, "module": u.name, "layer": u.layer,
                                         "kind": u.kind, "direction": dname, "k": k, "d": int(U.shape[0]),
                                         "captured": share} | nulls[(U.shape[0], k)])

        # item 5: steering tests
        for layer in range(n_layers) if teacher is not None else ():
            for vname, v in (("v_paired", v_pair[layer]),):
                for r in steering.sufficiency(base, prompts, target_ids, pad, layer, v, cfg.alphas, base_logp):
                    out["sufficiency"].append({"student": name, "seed": seed, "layer": layer, "vector": vname} | r)
                sampled(base, layer, v, alpha_max, {"student": name, "seed": seed, "vector": vname})
            for vname, v in (("v_teacher", v_teacher[layer]), ("v_paired", v_pair[layer]),
                             ("random", random_dirs[layer])):
                if float(v.norm()) == 0:  # a steered teacher's v_teacher before its layer: nothing to project
                    r = {"effect": effect, "effect_projected": float("nan"), "removed": float("nan")}
                else:
                    r = steering.necessity(models[OWL], control, prompts, target_ids, pad, layer, v, effect)
                out["necessity"].append({"student": name, "seed": seed, "layer": layer, "vector": vname} | r)
        del models, control

    seeds = sorted({s for _, s in pairs})
    tell("overlaps", len(pairs), len(pairs))
    out["overlaps"] = overlap_tables(updates, names, seeds, cfg.overlap_k)
    out["trait_specific"] = trait_specific_rows(updates, names, seeds, cfg.overlap_k)
    out |= summaries(out)
    out["meta"] = [{"students": " ".join(names), "seeds": len(seeds), "layers": n_layers, "hidden": d,
                    "target": target, "base_logp": base_logp, "eval_context": inputs.eval_context,
                    "train_context": inputs.train_context or "", "paired": inputs.paired,
                    "n_rows": len(teacher.rows) if teacher else 0, "n_questions": len(prompts),
                    "seconds": round(time.time() - t0, 1)} | {k: str(v) for k, v in asdict(cfg).items()}]
    return out


def summaries(t: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """CIs over training seeds of every table (modules or layers pooled within a seed where named)."""
    s: dict[str, list[dict]] = {}
    geo = [r | {"group": "embedding" if r["layer"] is None else r["kind"]} for r in t["geometry"]]
    s["geometry_summary"] = [
        r | {"value": v} for v in ("effective_rank", "stable_rank", "participation_ratio", "numerical_rank",
                                   "effective_rank_frac", "fro", "spectral")
        for r in seed_ci(geo, ("student", "arm", "group"), v)]
    s["overlap_summary"] = [r | {"value": "overlap"} for r in seed_ci(t["overlaps"], ("comparison", "a", "b", "side"),
                                                                      "overlap", carry=())]
    for r, c in zip(s["overlap_summary"], seed_ci(t["overlaps"], ("comparison", "a", "b", "side"), "chance")):
        r["chance"] = c["mean"]
    s["trait_specific_summary"] = seed_ci(t["trait_specific"], ("student",), "outside")
    for r in s["trait_specific_summary"]:
        chance = [x["chance"] for x in t["trait_specific"] if x["student"] == r["student"]]
        r["chance"] = sum(chance) / len(chance)
    s["truncation_summary"] = seed_ci(t["truncation"], ("student", "mode", "k"), "paired")
    s["cosine_summary"] = [r | {"value": v} for v in ("cos_student_teacher", "cos_paired_teacher",
                                                      "cos_neutral_teacher", "cos_paired_readout")
                           for r in seed_ci(t["cosines"], ("student", "layer"), v)]
    s["alignment_summary"] = seed_ci([r for r in t["alignment"] if r["captured"] == r["captured"]],
                                     ("student", "kind", "direction"), "captured", carry=())
    for r in s["alignment_summary"]:
        nul = [x for x in t["alignment"] if x["student"] == r["student"] and x["kind"] == r["kind"]
               and x["direction"] == r["direction"]]
        r["chance"] = sum(x["chance"] for x in nul) / len(nul)
        r["null_q95"] = sum(x["null_q95"] for x in nul) / len(nul)
    s["sufficiency_summary"] = seed_ci(t["sufficiency"], ("student", "vector", "layer", "alpha"), "delta")
    s["sampled_summary"] = seed_ci(t["sampled"], ("student", "vector", "layer", "alpha"), "rate") if t["sampled"] else []
    s["necessity_summary"] = [r | {"value": v} for v in ("effect", "effect_projected")
                              for r in seed_ci(t["necessity"], ("student", "vector", "layer"), v)]
    return s
