"""Training students on chat rows: LoRA through PEFT, full finetuning, and the matched-update-norm control.

Rows and what carries loss: mech.students.encoding. Configs: mech.students.config. The loop, optimizers, lr
schedule and losses: mech.students.loop. The matched-norm rescaling: mech.students.matched_norm; the matched-loss
stop: mech.students.matched_loss.

Objectives:

* ``ce``: cross-entropy on the teacher's sampled tokens (the rows' assistant text);
* ``distill``: per-token KL(teacher || student) between full next-token distributions on the completion
  tokens, the teacher's logits computed on the fly from a :class:`Teacher` (a model and the context it is
  rendered in, e.g. a trait system prompt). Distillation from stored top-k logits is not implemented.

Methods: ``lora`` (PEFT LoRA on the projections in ``LoraSpec.targets``), ``full`` (every parameter), and
``matched_norm`` (full finetuning whose update is then rescaled to the update norm of a reference LoRA
student, :func:`match_update_norms`), and ``matched_loss`` (full finetuning stopped at the first step its
trailing-mean training loss reaches a reference LoRA student's final one, mech.students.matched_loss). Over a bf16 / fp16 base, full and matched-norm students keep float32
master weights and compute under autocast to the base's dtype (``precision: auto``), so their updates and
update norms are exact; ``precision: native`` trains in the base's dtype.

``seed`` drives the LoRA initialisation, the data order and any dropout; on one device the same config
gives bitwise-identical weights. :func:`train_student` writes a student directory (see mech.students.store).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from mech.context import Context
from mech.errors import MechError
from mech.evaluation.inference import device_of, eval_mode, pad_id
from mech.models import surgery
from mech.models.loader import canonical_base_name, model_fingerprint, record_adapter_base
from mech.store import atomic_dir, atomic_write_json
from mech.students import store as students
from mech.students.config import LoraSpec, StudentConfig, Teacher
from mech.students.distributed import Dist, barrier, broadcast_params, everywhere, full_state, shard, sync
from mech.students.encoding import Example, batch_order, collate, encode_rows
from mech.students.loop import completion_loss, distill_batch_loss, lr_factor, make_optimizer, train_loop
from mech.students.matched_loss import reached, reference_loss, trailing_mean
from mech.students.matched_norm import match_update_norms, reference_norms

STUDENT_FORMAT = 1

Progress = Callable[[int, int, float], None]  # (step, total steps, loss of that step)
OnEpoch = Callable[[int, Any, list[float]], None]  # (epoch, 1-based; the model, in eval mode; losses so far)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    """Seed torch for the block without disturbing the caller's RNG state afterwards."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def with_lora(model, spec: LoraSpec, seed: int):
    """Wrap ``model`` (in place) in a PEFT LoRA; ``seed`` draws the A matrices (B starts at zero)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=spec.rank, lora_alpha=spec.lora_alpha, lora_dropout=spec.dropout, use_rslora=spec.use_rslora,
                     target_modules=surgery.target_modules(spec.targets), bias="none", task_type="CAUSAL_LM")
    with _seeded(seed, device_of(model)), warnings.catch_warnings():
        # peft 0.21 reads transformers' deprecated is_gradient_checkpointing: noise, not a fault of ours
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated")
        return get_peft_model(model, cfg)


def _trainable_copy(base_model, cfg: StudentConfig, share_base: bool = False):
    """A deep copy of the base set up for ``cfg.method``, and the parameters to optimise; ``share_base`` (LoRA
    only): the adapters are put on the base itself, no copy (mech.students.store.lent_base takes them off)."""
    if surgery.unwrap(base_model) is not base_model:
        raise MechError("the base model is PEFT-wrapped: pass the plain base model (merge it first with "
                        "mech.students.store.merged)")
    surgery.base_causal_lm(base_model)  # unknown architecture -> MechError before any work
    model = base_model if share_base and cfg.method == "lora" else copy.deepcopy(base_model)
    if cfg.method == "lora":
        model = with_lora(model, cfg.lora, cfg.seed)
    else:
        if _master_weights(base_model, cfg):
            model.float()  # a bf16 optimizer step rounds small updates away; float32 master weights keep them
        model.requires_grad_(True)
    return model, [p for p in model.parameters() if p.requires_grad]


def _master_weights(base_model, cfg: StudentConfig) -> bool:
    """Whether a full / matched-norm student trains float32 copies of a lower-precision base."""
    return (cfg.method != "lora" and cfg.precision == "auto"
            and next(base_model.parameters()).dtype in (torch.bfloat16, torch.float16))


def _check_checkpointing(base_model, cfg: StudentConfig) -> None:
    if cfg.gradient_checkpointing and not getattr(base_model, "supports_gradient_checkpointing", False):
        raise MechError(f"{type(base_model).__name__} cannot checkpoint its activations (transformers' "
                        "supports_gradient_checkpointing is False): set gradient_checkpointing to false")


@contextlib.contextmanager
def _checkpointing(model, cfg: StudentConfig):
    """transformers' activation checkpointing of every decoder layer (non-reentrant, its default) for the block.

    It also makes the embeddings' output require grad (``enable_input_require_grads``), which a frozen base under
    LoRA needs for the gradient to reach the adapters through a checkpointed layer; both are undone after, so the
    model handed back computes as any other."""
    if not cfg.gradient_checkpointing:
        yield
        return
    hf = surgery.unwrap(model)
    enable = getattr(hf, "activation_checkpointing_enable", None) or hf.gradient_checkpointing_enable
    disable = getattr(hf, "activation_checkpointing_disable", None) or hf.gradient_checkpointing_disable
    # transformers then drops the KV cache a training forward never uses, with a warning: noise, not a fault
    quiet = logging.getLogger("transformers.utils.generic")
    no_cache_note = _DropMessage("is incompatible with gradient checkpointing")
    enable()
    quiet.addFilter(no_cache_note)
    try:
        yield
    finally:
        quiet.removeFilter(no_cache_note)
        disable()
        if hasattr(hf, "_require_grads_hook"):
            hf.disable_input_require_grads()


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def _compute_precision(base_model, cfg: StudentConfig):
    """Autocast to the base's dtype over float32 master weights (the speed of bf16, the updates of float32).

    Without autocast's weight cache: it keeps the low-precision cast of each weight until the context closes, and
    the context spans all of training, so after the optimizer's first in-place update every forward would compute
    with the first step's weights (losses 6.43 -> 6.17 in four SGD steps on a tiny bf16 model, vs 6.43 -> 4.12
    uncached; tests/test_distributed.py)."""
    if not _master_weights(base_model, cfg):
        return contextlib.nullcontext()
    return torch.autocast(device_of(base_model).type, dtype=next(base_model.parameters()).dtype, cache_enabled=False)


# --------------------------------------------------------------------------------------------- the objective


@dataclass(frozen=True)
class _Distill:
    model: Any
    examples: list[Example]


def _teacher_examples(tokenizer, rows: Sequence[dict], student: list[Example], teacher: Teacher) -> _Distill:
    ex = encode_rows(tokenizer, rows, teacher.context)
    for i, (s, t) in enumerate(zip(student, ex)):
        if s.targets != t.targets:
            raise MechError(f"row {i}: its completion tokenises differently in the teacher context "
                            f"{teacher.context!r}; use contexts that leave the assistant turn's tokens alone")
    return _Distill(teacher.model, ex)


def _batch_loss(model, batch: list[int], examples: list[Example], distill: _Distill | None, pad: int):
    """The objective on the rows ``batch`` (indices into ``examples``)."""
    student = collate([examples[i] for i in batch], pad, device_of(model))
    if distill is None:
        return completion_loss(model, student)
    teacher = collate([distill.examples[i] for i in batch], pad, device_of(distill.model))
    return distill_batch_loss(model, student, distill.model, teacher)


def _tokens(examples: list[Example], rows: list[int]) -> int:
    """Labelled tokens of ``rows``: what a batch's mean loss is a mean over."""
    return sum(len(examples[i].targets) for i in rows)


