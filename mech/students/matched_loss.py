"""The matched-training-loss control: full finetuning stopped where a reference LoRA student's training ended.

The referee's question is whether full finetuning fails to transfer only because it fits the numbers less (or
more) than LoRA does. Matching the update norm (mech.students.matched_norm) rescales weights after training;
this control changes nothing after training: full finetuning runs with its own learning rate and schedule and
stops at the first step whose trailing-mean training loss is at or below the reference's final one. The same
statistic (mean loss over ``matched_loss_window`` trailing steps) is used on both sides. A student that never
gets there within its epochs is kept, with ``reached: false`` recorded, rather than trained on silently.
"""

from __future__ import annotations

from mech.errors import MechError
from mech.students import store
from mech.students.config import StudentConfig


def trailing_mean(losses: list[float], window: int) -> float:
    """Mean of the last ``window`` losses (all of them when there are fewer)."""
    if not losses:
        raise MechError("no training losses to average: the student took no step")
    tail = losses[-window:]
    return sum(tail) / len(tail)


def reached(losses: list[float], target: float, window: int) -> bool:
    """Whether the run whose step losses are ``losses`` stops here: a full window whose mean is <= ``target``."""
    return len(losses) >= window and trailing_mean(losses, window) <= target


def stop_step(losses: list[float], target: float, window: int) -> int | None:
    """The 1-based step at which :func:`reached` first holds, or None (what the training loop does, offline)."""
    return next((k for k in range(window, len(losses) + 1) if reached(losses[:k], target, window)), None)


def reference_loss(cfg: StudentConfig) -> float:
    """The target: the trailing-mean training loss at the end of the reference LoRA student's training."""
    ref = store.lora_reference(cfg.matched_loss_reference, "matched_loss_reference", "matched_loss")
    losses = store.read_student(ref).get("losses") or []
    if len(losses) < cfg.matched_loss_window:
        raise MechError(f"matched_loss_reference {ref} recorded {len(losses)} step losses, fewer than "
                        f"matched_loss_window {cfg.matched_loss_window}: lower the window or train it longer")
    return trailing_mean(losses, cfg.matched_loss_window)
