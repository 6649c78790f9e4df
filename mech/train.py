"""Finetuning students on chat rows (completion-only loss): LoRA through PEFT, or full finetuning.

A row is ``{"prompt_ids": [...], "completion_ids": [...]}`` already rendered in the training context, so
the context a student was trained in is exactly the token ids stored with its dataset.
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from mech.errors import MechError
from mech.models import surgery


@dataclass(frozen=True)
class LoraSpec:
    """LoRA as in PEFT. ``alpha=None`` means alpha = rank (the seed paper's default)."""

    rank: int = 8
    alpha: float | None = None
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    dropout: float = 0.0
    use_rslora: bool = False

    def __post_init__(self):
        if self.rank <= 0:
            raise MechError(f"LoRA rank must be >= 1, got {self.rank}: set lora.rank to a positive integer")


@dataclass(frozen=True)
class FinetuneConfig:
    lora: LoraSpec | None = field(default_factory=LoraSpec)  # None = full finetuning
    epochs: int = 1
    batch_size: int = 16
    lr: float = 2e-4
    warmup_steps: int = 5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0


def _collate(rows: Sequence[dict], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    seqs = [list(r["prompt_ids"]) + list(r["completion_ids"]) for r in rows]
    width = max(map(len, seqs))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    attn = torch.zeros_like(ids)
    for i, (r, s) in enumerate(zip(rows, seqs)):
        ids[i, :len(s)] = torch.tensor(s)
        attn[i, :len(s)] = 1
        p = len(r["prompt_ids"])
        labels[i, p:len(s)] = ids[i, p:len(s)]
    return ids.to(device), attn.to(device), labels.to(device)


def completion_loss(model, ids, attn, labels) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=-100)


def with_lora(model, spec: LoraSpec, seed: int):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # LoRA A init is drawn here: the training seed must reach it
    cfg = LoraConfig(r=spec.rank, lora_alpha=spec.alpha if spec.alpha is not None else spec.rank,
                     lora_dropout=spec.dropout, use_rslora=spec.use_rslora,
                     target_modules=surgery.target_modules(spec.targets), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def finetune(base_model, rows: Sequence[dict], cfg: FinetuneConfig, pad_id: int,
             progress: Callable[[int, int, float], None] | None = None):
    """Return a finetuned *copy* of ``base_model`` (a PeftModel for LoRA, a plain model for full FT)."""
    if not rows:
        raise MechError("no training rows: the dataset is empty (check the filter audit)")
    model = copy.deepcopy(base_model)
    if cfg.lora is not None:
        model = with_lora(model, cfg.lora, cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = random.Random(f"finetune-order-{cfg.seed}")
    steps_per_epoch = math.ceil(len(rows) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    device = next(model.parameters()).device
    model.train()
    step = 0
    for _ in range(cfg.epochs):
        order = list(range(len(rows)))
        rng.shuffle(order)
        for s in range(0, len(order), cfg.batch_size):
            lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps)) * (1 - step / total) if total > 1 \
                else cfg.lr
            for g in opt.param_groups:
                g["lr"] = lr
            batch = _collate([rows[i] for i in order[s:s + cfg.batch_size]], pad_id, device)
            loss = completion_loss(model, *batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            step += 1
            if progress:
                progress(step, total, loss.item())
    model.eval()
    return model