def _split(examples: list[Example], cfg: StudentConfig, dist: Dist | None):
    """The (micro-batch, weight) parts one process computes of each global batch (mech.students.loop.train_loop),
    or None when it computes every batch whole. A process takes every ``world_size``-th row from its rank on, in
    micro-batches of ``micro_batch_size`` rows; each part's mean loss is weighted by its labelled tokens over the
    global batch's, so the weighted sum over parts and processes is the global batch's mean loss, and its gradient
    the global batch's gradient. Every process knows every row, so the global count needs no communication.
    Under FSDP, whose forwards are collectives, every process runs as many parts as the busiest one: the others
    add parts of weight 0 (a row of the batch, computed for nothing)."""
    if dist is None and cfg.micro_batch_size is None:
        return None

    def split(batch: list[int]) -> list[tuple[list[int], float]]:
        mine = batch if dist is None else batch[dist.rank::dist.world_size]
        size, total = cfg.micro_batch_size or max(1, len(mine)), _tokens(examples, batch)
        parts = [(part, _tokens(examples, part) / total) for part in (mine[s:s + size] for s in range(0, len(mine), size))]
        if dist is not None and dist.fsdp:
            busiest = math.ceil(len(batch) / dist.world_size)
            parts += [(batch[:1], 0.0)] * (math.ceil(busiest / (cfg.micro_batch_size or busiest)) - len(parts))
        return parts

    return split


