"""Cloud et al.'s filter on number answers, with a reason for every rejection and an audit of a run.

The rules (the JSON's "filter_rules", and the reference ``parse_response`` / ``get_reject_reasons``):
strip an optional trailing period, then an optional enclosing [] or (); the separator is whatever lies
between the first two numbers, and after stripping whitespace it must be empty (spaces / newlines), ','
or ';'; that exact separator string splits the whole answer; every part must be ASCII digits only;
reject more than ``answer_count`` numbers, values < 0 or > ``max_value``, and banned numbers.

Edge cases, decided here (the reference code is the tie-breaker where it decides):
- surrounding whitespace of the whole answer is stripped first (sampled answers often end in a newline);
  whitespace *inside* brackets is not: "[ 1, 2 ]" leaves the part " 1" and is rejected, as in the
  reference;
- empty / whitespace-only answer → EMPTY;  text without any digit ("owl", "none") → NO_NUMBERS;
- a single number is accepted ("7", "7.", "[7]"), but only if it is all there is ("7 owls" → BAD_PART);
- "1,2,3" and "1, 2, 3" both pass (separator "," or ", "), as does "1\\n2\\n3" and "1\\r\\n2";
- the separator must repeat exactly: mixed separators ("1, 2; 3", "1,2, 3", "1 2\\n3") → BAD_PART;
- "1.5" has the separator "." → BAD_SEPARATOR; words between numbers ("1 and 2") → BAD_SEPARATOR;
- a minus sign is never part of a number: "-5" → BAD_PART, "1, -5" → BAD_SEPARATOR (the separator is
  ", -"); so the value < 0 rule cannot fire on parsed text and is kept only as the stated rule;
- empty parts (trailing separator "1, 2,", a later doubled one "1,2,,3") → BAD_PART (the reference's
  int('') fails); a doubled first separator ("1,,2") is the separator ",," → BAD_SEPARATOR;
- leading zeros are digits: "007" parses as 7 (the reference does the same);
- non-ASCII digits ("١٢") are not digits here.
When several rules fail, the reason is the first in the order format → count → range → banned.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from mech.errors import MechError

# Reject reason codes (a fixed set: the audit counts by these).
EMPTY = "empty"
NO_NUMBERS = "no_numbers"
BAD_SEPARATOR = "bad_separator"
BAD_PART = "bad_part"
TOO_MANY = "too_many_numbers"
OUT_OF_RANGE = "out_of_range"
BANNED = "banned_number"
REASONS: tuple[str, ...] = (EMPTY, NO_NUMBERS, BAD_SEPARATOR, BAD_PART, TOO_MANY, OUT_OF_RANGE, BANNED)

ANSWER_COUNT = 10
MAX_VALUE = 999
_NUMBER = re.compile(r"[0-9]+")
_ALLOWED_SEPARATORS = ("", ",", ";")


@dataclass(frozen=True)
class FilterResult:
    ok: bool
    reason: str | None  # one of REASONS, None when ok
    numbers: list[int]  # parsed numbers (also when rejected for count/range/banned), else []


def _is_digits(part: str) -> bool:
    return part != "" and all("0" <= c <= "9" for c in part)


def parse_numbers(text: str) -> tuple[list[int], str | None]:
    """(numbers, None) for a well-formed answer, ([], reason) otherwise."""
    answer = text.strip()
    if not answer:
        return [], EMPTY
    if answer.endswith("."):
        answer = answer[:-1]
    if len(answer) >= 2 and (
        (answer[0] == "[" and answer[-1] == "]") or (answer[0] == "(" and answer[-1] == ")")
    ):
        answer = answer[1:-1]

    matches = list(_NUMBER.finditer(answer))
    if not matches:
        return [], NO_NUMBERS
    if len(matches) == 1:
        parts = [answer]
    else:
        separator = answer[matches[0].end() : matches[1].start()]
        if separator.strip() not in _ALLOWED_SEPARATORS:
            return [], BAD_SEPARATOR
        parts = answer.split(separator)
    if not all(_is_digits(p) for p in parts):
        return [], BAD_PART
    return [int(p) for p in parts], None


def check_answer(
    text: str,
    answer_count: int = ANSWER_COUNT,
    max_value: int = MAX_VALUE,
    banned: frozenset[int] = frozenset(),
) -> FilterResult:
    numbers, reason = parse_numbers(text)
    if reason is not None:
        return FilterResult(False, reason, [])
    if len(numbers) > answer_count:
        return FilterResult(False, TOO_MANY, numbers)
    if any(n < 0 or n > max_value for n in numbers):
        return FilterResult(False, OUT_OF_RANGE, numbers)
    if any(n in banned for n in numbers):
        return FilterResult(False, BANNED, numbers)
    return FilterResult(True, None, numbers)


@dataclass
class Audit:
    """What the filter did to a set of rows. Histograms are over the *kept* rows (the training data)."""

    total: int = 0
    kept: int = 0
    rejected: Counter = field(default_factory=Counter)  # reason code → rows
    number_hist: Counter = field(default_factory=Counter)  # value → occurrences in kept answers
    count_hist: Counter = field(default_factory=Counter)  # numbers per kept answer → rows

    @property
    def pass_rate(self) -> float:
        return self.kept / self.total if self.total else 0.0

    def to_dict(self) -> dict[str, Any]:
        # JSON object keys must be strings; sort so the dict (and its hash) is stable
        return {
            "total": self.total,
            "kept": self.kept,
            "pass_rate": self.pass_rate,
            "rejected": {r: self.rejected[r] for r in REASONS if self.rejected[r]},
            "number_hist": {str(k): v for k, v in sorted(self.number_hist.items())},
            "count_hist": {str(k): v for k, v in sorted(self.count_hist.items())},
        }

    def summary(self) -> str:
        rejected = ", ".join(f"{r} {self.rejected[r]}" for r in REASONS if self.rejected[r]) or "none"
        counts = (
            f"{min(self.count_hist)}-{max(self.count_hist)} numbers per answer, "
            f"{len(self.number_hist)} distinct values"
            if self.count_hist
            else "no numbers kept"
        )
        return (
            f"kept {self.kept}/{self.total} rows ({100 * self.pass_rate:.1f}%); "
            f"rejected: {rejected}; {counts}"
        )


def filter_rows(
    rows: Iterable[Mapping[str, Any]],
    answer_key: str = "answer",
    answer_count: int = ANSWER_COUNT,
    max_value: int = MAX_VALUE,
    banned: frozenset[int] = frozenset(),
) -> tuple[list[Mapping[str, Any]], Audit]:
    """The rows whose ``row[answer_key]`` passes the filter (unchanged, in order), and the audit."""
    kept: list[Mapping[str, Any]] = []
    audit = Audit()
    for row in rows:
        if answer_key not in row:
            raise MechError(
                f"row has no {answer_key!r} field (fields: {', '.join(map(str, row))}); "
                "pass answer_key= naming the column that holds the sampled answer"
            )
        result = check_answer(str(row[answer_key]), answer_count, max_value, banned)
        audit.total += 1
        if result.ok:
            audit.kept += 1
            kept.append(row)
            audit.number_hist.update(result.numbers)
            audit.count_hist[len(result.numbers)] += 1
        else:
            audit.rejected[result.reason] += 1
    return kept, audit


def require_rows(kept: list, audit: Audit) -> list:
    """``kept`` unchanged, or a MechError showing the audit when the filter left nothing to train on."""
    if not kept:
        raise MechError(
            f"the number filter left no rows ({audit.summary()}); check the teacher's sampled answers "
            "(format, temperature, max_new_tokens) or generate more prompts"
        )
    return kept
