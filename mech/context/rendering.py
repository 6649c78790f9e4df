"""Rendering a chat in a context with one segment label per token, and the positions two renderings share."""

from __future__ import annotations

import difflib
from typing import Any, Sequence

from mech.context.labels import CONTENT_LABELS, TEMPLATE, Context, Rendered, Span
from mech.context.template import check_tokenizer, content_spans, plan, probe

def label_tokens(offsets: Sequence[tuple[int, int]], spans: Sequence[Span]) -> list[str]:
    """One label per token from character offsets.

    A token overlapping content spans gets the label of the span it overlaps most (ties: the earlier span),
    even if it also covers scaffolding; a zero-width token strictly inside a span gets that span's label;
    everything else is ``template``.
    """
    labels = []
    for s, e in offsets:
        best, best_overlap = TEMPLATE, 0
        for sp in spans:
            overlap = min(e, sp.end) - max(s, sp.start)
            if s == e and sp.start < s < sp.end:
                overlap = 1  # zero-width token inside content
            if overlap > best_overlap:
                best, best_overlap = sp.label, overlap
        labels.append(best)
    return labels


def render(
    tokenizer: Any,
    context: Context | str,
    user: str,
    assistant: str | None = None,
    add_generation_prompt: bool | None = None,
) -> Rendered:
    """Render ``[system per context], user[, assistant]`` through the model's own chat template and label it.

    ``add_generation_prompt=None`` means: append the generation prompt iff there is no assistant turn.
    Tokenisation is ``tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)``: the template
    already wrote every special token it wants. ``none`` uses the template's ``add_default_system_prompt=False``
    where honoured; otherwise a template that auto-inserts a default gets a sentinel system turn whose whole
    block is cut out (see ``_system_block``), which for ChatML equals a rendering with no system turn.
    """
    check_tokenizer(tokenizer)
    ctx = Context.parse(context) if isinstance(context, str) else context
    agp = assistant is None if add_generation_prompt is None else add_generation_prompt
    turns = [("user", user)] + ([("assistant", assistant)] if assistant is not None else [])
    text, spans = content_spans(tokenizer, ctx, plan(tokenizer, ctx, probe(tokenizer), turns), agp)
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    offsets = [(int(s), int(e)) for s, e in enc["offset_mapping"]]
    return Rendered(
        text=text,
        input_ids=[int(i) for i in enc["input_ids"]],
        offsets=offsets,
        segments=label_tokens(offsets, spans),
        spans=tuple(spans),
    )


# --------------------------------------------------------------------------------------------- shared positions


def shared_positions(
    eval_rendered: Rendered, train_rendered: Rendered, include_content: bool = False
) -> list[int]:
    """Positions of the evaluation prompt that it shares with the training context.

    Rule: align the two token-id sequences with ``difflib.SequenceMatcher(autojunk=False)``; an eval position
    is shared iff it lies in a matching block *and* its aligned training token has the same segment label.
    ``user``/``assistant`` positions are excluded unless ``include_content`` (the questions differ between
    finetuning and evaluation, so content tokens matching by chance were not "seen in both"). So a default
    system prompt is shared only with a training context that also carried it as ``default_system``.
    """
    matcher = difflib.SequenceMatcher(None, eval_rendered.input_ids, train_rendered.input_ids, autojunk=False)
    shared = []
    for a, b, size in matcher.get_matching_blocks():
        for k in range(size):
            label = eval_rendered.segments[a + k]
            if label != train_rendered.segments[b + k]:
                continue
            if label in CONTENT_LABELS and not include_content:
                continue
            shared.append(a + k)
    return sorted(shared)


def shared_mask(eval_rendered: Rendered, train_rendered: Rendered, include_content: bool = False) -> list[bool]:
    """:func:`shared_positions` as one bool per eval token."""
    mask = [False] * len(eval_rendered)
    for i in shared_positions(eval_rendered, train_rendered, include_content):
        mask[i] = True
    return mask
