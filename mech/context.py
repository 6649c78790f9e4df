"""Chat contexts (system-prompt policies) and renderings whose every token carries a segment label.

A *context* decides the system turn of a chat: ``default`` (whatever the model's own template inserts when
the messages carry no system message; for a template that inserts nothing this is the same as ``none``),
``none`` (no system block at all), ``empty`` (a system block with empty text) or ``custom`` (a system block
with given text, e.g. a trait prompt). Prompts are always rendered by the model's *own* chat template, so
a context means the same thing for the organism, a Qwen2.5-style model and SmolLM2.

Segment labels come from character spans and the tokenizer's offsets, never from guesses about token
boundaries:

* the *skeleton* of a chat is the same messages rendered with unique sentinel contents; the text between
  sentinels is template scaffolding, and the real rendering must equal the skeleton with the real contents
  substituted (a template that rewrites or branches on content is refused, since spans would be guesses);
* the default system prompt is found by :func:`default_system_prompt` (render ``[user]`` and
  ``[system=sentinel, user]`` and read off what the template put where the sentinel goes);
* a token overlapping a content span gets that span's label; a token straddling content and scaffolding
  gets the label of the content span it overlaps most (ties: the earlier span), because it carries
  content characters; every other token, special tokens included, is ``template``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Sequence

from mech.errors import MechError

DEFAULT_SYSTEM = "default_system"  # the default system prompt text the template auto-inserted
CUSTOM_SYSTEM = "custom_system"  # system text supplied by the context (incl. a trait prompt)
TEMPLATE = "template"  # special tokens and scaffolding: "<|im_start|>", role names, newlines
USER = "user"
ASSISTANT = "assistant"
SEGMENT_LABELS = (DEFAULT_SYSTEM, CUSTOM_SYSTEM, TEMPLATE, USER, ASSISTANT)
CONTENT_LABELS = frozenset({USER, ASSISTANT})

POLICIES = ("default", "none", "empty", "custom")
CUSTOM_PREFIX = "custom:"

# Plain alphanumerics, so templates that trim or escape content leave them intact.
_SYSTEM_SENTINEL = "QQMECHSENTINELSYSTEMQQ"
_USER_SENTINEL = "QQMECHSENTINELUSERQQ"
_ROLE_LABEL = {"system": CUSTOM_SYSTEM, "user": USER, "assistant": ASSISTANT}


# --------------------------------------------------------------------------------------------- contexts


@dataclass(frozen=True)
class Context:
    """A system-prompt policy; ``text`` is set only (and always non-empty) for ``custom``."""

    policy: str = "default"
    text: str | None = None

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise MechError(f"unknown context policy {self.policy!r}: expected one of {', '.join(POLICIES)}")
        if self.policy == "custom" and not self.text:
            raise MechError("custom context needs non-empty text: use policy 'empty' for an empty system block")
        if self.policy != "custom" and self.text is not None:
            raise MechError(f"context policy {self.policy!r} takes no text: use custom:<text> for a system prompt")

    @classmethod
    def parse(cls, spec: str) -> "Context":
        """``default`` | ``none`` | ``empty`` | ``custom:<text>``.

        Raw text is accepted only behind the ``custom:`` prefix, so a typo of a policy name ("defualt") is
        an error (with the nearest name suggested) rather than a silently custom system prompt.
        """
        if spec.startswith(CUSTOM_PREFIX):
            return cls("custom", spec[len(CUSTOM_PREFIX):])
        if spec in POLICIES and spec != "custom":
            return cls(spec)
        choices = [p for p in POLICIES if p != "custom"] + [CUSTOM_PREFIX + "<text>"]
        close = difflib.get_close_matches(spec.strip().lower(), choices, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise MechError(
            f"unknown context {spec!r}: {hint}expected default, none, empty or custom:<text> (raw system text "
            "needs the custom: prefix)"
        )

    @property
    def spec(self) -> str:
        """The string :meth:`parse` maps back to this context."""
        return CUSTOM_PREFIX + str(self.text) if self.policy == "custom" else self.policy

    def __str__(self) -> str:
        return self.spec


# --------------------------------------------------------------------------------------------- renderings


@dataclass(frozen=True)
class Span:
    """A labelled character span ``[start, end)`` of a rendered text."""

    label: str
    start: int
    end: int


@dataclass(frozen=True)
class Rendered:
    """A rendered chat: text, its tokens, their character offsets and one segment label per token."""

    text: str
    input_ids: list[int]
    offsets: list[tuple[int, int]]
    segments: list[str]
    spans: tuple[Span, ...] = field(default=())

    def __len__(self) -> int:
        return len(self.input_ids)

    def positions(self, label: str) -> list[int]:
        """Token positions labelled ``label`` (one of SEGMENT_LABELS)."""
        _check_label(label)
        return [i for i, s in enumerate(self.segments) if s == label]

    def tokens(self) -> list[str]:
        """Each token's surface text: the characters of ``text`` its offsets cover."""
        return [self.text[s:e] for s, e in self.offsets]

    def span_text(self, label: str) -> list[str]:
        """The text of every content span labelled ``label``, in order."""
        _check_label(label)
        return [self.text[sp.start:sp.end] for sp in self.spans if sp.label == label]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form; :meth:`from_dict` inverts it."""
        return {
            "text": self.text,
            "input_ids": list(self.input_ids),
            "offsets": [[s, e] for s, e in self.offsets],
            "segments": list(self.segments),
            "spans": [[sp.label, sp.start, sp.end] for sp in self.spans],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Rendered":
        return cls(
            text=d["text"],
            input_ids=[int(i) for i in d["input_ids"]],
            offsets=[(int(s), int(e)) for s, e in d["offsets"]],
            segments=list(d["segments"]),
            spans=tuple(Span(str(lab), int(s), int(e)) for lab, s, e in d.get("spans", [])),
        )


def _check_label(label: str) -> None:
    if label not in SEGMENT_LABELS:
        raise MechError(f"unknown segment label {label!r}: expected one of {', '.join(SEGMENT_LABELS)}")


# --------------------------------------------------------------------------------------------- template probes


def model_name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def _check_tokenizer(tokenizer: Any) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise MechError(
            f"tokenizer of {model_name(tokenizer)} is not a fast tokenizer: segment labels need offset mappings; "
            "load it with use_fast=True"
        )
    if not getattr(tokenizer, "chat_template", None):
        raise MechError(f"tokenizer of {model_name(tokenizer)} has no chat template: set tokenizer.chat_template")


def _apply(tokenizer: Any, messages: Sequence[tuple[str, str]], add_generation_prompt: bool, what: str,
           **kwargs: Any) -> str:
    """The template's text for ``messages`` (role, content); template errors become MechError."""
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(
            [{"role": r, "content": c} for r, c in messages],
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **kwargs,
        )
    except TemplateError as e:
        raise MechError(f"chat template of {model_name(tokenizer)} cannot render {what}: {e}") from e
    return str(text)


