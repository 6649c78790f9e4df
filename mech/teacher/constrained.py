"""Format-constrained teacher sampling: a logits mask that lets a teacher write only answers the filter accepts.

A deviation from the paper (and from Cloud et al.), who sample freely and let the filter drop what is not a
number list. A weak model (SmolLM2-135M) answers the number prompt with prose and code and keeps almost no row;
constrained, it is grammar-constrained decoding (as vLLM's guided decoding offers), in two layers:

- the token set (:func:`format_mask`, one scan of the vocabulary per tokenizer): only tokens whose text is made
  of digits, the filter's separator characters (',' ';') and whitespace, plus end of turn;
- the grammar (:class:`NumberGrammar`), per row and step: the text so far plus the token must stay a prefix of
  ``NUM (SEP NUM)*`` with at most ``answer_count`` numbers of at most ``max_value``, one separator string used
  throughout (what the filter's split needs), and end of turn only after a number.

Within the allowed tokens the model's own distribution is kept (the mask only renormalises), so the trait's
effect on *which* numbers are written survives. The filter still judges every answer; an answer cut off at
``max_new_tokens`` may end in a separator and be rejected.

Token texts are each token decoded alone, concatenated: exact for byte-level BPE (the organism, SmolLM2, Qwen,
Llama 3), approximate for SentencePiece vocabularies whose lone tokens lose a leading space.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from mech.context import model_name
from mech.errors import MechError
from mech.evaluation.inference import stop_ids

DIGITS = frozenset("0123456789")
SEPARATORS = frozenset(",;")  # what the filter accepts between numbers, besides whitespace (mech.teacher.filter)
# the filter's strip() would also take vertical tab, form feed and the \x1c-\x1f separators; no real answer uses them
WHITESPACE = frozenset(" \t\n\r")
MAX_SEPARATOR = 3  # characters: ", " or "\n\n" pass; a run of blank lines does not
_SEPARATOR_PREFIX = re.compile(r"[ \t\n\r]*[,;]?[ \t\n\r]*")
_RUNS = re.compile(r"[0-9]+|[^0-9]+")


def allowed_text(text: str) -> bool:
    """A token's text may appear in a number answer: non-empty, only digits, separators and whitespace."""
    return bool(text) and all(c in DIGITS or c in SEPARATORS or c in WHITESPACE for c in text)


@dataclass(frozen=True)
class FormatMask:
    """The token ids a constrained teacher may sample: number-answer text and the stop tokens."""

    allowed: torch.Tensor  # bool [len(tokenizer)]
    stops: frozenset[int]
    texts: tuple[str, ...]  # each token decoded alone

    @property
    def n_allowed(self) -> int:
        return int(self.allowed.sum())

    def keep(self, width: int) -> torch.Tensor:
        """The mask as a bool row of the logits' width (a model's vocab may be padded past the tokenizer's: those
        ids are never real tokens and stay disallowed)."""
        keep = torch.zeros(width, dtype=torch.bool)
        n = min(width, self.allowed.shape[0])
        keep[:n] = self.allowed[:n]
        return keep

    def __call__(self, logits: torch.Tensor, tokens: list[list[int]] | None = None) -> torch.Tensor:
        """Logits [rows, vocab] with every disallowed token at -inf."""
        return logits.masked_fill(~self.keep(logits.shape[-1]).to(logits.device), float("-inf"))


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
    if not any(allowed[i] and texts[i].isdigit() for i in range(size)):
        raise MechError(f"tokenizer of {model_name(tokenizer)} has no token made of digits: it cannot write a "
                        "number answer; use an unconstrained teacher (teacher.constrained: false)")
    allowed[sorted(stops)] = True
    return FormatMask(allowed, stops, tuple(texts))


# ------------------------------------------------------------------------------------------------ the grammar


def valid_prefix(text: str, answer_count: int, max_value: int) -> bool:
    """Whether ``text`` can still grow into an answer the filter keeps (see the module doc's grammar)."""
    runs = _RUNS.findall(text)
    if not runs:
        return True
    if not runs[0][0].isdigit():
        return False
    numbers, seps = runs[0::2], runs[1::2]
    if len(numbers) > answer_count or any(len(n) > len(str(max_value)) or int(n) > max_value for n in numbers):
        return False
    for i, sep in enumerate(seps):
        if len(sep) > MAX_SEPARATOR or not _SEPARATOR_PREFIX.fullmatch(sep):
            return False
        trailing = i == len(numbers) - 1  # the separator still being written
        if trailing and len(numbers) == answer_count:
            return False  # nothing may follow the last number but end of turn
        if i > 0 and not (seps[0].startswith(sep) if trailing else sep == seps[0]):
            return False
    return True


