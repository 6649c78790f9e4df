"""Batched LoRA students: K LoRA students of one base trained together, one forward and one backward per step.

A sweep trains many LoRA students of one base (ranks × training seeds × datasets). Trained one at a time, each
runs the whole frozen base on its own batch. Here the base runs once per step over all K students' batches
stacked along the batch dimension (rows of student k form one contiguous block), and only the LoRA deltas run
per student, each on its own block. Every student is the one :func:`mech.students.train.train_model` would
have trained alone: bitwise when the students share their rows and batch plan, as the sweep batches them, else up
to float rounding (see *Equivalence*).

Design, and why:

* **One frozen copy of the base, projections wrapped.** Every projection some student adapts (found through
  :mod:`mech.models.surgery`, the only place that knows architectures) is replaced by a ``_StudentsLinear`` that
  runs the base projection once over all rows and adds, on each student's block of rows, that student's
  ``lora_B(lora_A(x)) · scaling`` computed as PEFT's ``Linear.forward`` computes it (x cast to the adapter's
  dtype, the sum cast back to the base's).
* **Each student keeps its own parameters at its own rank** (A [r_k, in], B [out, r_k]), not a zero-padded
  [K, r_max, ·] stack: padding rank 1 to 64 would do 64× its LoRA work, and separate parameters let each
  student's optimizer (:func:`mech.students.loop.make_optimizer` over its parameters, in its solo model's
  order) and gradient clipping (:func:`mech.students.loop.clip_and_step` over its parameters) be the solo
  run's primitives unchanged: a per-student lr schedule, step count and clipping norm come for free.
* **Initialisation is PEFT's own**: each student's A and B are copied from the model that
  :func:`mech.students.train.with_lora` builds for it under its seed (exactly as ``train_model`` builds it), and
  the same construction at the end gives each student back as a PEFT model that
  :mod:`mech.students.train`'s own writers save. A student dir written here is an ordinary student dir.
* **The objective is the sum of each student's own loss**: the mean cross-entropy over its own labelled tokens
  (:func:`mech.students.loop.completion_logits` split by row block). Rows never interact in a causal LM's
  forward, so the gradient of the sum on student k's parameters is its solo gradient. The unembedding runs at
  the labelled positions only (``labelled_only``): K students' dense [rows, seq, vocab] logits and their
  zero-filled gradient cost more than the base's own projections, and gave the same bits here.
* **Each student's LoRA runs on its own width**: the stack is padded to its longest row, but a student's delta is
  computed on the first ``width_k`` positions only (its solo batch's width), so the gradients of A and B sum over
  exactly the positions its solo run sums over, in the same order.
* **Each student keeps its own data**: its rows, its context, its batch order (``batch_order`` with its seed,
  through ``train._epochs``) and its lr schedule (``train._schedule``). Students of different lengths (fewer
  rows, fewer epochs, bigger batches) need not match: a student that has taken all its steps leaves the batch,
  and its optimizer is never stepped again, as if it had been trained alone.
* **Not batched** (:func:`unbatchable` says why; :func:`train_models` refuses them, the sweep trains them one at
  a time): full and matched-norm students (no LoRA), the distill objective (a second model per step), LoRA
  dropout > 0 (the solo run draws its dropout masks from the global RNG in an order a stacked forward cannot
  reproduce) and ``save_every_epoch`` (students reach their epochs at different steps).

Equivalence. Students on the same rows with the same :func:`batch_plan` (the sweep's batches: one dataset, one
training seed, any ranks, alphas, lrs and targets) get the same batch at every step, so every block of the stack
has its solo batch's shape; per row, the base's matmuls and attention then compute what they compute alone, and
the students come out bitwise equal to their solo runs (tests/test_batched_students.py checks torch.equal on
losses and weights; benchmarks/bench_batched.py on the quick sweep's four students). Students on other rows or
plans are padded beyond their own width for attention, whose blocked kernels then sum in another order: equal to
their solo runs within 1e-5 (absolute, per-step losses and final LoRA weights; the measured maximum is stated in
the test).

Speed: a solo step on the organism is already compute-bound (over half of it in matmuls of a few thousand rows;
with PEFT's dense forward a batch of 64 rows costs 4.9x a batch of 16), so stacking K batches saves per-op and
per-step overheads and the dense logits, not arithmetic, and the larger activations fit the caches worse. On the
quick sweep's four LoRA students (benchmarks/bench_batched.py --rows 950, one thread, a shared 2-core machine) the
batch trains 1.03-1.08x as fast as the four solo runs (three runs; 1.10x on 160 rows). Sweeps batch by default anyway: it
costs nothing in exactness, and the ratio at more threads or on a GPU, where a solo step is not compute-bound,
is the benchmark's to measure.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from mech.context import Context
from mech.errors import MechError
from mech.evaluation.inference import device_of, pad_id
from mech.models import surgery
from mech.store import atomic_dir
from mech.students.config import StudentConfig
from mech.students.encoding import IGNORE_INDEX, Example, collate, encode_rows
from mech.students.loop import clip_and_step, completion_logits, make_optimizer
from mech.students.train import (Progress, Trained, _check_finite, _diverged, _epochs, _final_fields, _save_student,
                                 _schedule, _seeded, _student_meta, _trainable_copy)

Cell = tuple[int, str]  # (layer, projection kind), as surgery.lora_modules keys them


@dataclass(frozen=True)
class Job:
    """One student of a batch: its training rows and its config."""

    rows: Sequence[dict]
    cfg: StudentConfig


def unbatchable(cfg: StudentConfig) -> str | None:
    """Why a student cannot be trained batched (None: it can)."""
    if cfg.method != "lora":
        return f"method {cfg.method!r}"
    if cfg.objective != "ce":
        return f"objective {cfg.objective!r}"
    if cfg.lora.dropout > 0:
        return f"LoRA dropout {cfg.lora.dropout:g}"
    if cfg.save_every_epoch:
        return "save_every_epoch"
    if cfg.micro_batch_size is not None:  # memory knobs of one big student: stacking students is the opposite
        return f"micro_batch_size {cfg.micro_batch_size}"
    if cfg.gradient_checkpointing:
        return "gradient_checkpointing"
    return None


def batch_plan(cfg: StudentConfig) -> tuple:
    """What fixes a student's batches given its rows (seed, context, batch size, epochs): students on the same rows
    with the same plan get the same rows at every step, so the stack pads none of them beyond its solo batch."""
    return cfg.seed, Context.parse(cfg.context).spec, cfg.batch_size, cfg.epochs


# --------------------------------------------------------------------------------------------- the stacked model


class _Routing:
    """Which rows of the batch in flight belong to which student: ``(student, first row, end row, width)`` blocks
    in row order, covering every row; ``width`` is the length of the student's longest row in the step (its solo
    batch's width). Set before each forward; shared by every wrapped projection."""

    def __init__(self) -> None:
        self.spans: list[tuple[int, int, int, int]] = []