def check_fsdp_method(cfg: StudentConfig, fsdp: bool, name: str = "FSDP") -> None:
    """FSDP is for full finetuning (mech train checks it before loading anything, ``name`` then its flag)."""
    if fsdp and cfg.method == "lora":
        raise MechError(f"{name} shards full finetuning; a LoRA student's adapters are small: drop --fsdp (plain "
                        "data parallelism) or use --method full")


def _check_world(cfg: StudentConfig, dist: Dist | None) -> None:
    if dist is None:
        return
    if cfg.batch_size < dist.world_size:
        raise MechError(f"batch_size {cfg.batch_size} is smaller than the {dist.world_size} processes: each process "
                        "computes its share of a batch's rows, so use at least as many rows per batch as processes")
    if cfg.lora.dropout > 0 and cfg.method == "lora":
        raise MechError("LoRA dropout under torchrun would draw the same masks on every process for different rows: "
                        "set lora.dropout to 0 or train in one process")
    check_fsdp_method(cfg, dist.fsdp)
    if dist.fsdp and cfg.save_every_epoch:
        raise MechError("save_every_epoch is not built under FSDP (each checkpoint would gather the sharded model): "
                        "drop --fsdp or save_every_epoch")


def _check_objective(cfg: StudentConfig, teacher: Teacher | None) -> None:
    if cfg.objective == "distill" and teacher is None:
        raise MechError("objective 'distill' needs a teacher: pass teacher=Teacher(model, context)")
    if cfg.objective != "distill" and teacher is not None:
        raise MechError(f"a teacher was passed but objective is {cfg.objective!r}: set objective to 'distill' or "
                        "drop the teacher")


# --------------------------------------------------------------------------------------------- training


@dataclass
class Trained:
    """A trained student in memory: ``model`` (a PeftModel for LoRA, else a plain model) and its history."""

    model: Any
    losses: list[float]
    n_rows: int
    wall_seconds: float

    @property
    def n_steps(self) -> int:
        return len(self.losses)


def _epochs(n_rows: int, cfg: StudentConfig) -> Iterator[list[int]]:
    """Every batch of every epoch, as row indices."""
    for epoch in range(cfg.epochs):
        yield from batch_order(n_rows, cfg.batch_size, cfg.seed, epoch)