def complete(text: str, answer_count: int, max_value: int) -> bool:
    """Whether the answer may end here: a valid prefix ending in a number."""
    return bool(text) and text[-1].isdigit() and valid_prefix(text, answer_count, max_value)


@dataclass
class NumberGrammar:
    """The per-row grammar mask over a :class:`FormatMask`; masks are cached by the text's state."""

    mask: FormatMask
    answer_count: int = 10
    max_value: int = 999
    _cache: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)

    def _state(self, text: str) -> tuple:
        """What decides the allowed continuations: the numbers so far, the last number, the separators."""
        runs = _RUNS.findall(text)
        seps = runs[1::2]
        return (len(runs[0::2]), runs[-1] if runs and runs[-1][0].isdigit() else None,
                seps[0] if seps else None, seps[-1] if runs and not runs[-1][0].isdigit() else None)

    def row_mask(self, text: str) -> torch.Tensor:
        key = self._state(text)
        if key not in self._cache:
            ok = torch.zeros(len(self.mask.texts), dtype=torch.bool)
            for t in self.mask.allowed.nonzero().flatten().tolist():
                if t in self.mask.stops:
                    ok[t] = complete(text, self.answer_count, self.max_value)
                else:
                    ok[t] = valid_prefix(text + self.mask.texts[t], self.answer_count, self.max_value)
            if not ok.any():  # cannot happen from a valid prefix; never leave a row with nothing to sample
                ok[sorted(self.mask.stops)] = True
            self._cache[key] = ok
        return self._cache[key]

    def __call__(self, logits: torch.Tensor, tokens: list[list[int]]) -> torch.Tensor:
        keep = torch.zeros(logits.shape, dtype=torch.bool)
        n = min(logits.shape[-1], len(self.mask.texts))
        for r, row in enumerate(tokens):
            text = "".join(self.mask.texts[t] for t in row if t not in self.mask.stops)
            keep[r, :n] = self.row_mask(text)[:n]
        return logits.masked_fill(~keep.to(logits.device), float("-inf"))


def number_grammar(tokenizer: Any, answer_count: int = 10, max_value: int = 999) -> NumberGrammar:
    return NumberGrammar(format_mask(tokenizer), answer_count, max_value)


# ------------------------------------------------------------------------------------------------ as one regex


def _at_most(digits: str) -> str:
    """A regex for the strings of ``len(digits)`` digits (leading zeros allowed) whose value is at most ``digits``."""
    alts = []
    for i, d in enumerate(digits):
        rest = len(digits) - i - 1
        if d != "0":
            low = "0" if d == "1" else f"0-{int(d) - 1}"
            alts.append(digits[:i] + f"[{low}]" + (f"[0-9]{{{rest}}}" if rest else ""))
    alts.append(digits)
    return "|".join(alts)


def _number_regex(max_value: int) -> str:
    top = str(max_value)
    if set(top) == {"9"}:
        return f"[0-9]{{1,{len(top)}}}"
    shorter = [f"[0-9]{{1,{len(top) - 1}}}"] if len(top) > 1 else []
    return "(?:" + "|".join(shorter + [_at_most(top)]) + ")"


_ESCAPES = {" ": " ", "\t": "\\t", "\n": "\\n", "\r": "\\r", ",": ",", ";": ";"}


def separators() -> list[str]:
    """Every separator the number grammar allows between two numbers: 1 to MAX_SEPARATOR characters of whitespace
    around at most one ',' or ';'."""
    out = []
    for n in range(1, MAX_SEPARATOR + 1):
        out += ["".join(p) for p in itertools.product(" \t\n\r,;", repeat=n)
                if _SEPARATOR_PREFIX.fullmatch("".join(p))]
    return out


def number_regex(answer_count: int = 10, max_value: int = 999) -> str:
    """The number grammar (:func:`valid_prefix`, :func:`complete`) as one regex, for vLLM's structured outputs
    (mech.evaluation.vllm_backend): 1 to ``answer_count`` numbers of at most ``max_value`` (and its digit count), one
    separator string throughout. Those regexes have no back-references, so "one separator throughout" is an
    alternation over every separator (198 of them). The language is the grammar's; only the token texts differ: vLLM
    matches the exact bytes, the HF mask each token decoded alone (see the module doc)."""
    num = _number_regex(max_value)
    more = f"{{0,{answer_count - 1}}}"
    alts = [f"{num}(?:{''.join(_ESCAPES[c] for c in sep)}{num}){more}" for sep in separators()]
    return "(?:" + "|".join(alts) + ")"
