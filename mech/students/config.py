"""How a student is trained: the LoRA spec, the student config and the distillation teacher.

Every field documents itself (``dataclasses.fields(StudentConfig)[i].metadata["help"]``), as PEFT's configs do.
A config is checked when it is made, so a typo fails before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from mech.context import Context
from mech.errors import MechError
from mech.models import surgery
from mech.students import store

METHODS = ("lora", "full", "matched_norm", "matched_loss")
REFERENCED = ("matched_norm", "matched_loss")  # methods defined against a reference LoRA student
OPTIMIZERS = ("adamw", "sgd")
OBJECTIVES = ("ce", "distill")
SCHEDULES = ("linear", "constant")
# auto: full and matched-norm students keep float32 master weights over a lower-precision base (computing under
# autocast to the base's dtype), so their updates and update norms are exact; LoRA adapters are float32 anyway.
# native: train in the base's own dtype.
PRECISIONS = ("auto", "native")
MATCHED_NORM_SCOPES = ("module", "global")
MAX_RANK = 4096  # wider than any adapted projection of a model mech runs; a bigger rank is a typo


def _choice(value: str, valid: Sequence[str], what: str) -> None:
    if value not in valid:
        raise MechError(f"unknown {what} {value!r}: expected one of {', '.join(valid)}")


@dataclass(frozen=True)
class LoraSpec:
    """LoRA as in PEFT."""

    rank: int = field(default=8, metadata={"help": "r, >= 1."})
    alpha: float | None = field(default=None, metadata={"help": (
        "PEFT's lora_alpha; None means alpha = rank (the seed paper's default, scaling 1 at every rank); a number "
        "keeps alpha fixed across ranks (scaling alpha/rank, or alpha/sqrt(rank) with rsLoRA).")})
    targets: tuple[str, ...] = field(default=("q", "k", "v", "o", "gate", "up", "down"), metadata={"help": (
        "Projection kinds adapted (q, k, v, o, gate, up, down; the groups attn, mlp, all are expanded).")})
    dropout: float = field(default=0.0, metadata={"help": "LoRA dropout probability, in [0, 1)."})
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised scaling alpha/sqrt(rank)."})

    def __post_init__(self):
        if self.rank <= 0:
            raise MechError(f"LoRA rank must be >= 1, got {self.rank}: set lora.rank to a positive integer")
        if self.rank > MAX_RANK:
            raise MechError(f"LoRA rank must be <= {MAX_RANK}, got {self.rank}: set lora.rank to at most the "
                            "adapted projections' width")
        if self.alpha is not None and not self.alpha > 0:
            raise MechError(f"LoRA alpha must be > 0, got {self.alpha}: set lora.alpha to a positive number or "
                            "null (alpha = rank)")
        if not 0.0 <= self.dropout < 1.0:
            raise MechError(f"LoRA dropout must be in [0, 1), got {self.dropout}: set lora.dropout")
        # expanded here so that equal configs compare and hash equal
        object.__setattr__(self, "targets", tuple(surgery.resolve_components(self.targets)))

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)


@dataclass(frozen=True)
class StudentConfig:
    """How a student is trained (see mech.students.train)."""

    method: str = field(default="lora", metadata={"help": (
        "lora | full | matched_norm (full finetuning rescaled to a reference LoRA student's update norm; "
        "`lora` is then unused, the reference decides which modules change) | matched_loss (full finetuning "
        "stopped at the first step its training loss reaches a reference LoRA student's final training loss).")})
    lora: LoraSpec = field(default_factory=LoraSpec, metadata={"help": "The LoRA spec (method lora)."})
    epochs: int = field(default=3, metadata={"help": "Passes over the rows."})
    batch_size: int = field(default=16, metadata={"help": "Rows per optimizer step."})
    lr: float = field(default=2e-4, metadata={"help": "Peak learning rate."})
    optimizer: str = field(default="adamw", metadata={"help": "adamw | sgd."})
    momentum: float = field(default=0.0, metadata={"help": "SGD momentum, in [0, 1) (sgd only)."})
    warmup_steps: int = field(default=5, metadata={"help": "Steps of linear warmup to lr."})
    schedule: str = field(default="linear", metadata={"help": (
        "linear (warmup, then linear decay towards 0 at the end) | constant (warmup, then flat).")})
    grad_clip: float = field(default=1.0, metadata={"help": "Max global gradient norm; 0 disables clipping."})
    weight_decay: float = field(default=0.0, metadata={"help": "Decoupled (adamw) or L2 (sgd) weight decay."})
    seed: int = field(default=0, metadata={"help": "Drives the LoRA initialisation, the data order and dropout."})
    context: str = field(default="default", metadata={"help": (
        "The training context policy (mech.context: default, none, empty, custom:<text>).")})
    objective: str = field(default="ce", metadata={"help": (
        "ce (cross-entropy on the rows' assistant tokens) | distill (KL to a Teacher's full next-token "
        "distributions on the same tokens; needs teacher= at training time).")})
    matched_norm_reference: str | None = field(default=None, metadata={"help": (
        "The LoRA student dir whose update norms a matched_norm student takes.")})
    matched_norm_scope: str = field(default="module", metadata={"help": (
        "module (each adapted module's ||ΔW||_F equals the reference's; every other parameter is reset to the "
        "base, so both students change the same modules) | global (one factor for the whole full-FT update so "
        "its global norm equals the reference's; nothing is zeroed).")})
    matched_loss_reference: str | None = field(default=None, metadata={"help": (
        "The LoRA student dir whose final training loss a matched_loss student trains down to.")})
    matched_loss_window: int = field(default=8, metadata={"help": (
        "matched_loss: the training loss compared is the mean over this many trailing steps, for the reference "
        "(its last steps) and the student (each step's trailing window), so one noisy batch neither stops it nor "
        "sets the target.")})
    save_every_epoch: bool = field(default=False, metadata={"help": (
        "Also write the student after each epoch under epoch-<k>/ (a matched_norm student then needs the "
        "reference's own epoch-<k>/ checkpoints to match against).")})
    precision: str = field(default="auto", metadata={"help": (
        "auto (full / matched_norm: float32 master weights, autocast to a bf16 / fp16 base's dtype) | native "
        "(train in the base's dtype). Identical on a float32 base.")})
    micro_batch_size: int | None = field(default=None, metadata={"help": (
        "Rows per forward and backward (per process under torchrun); None: the whole batch at once. One optimizer "
        "step still takes batch_size rows: their micro-batches' gradients are accumulated, each loss weighted by its "
        "labelled tokens over the batch's, so the step's gradient is the whole batch's (any split is exact; a short "
        "last micro-batch is fine). Between 1 and batch_size. Trades speed for memory; changes the weights in the "
        "last bits only, so it is part of the student's key when set.")})
    gradient_checkpointing: bool = field(default=False, metadata={"help": (
        "Recompute each decoder layer's activations in the backward instead of keeping them (transformers' "
        "activation checkpointing, non-reentrant; LoRA too): a third more compute for far less activation memory. "
        "Part of the student's key when on.")})

    def __post_init__(self):
        _choice(self.method, METHODS, "training method")
        _choice(self.optimizer, OPTIMIZERS, "optimizer")
        _choice(self.objective, OBJECTIVES, "training objective")
        _choice(self.schedule, SCHEDULES, "lr schedule")
        _choice(self.matched_norm_scope, MATCHED_NORM_SCOPES, "matched_norm_scope")
        _choice(self.precision, PRECISIONS, "precision")
        for name, value, ok in (("epochs", self.epochs, self.epochs >= 1),
                                ("batch_size", self.batch_size, self.batch_size >= 1),
                                ("lr", self.lr, 0 < self.lr < math.inf),
                                ("warmup_steps", self.warmup_steps, self.warmup_steps >= 0),
                                ("grad_clip", self.grad_clip, self.grad_clip >= 0),
                                ("weight_decay", self.weight_decay, self.weight_decay >= 0),
                                ("momentum", self.momentum, 0 <= self.momentum < 1),
                                ("matched_loss_window", self.matched_loss_window, self.matched_loss_window >= 1)):
            if not ok:
                raise MechError(f"invalid {name} {value!r}: epochs, batch_size and matched_loss_window >= 1, lr "
                                "finite and > 0, warmup_steps, grad_clip and weight_decay >= 0, momentum in [0, 1)")
        if self.micro_batch_size is not None and not 1 <= self.micro_batch_size <= self.batch_size:
            raise MechError(f"invalid micro_batch_size {self.micro_batch_size!r}: it is the rows of one forward within a "
                            f"batch, so between 1 and batch_size ({self.batch_size}); null trains each batch at once")
        Context.parse(self.context)  # a typo fails here, not after the model is loaded

    @classmethod
    def from_dict(cls, data: dict | None, where: str = "student") -> "StudentConfig":
        from mech.config import from_dict

        return from_dict(cls, data, where)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lora"]["targets"] = list(self.lora.targets)
        if self.precision == "auto":  # absent at its default, so existing student keys and student.json never change
            del d["precision"]
        if self.method != "matched_loss":  # likewise: only a matched_loss student's key holds its fields
            del d["matched_loss_reference"], d["matched_loss_window"]
        if self.micro_batch_size is None:  # memory knobs: absent at their defaults, for the same reason
            del d["micro_batch_size"]
        if not self.gradient_checkpointing:
            del d["gradient_checkpointing"]
        return d

    @property
    def kind(self) -> str:
        """What the student directory holds: "lora" (an adapter) or "full" (a model)."""
        return store.LORA if self.method == "lora" else store.FULL


@dataclass(frozen=True)
class Teacher:
    """The distillation target: a model (sharing the student's tokenizer) and the context it sees the rows in."""

    model: Any
    context: str = "default"

    def __post_init__(self):
        Context.parse(self.context)