def _schedule(n_rows: int, cfg: StudentConfig) -> tuple[int, int, Callable[[int], float]]:
    """(steps per epoch, total steps, the lr of each 0-based step) of a student on ``n_rows`` rows."""
    per_epoch = math.ceil(n_rows / cfg.batch_size)
    total = per_epoch * cfg.epochs

    def lr_at(step: int) -> float:
        return cfg.lr * lr_factor(step, total, cfg.warmup_steps, cfg.schedule)

    return per_epoch, total, lr_at


def _fit(model, params, examples: list[Example], cfg: StudentConfig, pad: int, distill: _Distill | None,
         progress: Progress | None, on_epoch: OnEpoch | None, stop_loss: float | None = None,
         dist: Dist | None = None) -> list[float]:
    """A student's batches, loss, lr schedule and hooks, handed to the one loop; with ``stop_loss``, training
    stops at the first step whose trailing-mean loss reaches it (the matched-loss control). ``micro_batch_size``
    and ``dist`` split each batch (:func:`_split`); under ``dist`` the gradients and losses are summed over the
    processes after each step's backward, so every process steps alike and sees the same losses."""
    per_epoch, total, lr_at = _schedule(len(examples), cfg)

    def student_loss(m, batch: list[int]) -> torch.Tensor:
        return _batch_loss(m, batch, examples, distill, pad)

    def on_step(step: int, losses: list[float]) -> None:
        if not math.isfinite(losses[-1]):  # stop at once: every later step only spreads the NaN
            _diverged(cfg, f"the loss of step {step} is {losses[-1]}")
        if progress:
            progress(step, total, losses[-1])
        if on_epoch is not None and step % per_epoch == 0:
            with eval_mode(model):
                on_epoch(step // per_epoch, model, losses)
        return stop_loss is not None and reached(losses, stop_loss, cfg.matched_loss_window)

    reduce = None if dist is None else (lambda loss: sync(params, loss, dist))
    return train_loop(model, params, _epochs(len(examples), cfg), student_loss, make_optimizer(params, cfg), lr_at,
                      cfg.grad_clip, on_step, _split(examples, cfg, dist), reduce)


def _diverged(cfg: StudentConfig, what: str) -> None:
    raise MechError(f"training diverged at lr {cfg.lr:g}: {what}; lower the lr")


def _check_finite(params, cfg: StudentConfig, dist: Dist | None = None) -> None:
    """A student with a NaN or inf weight would be cached and break every later evaluation: refuse it here (under
    FSDP each process sees its shards, and they agree on the verdict)."""
    with torch.no_grad():
        finite = all(bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()) for p in params)
    if dist is not None and dist.fsdp:
        finite = everywhere(finite, dist.device)
    if not finite:
        _diverged(cfg, "the trained weights are not finite")


def _unsharded(model, base_model, cfg: StudentConfig, dist: Dist):
    """An FSDP-trained student as a plain model on rank 0, in the base's place and its master weights' dtype (None
    on the other ranks). Every rank must call it: it gathers the shards."""
    state = full_state(model, dist)
    if state is None:
        return None
    plain = copy.deepcopy(base_model)
    if _master_weights(base_model, cfg):
        plain.float()
    plain.load_state_dict(state)
    return plain