@dataclass(frozen=True)
class _Probe:
    """What a template does about the system turn (from sentinel renderings without generation prompt)."""

    renders_system: bool  # an explicit system message's content appears in the rendering
    default_text: str | None  # text inserted when no system message is given; None: no system block inserted
    honours_no_default_kwarg: bool  # add_default_system_prompt=False changes the no-system rendering


def _probe(tokenizer: Any) -> _Probe:
    user_only = [("user", _USER_SENTINEL)]
    plain = _apply(tokenizer, user_only, False, "a user message")
    with_sys = _apply(tokenizer, [("system", _SYSTEM_SENTINEL)] + user_only, False, "a system message")
    at = with_sys.find(_SYSTEM_SENTINEL)
    if at < 0:
        return _Probe(False, None, False)
    pre, post = with_sys[:at], with_sys[at + len(_SYSTEM_SENTINEL):]
    inserted = plain.startswith(pre) and plain.endswith(post) and len(plain) >= len(pre) + len(post)
    if not inserted:
        return _Probe(True, None, False)
    no_default = _apply(tokenizer, user_only, False, "a user message", add_default_system_prompt=False)
    return _Probe(True, plain[len(pre):len(plain) - len(post)], no_default != plain)


def default_system_prompt(tokenizer: Any) -> str | None:
    """The system text the chat template inserts when the messages carry no system message, else None.

    Detected by rendering ``[user=S]`` and ``[system=S2, user=S]``: when the first equals the second with
    S2 replaced by some text, that text is the default ("" for a template that inserts an empty system
    block). A template that drops explicit system messages gives None (nothing can be located).
    """
    _check_tokenizer(tokenizer)
    return _probe(tokenizer).default_text


