"""Training students on chat rows: LoRA through PEFT, full finetuning, and the matched-update-norm control.

A training row is ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}], ...}`` with no system
message: the system turn comes from the training *context* (``StudentConfig.context``, rendered by
:func:`mech.context.render` through the model's own chat template), never from the row. The loss covers the
assistant content and the end-of-turn token that follows it, nothing else (:func:`encode_row`).

Objectives:

* ``ce``: cross-entropy on the teacher's sampled tokens (the rows' assistant text);
* ``distill``: per-token KL(teacher || student) between full next-token distributions on the completion
  tokens, the teacher's logits computed on the fly from a :class:`Teacher` (a model and the context it is
  rendered in, e.g. a trait system prompt). Distillation from stored top-k logits is not implemented.

Methods: ``lora`` (PEFT LoRA on the projections in ``LoraSpec.targets``), ``full`` (every parameter), and
``matched_norm`` (full finetuning whose update is then rescaled to the update norm of a reference LoRA
student, :func:`match_update_norms`). Full finetuning trains in the base model's dtype: load the base in
float32 where bf16 optimizer steps would be too coarse.

``seed`` drives the LoRA initialisation, the data order and any dropout; on one device the same config
gives bitwise-identical weights. :func:`train_student` writes a student directory (see mech.students.store).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from mech.context import ASSISTANT, Context, render
from mech.errors import MechError
from mech.models import surgery
from mech.models.loader import canonical_base_name, model_fingerprint, record_adapter_base
from mech.store import atomic_dir, atomic_write_json
from mech.students import store as students

METHODS = ("lora", "full", "matched_norm")
OPTIMIZERS = ("adamw", "sgd")
OBJECTIVES = ("ce", "distill")
SCHEDULES = ("linear", "constant")
MATCHED_NORM_SCOPES = ("module", "global")
IGNORE_INDEX = -100  # label of a position that carries no loss (what torch's cross_entropy skips)
STUDENT_FORMAT = 1

Progress = Callable[[int, int, float], None]  # (step, total steps, loss of that step)


def _choice(value: str, valid: Sequence[str], what: str) -> None:
    if value not in valid:
        raise MechError(f"unknown {what} {value!r}: expected one of {', '.join(valid)}")


# --------------------------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class LoraSpec:
    """LoRA as in PEFT.

    rank: r, >= 1.
    alpha: PEFT's lora_alpha; ``None`` means alpha = rank (the seed paper's default, scaling 1 at every rank);
        a number keeps alpha fixed across ranks (scaling alpha/rank, or alpha/sqrt(rank) with rsLoRA).
    targets: projection kinds adapted ("q", "k", "v", "o", "gate", "up", "down"; groups "attn", "mlp", "all"
        are expanded), default all seven.
    dropout: LoRA dropout probability.
    use_rslora: rank-stabilised scaling alpha/sqrt(rank).
    """

    rank: int = 8
    alpha: float | None = None
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    dropout: float = 0.0
    use_rslora: bool = False

    def __post_init__(self):
        if self.rank <= 0:
            raise MechError(f"LoRA rank must be >= 1, got {self.rank}: set lora.rank to a positive integer")
        if self.alpha is not None and not self.alpha > 0:
            raise MechError(f"LoRA alpha must be > 0, got {self.alpha}: set lora.alpha to a positive number or "
                            "null (alpha = rank)")
        if not 0.0 <= self.dropout < 1.0:
            raise MechError(f"LoRA dropout must be in [0, 1), got {self.dropout}: set lora.dropout")
        object.__setattr__(self, "targets", tuple(surgery.resolve_components(self.targets)))

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)


@dataclass(frozen=True)
class StudentConfig:
    """How a student is trained.

    method: "lora" | "full" | "matched_norm" (full finetuning rescaled to a reference LoRA student's update
        norm; ``lora`` is then unused, the reference decides which modules change).
    lora: the LoRA spec (method "lora").
    epochs, batch_size, lr: passes over the rows, rows per optimizer step, peak learning rate.
    optimizer: "adamw" | "sgd" (``momentum`` applies to sgd only).
    warmup_steps: steps of linear warmup to ``lr``.
    schedule: "linear" (warmup, then linear decay towards 0 at the end) | "constant" (warmup, then flat).
    grad_clip: max global gradient norm; 0 disables clipping.
    weight_decay: decoupled (adamw) or L2 (sgd) weight decay.
    seed: drives the LoRA initialisation, the data order and dropout.
    context: the training context policy (mech.context: "default", "none", "empty", "custom:<text>").
    objective: "ce" (cross-entropy on the rows' assistant tokens) | "distill" (KL to a Teacher's full
        next-token distributions on the same tokens; needs ``teacher=`` at training time).
    matched_norm_reference: the LoRA student dir whose update norms a matched_norm student takes.
    matched_norm_scope: "module" (each adapted module's ||ΔW||_F equals the reference's; every other
        parameter is reset to the base, so both students change the same modules) | "global" (one factor
        for the whole full-FT update so its global norm equals the reference's; nothing is zeroed).
    save_every_epoch: also write the student after each epoch under ``epoch-<k>/`` (a matched_norm student
        then needs the reference's own ``epoch-<k>/`` checkpoints to match against).
    """

    method: str = "lora"
    lora: LoraSpec = field(default_factory=LoraSpec)
    epochs: int = 3
    batch_size: int = 16
    lr: float = 2e-4
    optimizer: str = "adamw"
    momentum: float = 0.0
    warmup_steps: int = 5
    schedule: str = "linear"
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    seed: int = 0
    context: str = "default"
    objective: str = "ce"
    matched_norm_reference: str | None = None
    matched_norm_scope: str = "module"
    save_every_epoch: bool = False

    def __post_init__(self):
        _choice(self.method, METHODS, "training method")
        _choice(self.optimizer, OPTIMIZERS, "optimizer")
        _choice(self.objective, OBJECTIVES, "training objective")
        _choice(self.schedule, SCHEDULES, "lr schedule")
        _choice(self.matched_norm_scope, MATCHED_NORM_SCOPES, "matched_norm_scope")
        for name, value, ok in (("epochs", self.epochs, self.epochs >= 1),
                                ("batch_size", self.batch_size, self.batch_size >= 1),
                                ("lr", self.lr, self.lr > 0),
                                ("warmup_steps", self.warmup_steps, self.warmup_steps >= 0),
                                ("grad_clip", self.grad_clip, self.grad_clip >= 0),
                                ("weight_decay", self.weight_decay, self.weight_decay >= 0),
                                ("momentum", self.momentum, 0 <= self.momentum < 1)):
            if not ok:
                raise MechError(f"invalid {name} {value!r}: epochs and batch_size >= 1, lr > 0, warmup_steps, "
                                "grad_clip and weight_decay >= 0, momentum in [0, 1)")
        Context.parse(self.context)  # a typo fails here, not after the model is loaded

    @classmethod
    def from_dict(cls, data: dict | None, where: str = "student") -> "StudentConfig":
        from mech.config import from_dict

        return from_dict(cls, data, where)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lora"]["targets"] = list(self.lora.targets)
        return d

    @property
    def kind(self) -> str:
        """What the student directory holds: "lora" (an adapter) or "full" (a model)."""
        return students.LORA if self.method == "lora" else students.FULL


@dataclass(frozen=True)
class FinetuneConfig:
    """The first finetuning API (pre-rendered rows), kept for the organism's oracle probe."""

    lora: LoraSpec | None = field(default_factory=LoraSpec)  # None = full finetuning
    epochs: int = 1
    batch_size: int = 16
    lr: float = 2e-4
    warmup_steps: int = 5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0

    def student_config(self) -> StudentConfig:
        return StudentConfig(method="lora" if self.lora is not None else "full", lora=self.lora or LoraSpec(),
                             epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                             warmup_steps=self.warmup_steps, weight_decay=self.weight_decay,
                             grad_clip=self.grad_clip, seed=self.seed)


@dataclass(frozen=True)
class Teacher:
    """The distillation target: a model (sharing the student's tokenizer) and the context it sees the rows in."""

    model: Any
    context: str = "default"

    def __post_init__(self):
        Context.parse(self.context)


# --------------------------------------------------------------------------------------------- rows


@dataclass(frozen=True)
class Example:
    """One rendered training row: token ids and per-token labels (IGNORE_INDEX where no loss is taken)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    @property
    def mask(self) -> list[bool]:
        return [lab != IGNORE_INDEX for lab in self.labels]

    @property
    def targets(self) -> list[int]:
        return [lab for lab in self.labels if lab != IGNORE_INDEX]


def row_turns(row: dict, index: int = 0) -> tuple[str, str]:
    """(user, assistant) of a chat row; a row carrying a system message, or any other shape, is refused."""
    msgs = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
        raise MechError(f"row {index} has no 'messages' list: rows are {{'messages': [user, assistant]}}")
    roles = [m.get("role") for m in msgs]
    if "system" in roles:
        raise MechError(f"row {index} carries a system message: rows never hold the system prompt; set the "
                        "training context with StudentConfig.context")
    if roles != ["user", "assistant"] or not all(isinstance(m.get("content"), str) for m in msgs):
        raise MechError(f"row {index} has messages {roles}: expected one user and one assistant message with "
                        "text content")
    return msgs[0]["content"], msgs[1]["content"]


def encode_row(tokenizer: Any, row: dict, context: str | Context, index: int = 0) -> Example:
    """Render a row in ``context`` and label the assistant content plus its end-of-turn token.

    The end token is the one right after the assistant content (``<|im_end|>`` for ChatML, ``<|eot_id|>``
    for Llama 3): a student must learn to stop where the teacher stopped.
    """
    user, assistant = row_turns(row, index)
    if not assistant:
        raise MechError(f"row {index} has an empty assistant message: filter such rows out of the dataset")
    r = render(tokenizer, context, user, assistant)
    pos = r.positions(ASSISTANT)
    if not pos or pos != list(range(pos[0], pos[-1] + 1)):
        raise MechError(f"row {index}: the assistant content is not one contiguous token span in the rendering; "
                        "use a chat template that writes the assistant content verbatim")
    end = pos[-1] + 1
    if end >= len(r.input_ids):
        raise MechError(f"row {index}: the chat template writes no token after the assistant content, so there is "
                        "no end-of-turn token to learn; use a template that closes the assistant turn")
    ids = tuple(r.input_ids)
    labels = tuple(t if pos[0] <= i <= end else IGNORE_INDEX for i, t in enumerate(ids))
    return Example(ids, labels)


def encode_rows(tokenizer: Any, rows: Sequence[dict], context: str | Context) -> list[Example]:
    ctx = Context.parse(context) if isinstance(context, str) else context
    return [encode_row(tokenizer, row, ctx, i) for i, row in enumerate(rows)]


def label_mask(tokenizer: Any, row: dict, context: str | Context) -> list[bool]:
    """Which tokens of the row's rendering in ``context`` carry loss (True) — only assistant ones."""
    return encode_row(tokenizer, row, context).mask


def _from_prompt_completion(rows: Sequence[dict]) -> list[Example]:
    out = []
    for r in rows:
        p, c = list(r["prompt_ids"]), list(r["completion_ids"])
        out.append(Example(tuple(p + c), tuple([IGNORE_INDEX] * len(p) + c)))
    return out


# --------------------------------------------------------------------------------------------- pieces


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


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
    with _seeded(seed, _device(model)), warnings.catch_warnings():
        # peft 0.21 reads transformers' deprecated is_gradient_checkpointing: noise, not a fault of ours
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated")
        return get_peft_model(model, cfg)


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


def batch_order(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Row indices of each batch of an epoch: a fresh shuffle per (seed, epoch), last batch possibly short."""
    order = list(range(n))
    random.Random(f"mech-train-order-{seed}-{epoch}").shuffle(order)  # str seeds hash the same in every process
    return [order[s:s + batch_size] for s in range(0, n, batch_size)]


def _collate(examples: Sequence[Example], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    attn = torch.zeros_like(ids)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        attn[i, :n] = 1
    return ids.to(device), attn.to(device), labels.to(device)


def completion_logits(model, ids, attn, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 logits [N, vocab] predicting each labelled token, and those N target ids (row-major order)."""
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
    mask = labels[:, 1:] != IGNORE_INDEX
    return logits[mask].float(), labels[:, 1:][mask]


def completion_loss(model, ids, attn, labels) -> torch.Tensor:
    """Mean cross-entropy over the labelled tokens of a batch."""
    logits, targets = completion_logits(model, ids, attn, labels)
    return torch.nn.functional.cross_entropy(logits, targets)


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student), from logits [N, vocab] of both."""
    if student_logits.shape != teacher_logits.shape:
        raise MechError(f"teacher and student logits differ in shape ({tuple(teacher_logits.shape)} vs "
                        f"{tuple(student_logits.shape)}): distill from a teacher with the student's vocabulary")
    log_s = torch.log_softmax(student_logits.float(), -1)
    log_t = torch.log_softmax(teacher_logits.float().to(log_s.device), -1)
    kl = torch.nn.functional.kl_div(log_s, log_t, log_target=True, reduction="sum")
    return kl / max(1, student_logits.shape[0])


def _pad_id(tokenizer: Any) -> int:
    for tid in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(tid, int):
            return tid
    return 0  # padded positions are masked out of attention and loss, so the id itself never matters


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


@contextlib.contextmanager
def _eval_mode(model):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def _batch_loss(model, batch: list[int], examples: list[Example], distill: _Distill | None, pad_id: int):
    ids, attn, labels = _collate([examples[i] for i in batch], pad_id, _device(model))
    if distill is None:
        return completion_loss(model, ids, attn, labels)
    logits, _ = completion_logits(model, ids, attn, labels)
    t_ids, t_attn, t_labels = _collate([distill.examples[i] for i in batch], pad_id, _device(distill.model))
    with torch.no_grad(), _eval_mode(distill.model):
        t_logits, _ = completion_logits(distill.model, t_ids, t_attn, t_labels)
    return distill_loss(logits, t_logits)


def _fit(model, params: list[torch.nn.Parameter], examples: list[Example], cfg: StudentConfig, pad_id: int,
         distill: _Distill | None = None, progress: Progress | None = None,
         on_epoch: Callable[[int, Any, list[float]], None] | None = None) -> list[float]:
    """The training loop; returns the loss of every step. ``on_epoch(k, model, losses)`` after epoch k (1-based)."""
    opt = make_optimizer(params, cfg)
    total = math.ceil(len(examples) / cfg.batch_size) * cfg.epochs
    losses: list[float] = []
    model.train()
    for epoch in range(cfg.epochs):
        for batch in batch_order(len(examples), cfg.batch_size, cfg.seed, epoch):
            for g in opt.param_groups:
                g["lr"] = cfg.lr * lr_factor(len(losses), total, cfg.warmup_steps, cfg.schedule)
            loss = _batch_loss(model, batch, examples, distill, pad_id)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            losses.append(float(loss.detach()))
            if progress:
                progress(len(losses), total, losses[-1])
        if on_epoch is not None:
            model.eval()
            on_epoch(epoch + 1, model, losses)
            model.train()
    model.eval()
    return losses


def _trainable_copy(base_model, cfg: StudentConfig):
    """A deep copy of the base set up for ``cfg.method``, and the parameters to optimise."""
    if surgery.unwrap(base_model) is not base_model:
        raise MechError("the base model is PEFT-wrapped: pass the plain base model (merge it first with "
                        "mech.students.store.merged)")
    surgery.base_causal_lm(base_model)  # unknown architecture -> MechError before any work
    model = copy.deepcopy(base_model)
    if cfg.method == "lora":
        model = with_lora(model, cfg.lora, cfg.seed)
    else:
        model.requires_grad_(True)
    return model, [p for p in model.parameters() if p.requires_grad]


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


def _check_objective(cfg: StudentConfig, teacher: Teacher | None) -> None:
    if cfg.objective == "distill" and teacher is None:
        raise MechError("objective 'distill' needs a teacher: pass teacher=Teacher(model, context)")
    if cfg.objective != "distill" and teacher is not None:
        raise MechError(f"a teacher was passed but objective is {cfg.objective!r}: set objective to 'distill' or "
                        "drop the teacher")


def train_model(base_model, tokenizer, rows: Sequence[dict], cfg: StudentConfig, teacher: Teacher | None = None,
                progress: Progress | None = None,
                on_epoch: Callable[[int, Any, list[float]], None] | None = None) -> Trained:
    """Train a student from a deep copy of ``base_model`` (never modified) on chat ``rows`` in ``cfg.context``.

    ``matched_norm`` trains plain full finetuning here; the rescaling is :func:`match_update_norms`.
    """
    if not rows:
        raise MechError("no training rows: the dataset is empty (check the filter audit)")
    _check_objective(cfg, teacher)
    examples = encode_rows(tokenizer, rows, cfg.context)
    distill = _teacher_examples(tokenizer, rows, examples, teacher) if teacher is not None else None
    t0 = time.perf_counter()
    with _seeded(cfg.seed, _device(base_model)):
        model, params = _trainable_copy(base_model, cfg)
        losses = _fit(model, params, examples, cfg, _pad_id(tokenizer), distill, progress, on_epoch)
    return Trained(model, losses, len(rows), time.perf_counter() - t0)


def finetune(base_model, rows: Sequence[dict], cfg: FinetuneConfig, pad_id: int,
             progress: Callable[[int, int, float], None] | None = None):
    """Return a finetuned *copy* of ``base_model`` (a PeftModel for LoRA, a plain model for full FT).

    Rows are pre-rendered ``{"prompt_ids": [...], "completion_ids": [...]}``; the loss is on the completion.
    """
    if not rows:
        raise MechError("no training rows: the dataset is empty (check the filter audit)")
    scfg = cfg.student_config()
    with _seeded(scfg.seed, _device(base_model)):
        model, params = _trainable_copy(base_model, scfg)
        _fit(model, params, _from_prompt_completion(rows), scfg, pad_id, progress=progress)
    return model


@torch.no_grad()
def kl_to_teacher(model, tokenizer, rows: Sequence[dict], context: str, teacher: Teacher,
                  batch_size: int = 16) -> float:
    """Mean per-token KL(teacher || model) on the rows' completion tokens, ``model`` seeing ``context``."""
    examples = encode_rows(tokenizer, rows, context)
    distill = _teacher_examples(tokenizer, rows, examples, teacher)
    pad, total, n = _pad_id(tokenizer), 0.0, 0
    with _eval_mode(model):
        for s in range(0, len(examples), batch_size):
            batch = list(range(s, min(s + batch_size, len(examples))))
            k = sum(len(examples[i].targets) for i in batch)
            total += float(_batch_loss(model, batch, examples, distill, pad)) * k
            n += k
    return total / max(1, n)


# --------------------------------------------------------------------------------------------- matched norm


@torch.no_grad()
def match_update_norms(base_model, model, reference: dict[str, float], scope: str = "module") -> dict[str, float]:
    """Rescale the full-FT update ΔW = W_model − W_base of ``model`` in place to ``reference`` norms.

    ``reference`` is :func:`mech.students.store.update_norms` of a LoRA student. "module": each referenced
    projection's weight gets W_base + c·ΔW with ||c·ΔW||_F = the reference's norm, and every other parameter
    (other projections, biases, norms, embeddings) is reset to the base — the two students then change the
    same weight matrices. "global": every parameter's update is scaled by one factor so the global update
    norm equals the reference's. Returns the factors (per module key, or {"global": c}). The match is exact up
    to the parameters' dtype: in bf16, W_base + c·ΔW is rounded on storage (about 1e-3 relative on the norms
    of a tiny model, seen on an H200), so train and rescale matched-norm students on a float32 base.
    """
    _choice(scope, MATCHED_NORM_SCOPES, "matched_norm_scope")
    pairs = students.param_pairs(base_model, model)

    def set_update(b: torch.Tensor, p: torch.Tensor, c: float) -> None:
        p.copy_((b.detach().to(p.device, torch.float32) + c * students.param_update(b, p)).to(p.dtype))

    if scope == "global":
        now = students.update_norms(base_model, model)[students.GLOBAL]
        if now == 0:
            raise MechError("the full finetune left every weight unchanged: nothing to rescale; check lr and rows")
        c = reference[students.GLOBAL] / now
        for _, b, p in pairs:
            set_update(b, p, c)
        return {students.GLOBAL: c}
    layers = surgery.get_layers(model)
    chosen: dict[int, str] = {}
    for key in reference:
        if key == students.GLOBAL:
            continue
        i, kind = students.parse_module_key(key)
        if i >= len(layers):
            raise MechError(f"reference module {key} does not exist in this {len(layers)}-layer model: use a "
                            "reference trained on the same base")
        chosen[id(surgery.get_projection(layers[i], kind).weight)] = key
    scales: dict[str, float] = {}
    for _, b, p in pairs:
        key = chosen.get(id(p))
        if key is None:
            p.copy_(b.detach().to(p.device, p.dtype))  # the LoRA reference leaves this parameter at the base
            continue
        now = float(students.param_update(b, p).norm())
        if now == 0:
            raise MechError(f"the full finetune left module {key} unchanged: its norm cannot be matched; check lr")
        scales[key] = reference[key] / now
        set_update(b, p, scales[key])
    return scales


def _reference_norms(base_model, cfg: StudentConfig) -> dict[Any, dict[str, float]]:
    """Update norms of the matched-norm reference: {"final": ..., k: ... for each epoch when needed}."""
    if not cfg.matched_norm_reference:
        raise MechError("method 'matched_norm' needs matched_norm_reference: set it to a LoRA student dir")
    ref = Path(cfg.matched_norm_reference)
    if students.student_kind(ref) != students.LORA:
        raise MechError(f"matched_norm_reference {ref} is a full model, not a LoRA student: point it at a LoRA "
                        "student dir")
    dirs: dict[Any, Path] = {"final": ref}
    if cfg.save_every_epoch:
        have = students.epoch_dirs(ref)
        missing = [k for k in range(1, cfg.epochs + 1) if k not in have]
        if missing:
            raise MechError(f"matched_norm_reference {ref} has no epoch-{missing[0]} checkpoint: train the reference "
                            "with save_every_epoch and as many epochs, or set save_every_epoch false")
        dirs.update({k: have[k] for k in range(1, cfg.epochs + 1)})
    out = {}
    for k, d in dirs.items():
        out[k] = students.update_norms(base_model, students.load_student(base_model, d))
    return out


# --------------------------------------------------------------------------------------------- saving


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


def train_student(base_model, tokenizer, rows: Sequence[dict], cfg: StudentConfig, out_dir, base_spec: str = "organism",
                  teacher: Teacher | None = None, progress: Progress | None = None, overwrite: bool = False) -> Path:
    """Train a student and write its directory atomically (see mech.students.store for the layout); returns it.

    ``base_spec`` names the base in the adapter stamp and student.json (its fingerprint is recorded too).
    An existing ``out_dir`` is a MechError unless ``overwrite``.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise MechError(f"student dir {out} already exists: delete it or pass overwrite=True")
    _check_objective(cfg, teacher)
    references = _reference_norms(base_model, cfg) if cfg.method == "matched_norm" else {}
    ctx = Context.parse(cfg.context)
    meta = {
        "format": STUDENT_FORMAT,
        "kind": cfg.kind,
        "method": cfg.method,
        "config": cfg.to_dict(),
        "context": ctx.spec,
        "objective": cfg.objective,
        "teacher": None if teacher is None else {"context": Context.parse(teacher.context).spec,
                                                 "fingerprint": model_fingerprint(teacher.model)},
        "base_spec": canonical_base_name(base_spec),
        "base_fingerprint": model_fingerprint(base_model),
        "n_rows": len(rows),
        "versions": _versions(),
    }
    t0 = time.perf_counter()
    with atomic_dir(out, overwrite=overwrite) as tmp:

        def on_epoch(k: int, model, losses: list[float]) -> None:
            if not cfg.save_every_epoch:
                return
            snapshot = copy.deepcopy(model) if cfg.method == "matched_norm" else model  # rescaling edits weights
            _save_student(snapshot, tmp / f"{students.EPOCH_PREFIX}{k}",
                          meta | {"epoch": k, "losses": list(losses), "n_steps": len(losses),
                                  "wall_seconds": time.perf_counter() - t0},
                          cfg, base_model, tokenizer, base_spec, references.get(k))

        trained = train_model(base_model, tokenizer, rows, cfg, teacher, progress, on_epoch)
        _save_student(trained.model, tmp,
                      meta | {"epoch": cfg.epochs, "losses": trained.losses, "n_steps": trained.n_steps,
                              "train_seconds": trained.wall_seconds, "wall_seconds": time.perf_counter() - t0},
                      cfg, base_model, tokenizer, base_spec, references.get("final"))
    return out
