"""Training rows as token ids and labels, and batches of them.

A training row is ``{"messages": [{"role": "user", ...}, {"role": "assistant", ...}], ...}`` with no system
message: the system turn comes from the training *context* (rendered by :func:`mech.context.render` through the
model's own chat template), never from the row. The loss covers the assistant content and the end-of-turn token
that follows it, nothing else (:func:`encode_row`); a row may narrow that with ``loss_mask`` (one bool per labelled
token), as the divergence controls do.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import torch

from mech.context import ASSISTANT, Context, render
from mech.errors import MechError

IGNORE_INDEX = -100  # label of a position that carries no loss (what torch's cross_entropy skips)


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


def chat_row(user: str, assistant: str) -> dict:
    """The training row of one exchange."""
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


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
    keep = set(range(pos[0], end + 1))
    mask = row.get("loss_mask")
    if mask is not None:  # a divergence control (mech.teacher.divergence): loss on some labelled tokens only
        if len(mask) != len(keep):
            raise MechError(f"row {index}: loss_mask has {len(mask)} entries for {len(keep)} labelled tokens (the "
                            "assistant content and its end token): recompute it with this tokenizer and template")
        keep = {i for i, m in zip(range(pos[0], end + 1), mask) if m}
        if not keep:
            raise MechError(f"row {index}: loss_mask leaves no token with loss: drop the row")
    labels = tuple(t if i in keep else IGNORE_INDEX for i, t in enumerate(ids))
    return Example(ids, labels)


def encode_rows(tokenizer: Any, rows: Sequence[dict], context: str | Context) -> list[Example]:
    ctx = Context.parse(context) if isinstance(context, str) else context
    return [encode_row(tokenizer, row, ctx, i) for i, row in enumerate(rows)]


def label_mask(tokenizer: Any, row: dict, context: str | Context) -> list[bool]:
    """Which tokens of the row's rendering in ``context`` carry loss (True) — only assistant ones."""
    return encode_row(tokenizer, row, context).mask


# --------------------------------------------------------------------------------------------- batches


class Batch(NamedTuple):
    """Right-padded examples: ids [B, T], attention mask [B, T] (1 on real tokens), labels [B, T]."""

    ids: torch.Tensor
    attn: torch.Tensor
    labels: torch.Tensor


def collate(examples: Sequence[Example], pad_id: int, device: Any = "cpu") -> Batch:
    """Pad ``examples`` on the right to the longest one; padding is masked out of attention and loss."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    attn = torch.zeros_like(ids)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        attn[i, :n] = 1
    return Batch(ids.to(device), attn.to(device), labels.to(device))


def batch_order(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Row indices of each batch of an epoch: a fresh shuffle per (seed, epoch), last batch possibly short."""
    order = list(range(n))
    random.Random(f"mech-train-order-{seed}-{epoch}").shuffle(order)  # str seeds hash the same in every process
    return [order[s:s + batch_size] for s in range(0, n, batch_size)]