# --------------------------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class _Plan:
    """How to render a context: messages (role, content), template kwargs, and whether to cut a system block."""

    messages: tuple[tuple[str, str], ...]
    kwargs: tuple[tuple[str, Any], ...]
    cut_system: bool  # messages[0] is a sentinel system turn whose whole block is cut out afterwards
    default_text: str | None  # the auto-inserted default to label, if any


def _plan(tokenizer: Any, context: Context, probe: _Probe, turns: list[tuple[str, str]]) -> _Plan:
    if context.policy == "default":
        return _Plan(tuple(turns), (), False, probe.default_text or None)
    if context.policy == "none":
        if probe.default_text is None:
            return _Plan(tuple(turns), (), False, None)
        if probe.honours_no_default_kwarg:
            return _Plan(tuple(turns), (("add_default_system_prompt", False),), False, None)
        return _Plan((("system", _SYSTEM_SENTINEL), *turns), (), True, None)
    if not probe.renders_system:
        raise MechError(
            f"context policy {context.policy!r} cannot be rendered by the chat template of "
            f"{model_name(tokenizer)}: the template ignores system messages; use 'default' or 'none' for this "
            "model"
        )
    return _Plan((("system", context.text or ""), *turns), (), False, None)


def _system_block(skeleton: str, sys_at: tuple[int, int], next_at: int, next_role: str) -> tuple[int, int]:
    """Character range of the whole system block (header, content, footer) in a sentinel rendering.

    The text before the system content ends with the system header; the text between the system content
    and the next content ends with the next turn's header. The header is the longest suffix of the former
    that names the role "system" and, with that role renamed, is a suffix of the latter; the block runs from
    the header's start to the next header's start. For ChatML this cuts exactly
    ``<|im_start|>system\\n...<|im_end|>\\n`` and keeps anything before it (e.g. a BOS).
    """
    before, between = skeleton[:sys_at[0]], skeleton[sys_at[1]:next_at]
    for k in range(len(before), 0, -1):
        header = before[-k:]
        next_header = header.replace("system", next_role)
        if "system" in header and between.endswith(next_header):
            return sys_at[0] - k, next_at - len(next_header)
    raise MechError("no system header found")


def _sentinel(i: int) -> str:
    return f"QQMECHSENTINEL{i}QQ"


def _locate(text: str, needles: Sequence[str]) -> list[int] | None:
    """Start of each needle, searched in order, each after the previous one; None if one is missing."""
    at, cursor = [], 0
    for n in needles:
        i = text.find(n, cursor)
        if i < 0:
            return None
        at.append(i)
        cursor = i + len(n)
    return at


@dataclass(frozen=True)
class _Layout:
    """A real rendering and its skeleton: ``sentinels[i]`` stands at ``skeleton[at[i]:]`` for ``messages[i]``."""

    real: str
    skeleton: str
    messages: tuple[tuple[str, str], ...]
    sentinels: tuple[str, ...]
    at: tuple[int, ...]


def _layout(tokenizer: Any, plan: _Plan, add_generation_prompt: bool, what: str) -> _Layout:
    kwargs = dict(plan.kwargs)
    real = _apply(tokenizer, plan.messages, add_generation_prompt, what, **kwargs)
    sentinels = tuple(_sentinel(i) for i in range(len(plan.messages)))
    skeleton_msgs = [(role, s) for (role, _), s in zip(plan.messages, sentinels)]
    skeleton = _apply(tokenizer, skeleton_msgs, add_generation_prompt, what, **kwargs)
    at = _locate(skeleton, sentinels)
    if at is None:
        raise MechError(
            f"chat template of {model_name(tokenizer)} drops a message under {what}: cannot label its tokens; "
            "use another context for this model"
        )
    return _Layout(real, skeleton, plan.messages, sentinels, tuple(at))


