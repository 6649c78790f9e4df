"""How a chat template treats the system turn, and the labelled character spans of a rendering.

Everything here renders sentinel chats through the model's own template and reads off where each message's
content landed; mech.context.rendering tokenises the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from mech.context.labels import ASSISTANT, CUSTOM_SYSTEM, DEFAULT_SYSTEM, USER, Context, Span
from mech.errors import MechError

# Plain alphanumerics, so templates that trim or escape content leave them intact.
_SYSTEM_SENTINEL = "QQMECHSENTINELSYSTEMQQ"
_USER_SENTINEL = "QQMECHSENTINELUSERQQ"
_ROLE_LABEL = {"system": CUSTOM_SYSTEM, "user": USER, "assistant": ASSISTANT}

def model_name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def check_tokenizer(tokenizer: Any) -> None:
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


def probe(tokenizer: Any) -> _Probe:
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
    check_tokenizer(tokenizer)
    return probe(tokenizer).default_text


# --------------------------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class _Plan:
    """How to render a context: messages (role, content), template kwargs, and whether to cut a system block."""

    messages: tuple[tuple[str, str], ...]
    kwargs: tuple[tuple[str, Any], ...]
    cut_system: bool  # messages[0] is a sentinel system turn whose whole block is cut out afterwards
    default_text: str | None  # the auto-inserted default to label, if any


def plan(tokenizer: Any, context: Context, probed: _Probe, turns: list[tuple[str, str]]) -> _Plan:
    if context.policy == "default":
        return _Plan(tuple(turns), (), False, probed.default_text or None)
    if context.policy == "none":
        if probed.default_text is None:
            return _Plan(tuple(turns), (), False, None)
        if probed.honours_no_default_kwarg:
            return _Plan(tuple(turns), (("add_default_system_prompt", False),), False, None)
        return _Plan((("system", _SYSTEM_SENTINEL), *turns), (), True, None)
    if not probed.renders_system:
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
    return _system_block_with_preamble(before, sys_at, next_at, between, next_role)


def _system_block_with_preamble(before: str, sys_at: tuple[int, int], next_at: int, between: str,
                                next_role: str) -> tuple[int, int]:
    """The system block of a template that writes its own text between the system header and the system content
    (Llama-3.1: "Cutting Knowledge Date: …\nToday Date: …\n\n", written even with no system message).

    The next turn's header is the longest suffix of ``between`` that names ``next_role``; the system header is
    that header with the role renamed, found last in ``before``. The block, preamble included, runs from it to the
    next header: ``none`` then means no system block at all (the date lines go with it)."""
    for k in range(len(between), 0, -1):
        next_header = between[-k:]
        if next_role not in next_header:
            continue
        start = before.rfind(next_header.replace(next_role, "system"))
        if start >= 0:
            return start, next_at - k
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


def content_spans(
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