class _StudentsLinear(nn.Module):
    """A frozen projection plus each student's LoRA delta on that student's rows."""

    def __init__(self, base_layer: nn.Module, routing: _Routing):
        super().__init__()
        self.base_layer = base_layer
        self.a = nn.ParameterDict()  # str(student) -> A [r, in]
        self.b = nn.ParameterDict()  # str(student) -> B [out, r]
        self.scaling: dict[int, float] = {}
        self.routing = routing

    def add(self, student: int, a: torch.Tensor, b: torch.Tensor, scaling: float) -> tuple[nn.Parameter, ...]:
        self.a[str(student)] = nn.Parameter(a.detach().clone())
        self.b[str(student)] = nn.Parameter(b.detach().clone())
        self.scaling[student] = float(scaling)
        return self.a[str(student)], self.b[str(student)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        spans = self.routing.spans
        width = x.shape[1]
        # split, not slicing: a slice's backward writes its gradient into a zero-filled tensor of the whole
        # batch (per slice, per module), a split's backward concatenates the blocks' gradients once
        xs = x.split([stop - start for _, start, stop, _ in spans])
        deltas = []
        for (k, _, _, own), xk in zip(spans, xs):
            if str(k) not in self.a:  # a student that does not adapt this projection adds nothing here
                deltas.append(xk.new_zeros(*xk.shape[:-1], result.shape[-1], dtype=result.dtype))
                continue
            a, b = self.a[str(k)], self.b[str(k)]
            # on the student's own width (its solo batch's), so the gradient of A and B sums over the very
            # positions its solo run sums over, in the same order: the stack's extra padding adds nothing
            xk = xk[:, :own].contiguous() if own < width else xk
            xk = xk if xk.dtype == a.dtype else xk.to(a.dtype)
            d = F.linear(F.linear(xk, a), b) * self.scaling[k]
            if own < width:
                d = torch.cat([d, d.new_zeros(d.shape[0], width - own, d.shape[2])], dim=1)
            deltas.append(d)
        delta = deltas[0] if len(deltas) == 1 else torch.cat(deltas)
        # PEFT's vanilla LoRA forward term for term (x cast to the adapter dtype, base + delta, cast back), so
        # each student's rows see what its solo run sees
        return (result + delta).to(result.dtype)


def _adapter_weights(solo) -> dict[Cell, tuple[torch.Tensor, torch.Tensor, float]]:
    """(A, B, scaling) of each LoRA projection of a solo PEFT student."""
    out = {}
    for cell, layer in surgery.lora_modules(solo).items():
        (name,) = layer.lora_A.keys()  # with_lora adds one adapter
        out[cell] = (layer.lora_A[name].weight, layer.lora_B[name].weight, float(layer.scaling[name]))
    return out


@dataclass
class _Student:
    examples: list[Example]
    cfg: StudentConfig
    params: list[nn.Parameter]  # in the solo model's parameter order, so clipping sums in the solo's order
    weights: dict[Cell, tuple[nn.Parameter, nn.Parameter]]
    optimizer: torch.optim.Optimizer
    total: int
    lr_at: Any
    batches: Any


def _stack(base_model, tokenizer, jobs: Sequence[Job]) -> tuple[Any, _Routing, list[_Student]]:
    """The frozen copy of the base with every student's LoRA in place, and each student's training state."""
    model = copy.deepcopy(base_model)
    model.requires_grad_(False)
    routing = _Routing()
    layers = surgery.get_layers(model)
    wrapped: dict[Cell, _StudentsLinear] = {}
    students = []
    for k, job in enumerate(jobs):
        with _seeded(job.cfg.seed, device_of(base_model)):  # as train_model builds it
            solo, solo_params = _trainable_copy(base_model, job.cfg)
        weights: dict[Cell, tuple[nn.Parameter, nn.Parameter]] = {}
        ids: dict[int, nn.Parameter] = {}
        for (i, kind), (a, b, scaling) in _adapter_weights(solo).items():
            if (i, kind) not in wrapped:
                wrapped[(i, kind)] = _StudentsLinear(surgery.get_projection(layers[i], kind), routing)
                surgery.set_projection(layers[i], kind, wrapped[(i, kind)])
            weights[(i, kind)] = wrapped[(i, kind)].add(k, a, b, scaling)
            ids[id(a)], ids[id(b)] = weights[(i, kind)]
        # a trainable parameter outside the decoder projections (PEFT matching a same-named module elsewhere, e.g.
        # a vision tower) never sees text, so alone it gets no gradient and stays at its init: leaving it out of
        # the batch is the same, and _materialise rebuilds it from the same seed
        params = [ids[id(p)] for p in solo_params if id(p) in ids]
        del solo, solo_params
        _, total, lr_at = _schedule(len(job.rows), job.cfg)
        students.append(_Student(encode_rows(tokenizer, job.rows, job.cfg.context), job.cfg, params, weights,
                                 make_optimizer(params, job.cfg), total, lr_at, _epochs(len(job.rows), job.cfg)))
    return model, routing, students


def _describe(k: int, cfg: StudentConfig) -> str:
    return f"batched student {k} (rank {cfg.lora.rank}, seed {cfg.seed})"


def _fit_stack(model, routing: _Routing, students: list[_Student], pad: int,
               progress: Progress | None) -> list[list[float]]:
    """Train every student to its last step; returns each one's per-step losses. Leaves the model in eval mode."""
    losses: list[list[float]] = [[] for _ in students]
    longest = max(s.total for s in students)
    model.train()
    for step in range(longest):
        active = [k for k, s in enumerate(students) if step < s.total]
        rows = {k: next(students[k].batches) for k in active}
        batch = collate([students[k].examples[i] for k in active for i in rows[k]], pad, device_of(model))
        spans, start = [], 0
        for k in active:
            own = max(len(students[k].examples[i].input_ids) for i in rows[k])  # the width collate gives it alone
            spans.append((k, start, start + len(rows[k]), own))
            start += len(rows[k])
        routing.spans = spans
        for k in active:
            for group in students[k].optimizer.param_groups:
                group["lr"] = students[k].lr_at(step)
        logits, targets = completion_logits(model, batch, labelled_only=True)
        labelled = (batch.labels[:, 1:] != IGNORE_INDEX).sum(1).tolist()
        counts = [sum(labelled[a:b]) for _, a, b, _ in spans]
        step_losses = [F.cross_entropy(lg, t) for lg, t in zip(logits.split(counts), targets.split(counts))]
        for k in active:
            students[k].optimizer.zero_grad(set_to_none=True)
        torch.stack(step_losses).sum().backward()
        for k in active:
            clip_and_step(students[k].optimizer, students[k].params, students[k].cfg.grad_clip)
        for k, loss in zip(active, step_losses):
            losses[k].append(float(loss.detach()))
            if not math.isfinite(losses[k][-1]):  # stop at once, as a solo run does
                _diverged(students[k].cfg, f"{_describe(k, students[k].cfg)}: the loss of step {step + 1} is "
                                           f"{losses[k][-1]}")
        if progress:
            progress(step + 1, longest, sum(losses[k][-1] for k in active) / len(active))
    routing.spans = []
    model.eval()
    return losses


def _materialise(base_model, student: _Student):
    """The student as the PEFT model a solo run ends with: with_lora under its seed, its trained A and B in place."""
    with _seeded(student.cfg.seed, device_of(base_model)):
        solo, _ = _trainable_copy(base_model, student.cfg)
    with torch.no_grad():
        for cell, (a, b, _) in _adapter_weights(solo).items():
            trained_a, trained_b = student.weights[cell]
            a.copy_(trained_a)
            b.copy_(trained_b)
    return solo.eval()


def _check_jobs(jobs: Sequence[Job]) -> None:
    if not jobs:
        raise MechError("no students to train: pass at least one Job(rows, cfg)")
    for k, job in enumerate(jobs):
        if not job.rows:
            raise MechError(f"batched student {k}: no training rows (the dataset is empty; check the filter audit)")
        why = unbatchable(job.cfg)
        if why is not None:
            raise MechError(f"batched student {k} cannot be batched ({why}): batching covers LoRA students on the "
                            "ce objective without dropout or per-epoch checkpoints; train it alone with train_student")


def _train(base_model, tokenizer, jobs: Sequence[Job], progress: Progress | None) -> tuple[list[_Student],
                                                                                            list[list[float]], float]:
    _check_jobs(jobs)
    t0 = time.perf_counter()
    model, routing, students = _stack(base_model, tokenizer, jobs)
    losses = _fit_stack(model, routing, students, pad_id(tokenizer), progress)
    for s in students:
        _check_finite(s.params, s.cfg)
    return students, losses, time.perf_counter() - t0


def train_models(base_model, tokenizer, jobs: Sequence[Job], progress: Progress | None = None) -> list[Trained]:
    """Train every job's LoRA student from ``base_model`` (never modified) in one batched run; returns each as
    :func:`mech.students.train.train_model` would (``wall_seconds``: the whole batch's). ``progress(step, total,
    mean loss of the students still training)`` after every step."""
    students, losses, seconds = _train(base_model, tokenizer, jobs, progress)
    return [Trained(_materialise(base_model, s), losses[k], len(jobs[k].rows), seconds)
            for k, s in enumerate(students)]


def train_students(base_model, tokenizer, jobs: Sequence[Job], out_dirs: Sequence[str | Path],
                   base_spec: str = "organism", progress: Progress | None = None, overwrite: bool = False) -> list[Path]:
    """Train every job's LoRA student in one batched run and write each to its ``out_dirs`` entry (atomically, in
    :func:`mech.students.train.train_student`'s format; student.json adds ``batch``: its size and this student's
    index, and ``train_seconds`` is the whole batch's). Returns the dirs."""
    outs = [Path(p) for p in out_dirs]
    if len(outs) != len(jobs):
        raise MechError(f"{len(jobs)} students but {len(outs)} output dirs: give one dir per student")
    for out in outs:
        if out.exists() and not overwrite:
            raise MechError(f"student dir {out} already exists: delete it or pass overwrite=True")
    metas = [_student_meta(base_model, job.rows, job.cfg, base_spec, None) for job in jobs]
    t0 = time.perf_counter()
    students, losses, seconds = _train(base_model, tokenizer, jobs, progress)
    for k, (s, out) in enumerate(zip(students, outs)):
        trained = Trained(_materialise(base_model, s), losses[k], len(jobs[k].rows), seconds)
        meta = metas[k] | _final_fields(trained, s.cfg, t0) | {"batch": {"size": len(jobs), "index": k}}
        with atomic_dir(out, overwrite=overwrite) as tmp:
            _save_student(trained.model, tmp, meta, s.cfg, base_model, tokenizer, base_spec, None)
        del trained  # one materialised copy of the base at a time
    return outs
