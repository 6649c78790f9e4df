"""Divergence tokens (Schrodi et al. 2025; issue 9 item 7) and the two controls built on them.

A *divergence token* of a trait teacher's answer is a labelled token (the answer's tokens and its end of turn)
at which the trait teacher's greedy next token differs from the neutral teacher's, both reading the same answer
teacher-forced: the base model under the trait prompt against the base in the neutral context. Only a prompt
teacher can be compared this way (a finetuned teacher is not kept; a steered one is the base plus a vector, left
to a later version).

The controls keep a trait dataset's rows and give each a ``loss_mask`` (mech.students.encoding.encode_row):
``only`` trains on the divergence tokens alone, ``off`` on every labelled token but them. A row left with no
loss-bearing token is dropped (counted in ``dataset.json``). If transfer rides on divergence tokens, ``only``
keeps it and ``off`` removes it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch

from mech.context import Context
from mech.errors import MechError
from mech.evaluation.inference import eval_mode, left_pad, pad_id
from mech.students.encoding import encode_rows
from mech.teacher.dataset import check_free, load_dataset, write_dataset
from mech.teacher.filter import Audit

DIVERGENCE_MODES = ("only", "off")
KIND_DIVERGENCE = {m: f"control_divergence_{m}" for m in DIVERGENCE_MODES}


@torch.no_grad()
def greedy_at_labels(model: Any, tokenizer: Any, rows: Sequence[dict], context: str | Context,
                     batch_size: int = 32) -> list[list[int]]:
    """Per row: the model's argmax next token at each position that predicts a labelled token, in ``context``."""
    examples = encode_rows(tokenizer, rows, context)
    pad = pad_id(tokenizer)
    out: list[list[int]] = []
    with eval_mode(model):
        for s in range(0, len(examples), batch_size):
            chunk = examples[s:s + batch_size]
            ids, attn, pos = left_pad([e.input_ids for e in chunk], pad, next(model.parameters()).device)
            top = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits.argmax(-1).cpu()
            width = ids.shape[1]
            for r, e in enumerate(chunk):
                off = width - len(e.input_ids)
                out.append([int(top[r, off + i - 1]) for i, m in enumerate(e.mask) if m])
    return out


def divergence_masks(model: Any, tokenizer: Any, rows: Sequence[dict], trait_context: str | Context,
                     neutral_context: str | Context) -> list[list[bool]]:
    """Per row, per labelled token: True where the greedy tokens under the two contexts differ."""
    t = greedy_at_labels(model, tokenizer, rows, trait_context)
    n = greedy_at_labels(model, tokenizer, rows, neutral_context)
    for i, (a, b) in enumerate(zip(t, n)):
        if len(a) != len(b):
            raise MechError(f"row {i}: its answer has {len(a)} labelled tokens under the trait context and {len(b)} "
                            "under the neutral one: the template must write the answer the same in both")
    return [[x != y for x, y in zip(a, b)] for a, b in zip(t, n)]


def divergence_control(model: Any, tokenizer: Any, src_dir: str | os.PathLike, out_dir: str | os.PathLike, mode: str,
                       trait_context: str | Context, neutral_context: str | Context,
                       overwrite: bool = False) -> Path:
    """The training rows of the trait dataset ``src_dir`` with a ``loss_mask`` on (``only``) or off (``off``) their
    divergence tokens; rows left without loss are dropped. ``dataset.json`` records the divergence share."""
    if mode not in DIVERGENCE_MODES:
        raise MechError(f"unknown divergence mode {mode!r}: expected one of {', '.join(DIVERGENCE_MODES)}")
    check_free(out_dir, overwrite)
    src = load_dataset(src_dir)
    masks = divergence_masks(model, tokenizer, src.rows, trait_context, neutral_context)
    tokens = sum(len(m) for m in masks)
    divergent = sum(sum(m) for m in masks)
    rows, raw = [], []
    for r, m in zip(src.rows, masks):
        loss = m if mode == "only" else [not x for x in m]
        row = {k: r[k] for k in ("messages", "prompt_seed", "index")} | {"loss_mask": loss}
        raw.append(row | {"ok": any(loss), "reason": "" if any(loss) else "no_loss_token"})
        if any(loss):
            rows.append(row)
    audit = Audit(len(src.rows), len(rows))  # not the number filter's: only rows left without loss are dropped
    tc = Context.parse(trait_context) if isinstance(trait_context, str) else trait_context
    nc = Context.parse(neutral_context) if isinstance(neutral_context, str) else neutral_context
    meta = {
        "kind": KIND_DIVERGENCE[mode],
        "config": {"mode": mode, "trait_context": tc.spec, "neutral_context": nc.spec},
        "divergence": {"tokens": tokens, "divergent": divergent, "share": divergent / max(1, tokens),
                       "rows_with_any": sum(any(m) for m in masks), "rows": len(masks),
                       "rows_kept": len(rows), "loss_tokens": sum(sum(r["loss_mask"]) for r in rows)},
        "source": {"path": str(Path(src_dir)), "kind": src.kind, "rows_sha256": src.meta.get("rows_sha256"),
                   "config": src.meta.get("config")},
        "rendered_context": src.meta.get("rendered_context"),
    }
    return write_dataset(out_dir, raw, rows, audit, meta, overwrite=overwrite)