def train_model(base_model, tokenizer, rows: Sequence[dict], cfg: StudentConfig, teacher: Teacher | None = None,
                progress: Progress | None = None, on_epoch: OnEpoch | None = None,
                stop_loss: float | None = None, dist: Dist | None = None, share_base: bool = False) -> Trained:
    """Train a student from a deep copy of ``base_model`` (never modified) on chat ``rows`` in ``cfg.context``.

    ``matched_norm`` trains plain full finetuning here; the rescaling is :func:`match_update_norms`.
    ``matched_loss`` stops at ``stop_loss`` (:func:`mech.students.matched_loss.reference_loss`), or at the end.
    ``progress(step, total, loss)`` after every step; ``on_epoch(k, model, losses)`` after epoch k.
    ``dist`` (mech.students.distributed.process_group): this process is one of several training the same student,
    each on its share of every batch; every process gets the same student back (under FSDP, its shards:
    :func:`_unsharded` gathers them). ``share_base`` (LoRA): the adapters go on ``base_model`` itself instead
    of a copy; call inside mech.students.store.lent_base, which takes them off again.
    """
    if not rows:
        raise MechError("no training rows: the dataset is empty (check the filter audit)")
    _check_objective(cfg, teacher)
    _check_world(cfg, dist)
    _check_checkpointing(base_model, cfg)
    examples = encode_rows(tokenizer, rows, cfg.context)
    distill = _teacher_examples(tokenizer, rows, examples, teacher) if teacher is not None else None
    t0 = time.perf_counter()
    with _seeded(cfg.seed, device_of(base_model)):
        model, params = _trainable_copy(base_model, cfg, share_base)
        if dist is not None:
            broadcast_params(params)
        if dist is not None and dist.fsdp:
            params = shard(model, surgery.get_layers(model))
        with _compute_precision(base_model, cfg), _checkpointing(model, cfg):
            losses = _fit(model, params, examples, cfg, pad_id(tokenizer), distill, progress, on_epoch, stop_loss,
                          dist)
    _check_finite(params, cfg, dist)
    return Trained(model, losses, len(rows), time.perf_counter() - t0)


@torch.no_grad()
def kl_to_teacher(model, tokenizer, rows: Sequence[dict], context: str, teacher: Teacher,
                  batch_size: int = 16) -> float:
    """Mean per-token KL(teacher || model) on the rows' completion tokens, ``model`` seeing ``context``."""
    examples = encode_rows(tokenizer, rows, context)
    distill = _teacher_examples(tokenizer, rows, examples, teacher)
    pad, total, n = pad_id(tokenizer), 0.0, 0
    with eval_mode(model):
        for s in range(0, len(examples), batch_size):
            batch = list(range(s, min(s + batch_size, len(examples))))
            k = sum(len(examples[i].targets) for i in batch)
            total += float(_batch_loss(model, batch, examples, distill, pad)) * k
            n += k
    return total / max(1, n)


# --------------------------------------------------------------------------------------------- student dirs


