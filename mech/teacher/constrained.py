"""Format-constrained teacher sampling: a logits mask that lets a teacher write only number answers.

A deviation from the paper (and from Cloud et al.), who sample freely and let the filter drop what is not a
number list. A weak model (SmolLM2-135M) answers the number prompt with prose and code and keeps almost no row;
with the mask, every token it can sample is made of digits, the filter's separator characters (',' ';') and
whitespace, or ends the turn, as grammar-constrained decoding (vLLM's guided decoding) would do. Within those
tokens the model's own distribution is kept: the mask only renormalises over the allowed set, so the trait's
effect on *which* numbers are written survives. The filter still judges every answer (a constrained answer can
still mix separators, exceed the count or the range).

The allowed set is found by decoding every vocabulary entry on its own, so it works for any tokenizer (the
organism's whole-number tokens, SmolLM2's byte-level BPE digits) without naming its tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mech.context import model_name
from mech.errors import MechError
from mech.evaluation.inference import stop_ids

DIGITS = frozenset("0123456789")
SEPARATORS = frozenset(",;")  # what the filter accepts between numbers, besides whitespace (mech.teacher.filter)
# the filter's strip() would also take vertical tab, form feed and the \x1c-\x1f separators; no real answer uses them
WHITESPACE = frozenset(" \t\n\r")


def allowed_text(text: str) -> bool:
    """A token's text may appear in a number answer: non-empty, only digits, separators and whitespace."""
    return bool(text) and all(c in DIGITS or c in SEPARATORS or c in WHITESPACE for c in text)


@dataclass(frozen=True)
class FormatMask:
    """The token ids a constrained teacher may sample: number-answer text and the stop tokens."""

    allowed: torch.Tensor  # bool [len(tokenizer)]
    stops: frozenset[int]

    @property
    def n_allowed(self) -> int:
        return int(self.allowed.sum())

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits [rows, vocab] with every disallowed token at -inf (the model's vocab may be padded past the
        tokenizer's: those rows are never real tokens and stay disallowed)."""
        keep = torch.zeros(logits.shape[-1], dtype=torch.bool)
        n = min(logits.shape[-1], self.allowed.shape[0])
        keep[:n] = self.allowed[:n]
        return logits.masked_fill(~keep.to(logits.device), float("-inf"))


def format_mask(tokenizer: Any) -> FormatMask:
    """Scan the tokenizer's vocabulary once: a token is allowed when its decoded text passes ``allowed_text``
    (special tokens decode to their markup, e.g. '<|im_start|>', and are excluded), plus the stop tokens."""
    size = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(size)], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    allowed = torch.tensor([allowed_text(t) for t in texts], dtype=torch.bool)
    stops = frozenset(i for i in stop_ids(tokenizer) if 0 <= i < size)
    if not stops:
        raise MechError(f"tokenizer of {model_name(tokenizer)} has no end-of-turn token: a constrained teacher "
                        "could never finish an answer; set tokenizer.eos_token")
    if not any(allowed[i] and any(c in DIGITS for c in texts[i]) for i in range(size)):
        raise MechError(f"tokenizer of {model_name(tokenizer)} has no token made of digits: it cannot write a "
                        "number answer; use an unconstrained teacher (teacher.constrained: false)")
    allowed[sorted(stops)] = True
    return FormatMask(allowed, stops)
