"""The training loop — one, for the organism's pretraining and for every student — with its optimizers, lr
schedule and losses.

:func:`train_loop` knows nothing about rows, epochs or checkpoints: the caller hands it the batches (any
iterable: a list, or a generator that draws them lazily), a loss of (model, batch), an optimizer and the lr at
each step. Whatever happens between steps (progress bars, per-epoch checkpoints) is an ``on_step`` hook.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch

from mech.errors import MechError
from mech.evaluation.inference import eval_mode, log_probs
from mech.students.config import OPTIMIZERS, SCHEDULES, StudentConfig, _choice
from mech.students.encoding import IGNORE_INDEX, Batch

LossFn = Callable[[Any, Any], torch.Tensor]  # (model, batch) -> scalar loss to minimise
OnStep = Callable[[int, list[float]], None]  # (steps done, the loss of every step so far)
Split = Callable[[Any], list[tuple[Any, float]]]  # a batch -> the (micro-batch, weight) parts this process computes
Sync = Callable[[torch.Tensor | None], torch.Tensor]  # this process's step loss -> the step's loss over processes


def train_loop(model, params: Sequence[torch.nn.Parameter], batches: Iterable[Any], loss_fn: LossFn,
               optimizer: torch.optim.Optimizer, lr_at: Callable[[int], float], grad_clip: float = 0.0,
               on_step: OnStep | None = None, split: Split | None = None, sync: Sync | None = None) -> list[float]:
    """Train ``model`` in place, one optimizer step per batch; returns the loss of every step.

    ``lr_at(step)`` is the learning rate of 0-based ``step`` (the lr itself, not a factor of a peak: each
    schedule keeps its own float arithmetic, and so its weights to the bit); ``grad_clip`` caps the global
    gradient norm of ``params`` (0: no clipping); ``on_step(k, losses)`` runs after step k (1-based) and stops
    training there when it returns True (the matched-loss control). The model is left in eval mode.

    Gradient accumulation: ``split(batch)`` gives the parts of a batch this process computes, each with the
    weight of its loss (its share of the batch's loss, e.g. its labelled tokens over the batch's); each part's
    backward runs before the next part's forward, so one part's activations are alive at a time, and the step's
    loss is the weighted sum. ``sync(loss)`` runs after the last backward, before clipping: under torchrun it sums
    the gradients and the loss over the processes (mech.students.distributed); ``loss`` is None for a process
    that had no rows in the step. Without ``split`` a batch is one part of weight 1, computed as it always was.
    """
    losses: list[float] = []
    model.train()
    for step, batch in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        optimizer.zero_grad(set_to_none=True)
        loss = None
        for part, weight in ([(batch, None)] if split is None else split(batch)):
            part_loss = loss_fn(model, part)
            if weight is not None:
                part_loss = part_loss * weight
            part_loss.backward()
            loss = part_loss.detach() if loss is None else loss + part_loss.detach()
        if sync is not None:
            loss = sync(loss)
        clip_and_step(optimizer, params, grad_clip)
        losses.append(float(loss))
        if on_step is not None and on_step(step + 1, losses):
            break
    optimizer.zero_grad(set_to_none=True)  # the last gradients are not needed: free them before the caller saves
    model.eval()
    return losses


def clip_and_step(optimizer: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter], grad_clip: float) -> None:
    """One optimizer step on the gradients in place, their global norm over ``params`` first capped at
    ``grad_clip`` (0: no clipping). Batched students (mech.students.batched) take it once per student."""
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()


# --------------------------------------------------------------------------------------------- optimizer, lr


def make_optimizer(params: list[torch.nn.Parameter], cfg: StudentConfig) -> torch.optim.Optimizer:
    _choice(cfg.optimizer, OPTIMIZERS, "optimizer")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(step: int, total: int, warmup: int, schedule: str = "linear") -> float:
    """Multiplier of the peak lr at 0-based ``step`` of ``total``: warmup reaches 1 at step warmup-1; "linear"
    then decays to 1/(total-warmup) at the last step (never 0, so no step is wasted)."""
    _choice(schedule, SCHEDULES, "lr schedule")
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    return max(0.0, (total - step) / max(1, total - warmup))


# --------------------------------------------------------------------------------------------- losses


def completion_logits(model, batch: Batch, labelled_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 logits [N, vocab] predicting each labelled token, and those N target ids (row-major order).

    ``labelled_only``: the unembedding runs at those N positions only (transformers' boolean ``logits_to_keep``,
    which keeps any logit softcapping), not at every position: the same logits up to float rounding, without
    the [batch, seq, vocab] tensor. Solo students keep the dense form, whose weights are promised to the bit.
    """
    mask = batch.labels[:, 1:] != IGNORE_INDEX
    if labelled_only:
        keep = torch.zeros_like(batch.ids, dtype=torch.bool)
        keep[:, :-1] = mask  # position t predicts token t + 1
        logits = model(input_ids=batch.ids, attention_mask=batch.attn, logits_to_keep=keep).logits
        return logits.float(), batch.labels[:, 1:][mask]
    logits = model(input_ids=batch.ids, attention_mask=batch.attn).logits[:, :-1]
    return logits[mask].float(), batch.labels[:, 1:][mask]


def completion_loss(model, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy over the labelled tokens of a batch (any model, PEFT-wrapped included)."""
    logits, targets = completion_logits(model, batch)
    return torch.nn.functional.cross_entropy(logits, targets)


def sparse_completion_loss(model, batch: Batch) -> torch.Tensor:
    """:func:`completion_loss` of a plain HF causal LM with the unembedding applied only at labelled positions.

    The organism's pretraining uses it: chat prompts carry no loss, and skipping their logits saves a quarter
    of a step on CPU. (Students keep the dense form: the two differ in the last bits, and student weights are
    promised bit-identical across versions.)
    """
    hidden = model.base_model(input_ids=batch.ids, attention_mask=batch.attn).last_hidden_state[:, :-1]
    target = batch.labels[:, 1:]
    keep = target != IGNORE_INDEX
    if not bool(keep.any()):  # every prompt filled max_len: nothing to learn from, and CE would be NaN
        return hidden.sum() * 0.0
    logits = model.get_output_embeddings()(hidden[keep])
    return torch.nn.functional.cross_entropy(logits.float(), target[keep])


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student), from logits [N, vocab] of both."""
    if student_logits.shape != teacher_logits.shape:
        raise MechError(f"teacher and student logits differ in shape ({tuple(teacher_logits.shape)} vs "
                        f"{tuple(student_logits.shape)}): distill from a teacher with the student's vocabulary")
    log_s = log_probs(student_logits)
    log_t = log_probs(teacher_logits.float().to(log_s.device))
    kl = torch.nn.functional.kl_div(log_s, log_t, log_target=True, reduction="sum")
    return kl / max(1, student_logits.shape[0])


def distill_batch_loss(model, batch: Batch, teacher_model, teacher_batch: Batch) -> torch.Tensor:
    """KL(teacher || model) on one batch, the teacher seeing ``teacher_batch`` (the same targets, its context)."""
    logits, _ = completion_logits(model, batch)
    with torch.no_grad(), eval_mode(teacher_model):
        teacher_logits, _ = completion_logits(teacher_model, teacher_batch)
    return distill_loss(logits, teacher_logits)