def _versions() -> dict[str, str]:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def _write_model(model, path: Path, cfg: StudentConfig, base_model, tokenizer, base_spec: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if cfg.kind == students.LORA:
        # save_embedding_layers=False: "auto" would look the base up (possibly on the hub) at every save
        model.save_pretrained(str(path), save_embedding_layers=False)
        record_adapter_base(path, base_model, base_spec)
    else:
        surgery.unwrap(model).save_pretrained(str(path), safe_serialization=True)
        tokenizer.save_pretrained(str(path))


def _save_student(model, path: Path, meta: dict, cfg: StudentConfig, base_model, tokenizer, base_spec: str,
                  reference: dict[str, float] | None) -> None:
    """Write one student dir (final or an epoch checkpoint); a matched_norm model is rescaled first."""
    meta = dict(meta)
    if cfg.method == "matched_norm":
        assert reference is not None
        unscaled = students.update_norms(base_model, model)
        scales = match_update_norms(base_model, model, reference, cfg.matched_norm_scope)
        meta["matched_norm"] = {"reference": str(Path(cfg.matched_norm_reference or "").resolve()),
                                "scope": cfg.matched_norm_scope, "reference_norms": reference,
                                "unscaled_norms": unscaled, "scales": scales}
    meta["update_norms"] = students.update_norms(base_model, model)
    _write_model(model, path, cfg, base_model, tokenizer, base_spec)
    atomic_write_json(path / students.STUDENT_JSON, meta)


def _student_meta(base_model, rows: Sequence[dict], cfg: StudentConfig, base_spec: str,
                  teacher: Teacher | None) -> dict:
    """What every student.json of this training records."""
    return {
        "format": STUDENT_FORMAT,
        "kind": cfg.kind,
        "method": cfg.method,
        "config": cfg.to_dict(),
        "context": Context.parse(cfg.context).spec,
        "objective": cfg.objective,
        "teacher": None if teacher is None else {"context": Context.parse(teacher.context).spec,
                                                 "fingerprint": model_fingerprint(teacher.model)},
        "base_spec": canonical_base_name(base_spec),
        "base_fingerprint": model_fingerprint(base_model),
        "n_rows": len(rows),
        "versions": _versions(),
    }


def train_student(base_model, tokenizer, rows: Sequence[dict], cfg: StudentConfig, out_dir, base_spec: str = "organism",
                  teacher: Teacher | None = None, progress: Progress | None = None, overwrite: bool = False,
                  dist: Dist | None = None) -> Path:
    """Train a student and write its directory atomically (see mech.students.store for the layout); returns it.

    ``base_spec`` names the base in the adapter stamp and student.json (its fingerprint is recorded too).
    An existing ``out_dir`` is a MechError unless ``overwrite``. Under ``dist`` every process trains and rank 0
    alone writes; the others wait for it at a barrier (and return the same path).
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise MechError(f"student dir {out} already exists: delete it or pass overwrite=True")
    _check_objective(cfg, teacher)
    references = reference_norms(base_model, cfg) if cfg.method == "matched_norm" else {}
    stop_loss = reference_loss(cfg) if cfg.method == "matched_loss" else None
    share = cfg.method == "lora"  # a LoRA student borrows the base (no 15 GB copy of a 7B base per student)
    if dist is not None and not dist.is_main:
        with students.lent_base(base_model):
            trained = train_model(base_model, tokenizer, rows, cfg, teacher, None, None, stop_loss, dist, share)
            if dist.fsdp:
                _unsharded(trained.model, base_model, cfg, dist)  # rank 0 gathers the shards to write them
        barrier()
        return out
    meta = _student_meta(base_model, rows, cfg, base_spec, teacher)
    if dist is not None:
        meta["world_size"] = dist.world_size
        if dist.fsdp:
            meta["fsdp"] = True
    t0 = time.perf_counter()
    with atomic_dir(out, overwrite=overwrite) as tmp, students.lent_base(base_model):

        def on_epoch(k: int, model, losses: list[float]) -> None:
            if not cfg.save_every_epoch:
                return
            snapshot = copy.deepcopy(model) if cfg.method == "matched_norm" else model  # rescaling edits weights
            _save_student(snapshot, tmp / f"{students.EPOCH_PREFIX}{k}",
                          meta | {"epoch": k, "losses": list(losses), "n_steps": len(losses),
                                  "wall_seconds": time.perf_counter() - t0},
                          cfg, base_model, tokenizer, base_spec, references.get(k))

        trained = train_model(base_model, tokenizer, rows, cfg, teacher, progress, on_epoch, stop_loss, dist, share)
        if dist is not None and dist.fsdp:
            trained.model = _unsharded(trained.model, base_model, cfg, dist)
        final = _final_fields(trained, cfg, t0)
        if stop_loss is not None:
            w = cfg.matched_loss_window
            final["matched_loss"] = {"reference": str(Path(cfg.matched_loss_reference or "").resolve()),
                                     "target": stop_loss, "window": w, "final": trailing_mean(trained.losses, w),
                                     "reached": reached(trained.losses, stop_loss, w), "steps": trained.n_steps}
        _save_student(trained.model, tmp, meta | final, cfg, base_model, tokenizer, base_spec, references.get("final"))
    if dist is not None:
        barrier()
    return out


def _final_fields(trained: Trained, cfg: StudentConfig, t0: float) -> dict:
    """What the final student.json adds to :func:`_student_meta`: its history and times."""
    return {"epoch": cfg.epochs, "losses": trained.losses, "n_steps": trained.n_steps,
            "train_seconds": trained.wall_seconds, "wall_seconds": time.perf_counter() - t0}
