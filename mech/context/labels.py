"""Context policies, segment labels and labelled renderings: the data types of mech.context."""


from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

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
        check_label(label)
        return [i for i, s in enumerate(self.segments) if s == label]

    def tokens(self) -> list[str]:
        """Each token's surface text: the characters of ``text`` its offsets cover."""
        return [self.text[s:e] for s, e in self.offsets]

    def span_text(self, label: str) -> list[str]:
        """The text of every content span labelled ``label``, in order."""
        check_label(label)
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


def check_label(label: str) -> None:
    if label not in SEGMENT_LABELS:
        raise MechError(f"unknown segment label {label!r}: expected one of {', '.join(SEGMENT_LABELS)}")