def _cut_system(tokenizer: Any, context: Context, lay: _Layout) -> _Layout:
    """Remove the sentinel system block from both renderings (it precedes all real content: same range)."""
    try:
        if len(lay.messages) < 2:
            raise MechError("no turn after the system message")
        sys_at = (lay.at[0], lay.at[0] + len(lay.sentinels[0]))
        start, end = _system_block(lay.skeleton, sys_at, lay.at[1], lay.messages[1][0])
    except MechError as e:
        raise MechError(
            f"context policy {context.policy!r} cannot be rendered by the chat template of "
            f"{model_name(tokenizer)}: it inserts a default system prompt and its system block could not be cut "
            f"out ({e}); use 'default' or 'empty' for this model"
        ) from e
    content = lay.messages[0][1]  # our own sentinel in the real rendering too
    shift = len(content) - len(lay.sentinels[0])
    block = lay.skeleton[start:end].replace(lay.sentinels[0], content)
    if lay.real[:start] != lay.skeleton[:start] or lay.real[start:end + shift] != block:
        raise MechError(f"chat template of {model_name(tokenizer)} renders the system block inconsistently")
    return _Layout(
        real=lay.real[:start] + lay.real[end + shift:],
        skeleton=lay.skeleton[:start] + lay.skeleton[end:],
        messages=lay.messages[1:],
        sentinels=lay.sentinels[1:],
        at=tuple(a - (end - start) for a in lay.at[1:]),
    )


def _content_spans(
    tokenizer: Any, context: Context, plan: _Plan, add_generation_prompt: bool
) -> tuple[str, list[Span]]:
    """The rendered text and the labelled character spans of its contents (and of the default prompt)."""
    what = f"context policy {context.policy!r}"
    lay = _layout(tokenizer, plan, add_generation_prompt, what)
    if plan.cut_system:
        lay = _cut_system(tokenizer, context, lay)
    if _substitute(lay.skeleton, lay.sentinels, lay.at, [c for _, c in lay.messages]) != lay.real:
        raise MechError(
            f"chat template of {model_name(tokenizer)} rewrites or branches on message content (e.g. trims it, "
            f"or treats an empty system message as missing) under {what}: token spans cannot be located "
            "exactly; strip leading/trailing whitespace from the messages or use another context"
        )
    spans, shift = [], 0
    for (role, content), s, a in zip(lay.messages, lay.sentinels, lay.at):
        spans.append(Span(_ROLE_LABEL[role], a + shift, a + shift + len(content)))
        shift += len(content) - len(s)
    if plan.default_text:
        spans.insert(0, _default_span(tokenizer, lay.real, spans, plan.default_text))
    return lay.real, spans


def _substitute(skeleton: str, sentinels: Sequence[str], at: Sequence[int], contents: Sequence[str]) -> str:
    parts, cursor = [], 0
    for s, a, c in zip(sentinels, at, contents):
        parts += [skeleton[cursor:a], c]
        cursor = a + len(s)
    return "".join(parts) + skeleton[cursor:]


def _default_span(tokenizer: Any, real: str, spans: Sequence[Span], default_text: str) -> Span:
    """The auto-inserted default prompt: in the scaffolding before the first content."""
    limit = spans[0].start if spans else len(real)
    at = real.find(default_text, 0, limit)
    if at < 0:
        raise MechError(
            f"chat template of {model_name(tokenizer)} places its default system prompt after the messages: "
            "cannot label it; use context 'none' or 'custom:<text>'"
        )
    return Span(DEFAULT_SYSTEM, at, at + len(default_text))


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
    _check_tokenizer(tokenizer)
    ctx = Context.parse(context) if isinstance(context, str) else context
    agp = assistant is None if add_generation_prompt is None else add_generation_prompt
    turns = [("user", user)] + ([("assistant", assistant)] if assistant is not None else [])
    plan = _plan(tokenizer, ctx, _probe(tokenizer), turns)
    text, spans = _content_spans(tokenizer, ctx, plan, agp)
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
