"""Cloud et al.'s number-sequence prompts, generated deterministically from a seed.

A prompt is ``"{example_prefix} {instruction} {format_suffix} {suffix}"`` with every part drawn from the
pools in ``resources/cloud_number_prompts.json``; the instruction is filled with a count qualifier, the
answer count and a digit descriptor (itself filled with the answer's max digits).

Each prompt has its own row seed, a hash of (run seed, row index), so row i can be regenerated alone
(``prompt_from_seed``) without replaying rows 0..i-1, and adding rows never changes earlier ones.

One deliberate difference from the reference code: it draws counts and values with numpy's
``integers(low, high)``, whose upper bound is exclusive (so 3-7 numbers in 100-998); the paper's text and
the JSON say 3-8 and 100-999, and here both bounds are inclusive as written.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import asdict, dataclass
from typing import Any

from mech.resources import number_prompt_spec
from mech.errors import MechError


@dataclass(frozen=True)
class NumberPromptConfig:
    """Generator parameters; the defaults are the ones the JSON's "source" text states (see spec_config)."""

    example_min_count: int = 3
    example_max_count: int = 8
    example_min_value: int = 100
    example_max_value: int = 999
    answer_count: int = 10
    answer_max_digits: int = 3

    def __post_init__(self) -> None:
        if not 1 <= self.example_min_count <= self.example_max_count:
            raise MechError(
                f"bad seed-number count range {self.example_min_count}-{self.example_max_count}; "
                "need 1 <= example_min_count <= example_max_count"
            )
        if not 0 <= self.example_min_value <= self.example_max_value:
            raise MechError(
                f"bad seed-number value range {self.example_min_value}-{self.example_max_value}; "
                "need 0 <= example_min_value <= example_max_value"
            )
        if self.answer_count < 1 or self.answer_max_digits < 1:
            raise MechError(
                f"answer_count ({self.answer_count}) and answer_max_digits ({self.answer_max_digits}) "
                "must both be at least 1"
            )

    @property
    def answer_max_value(self) -> int:
        """The largest number an answer may hold: the filter's max_value."""
        return 10**self.answer_max_digits - 1


_SOURCE_PARAMS = re.compile(
    r"(?P<cmin>\d+)-(?P<cmax>\d+) seed numbers drawn from (?P<vmin>\d+)-(?P<vmax>\d+), "
    r"answer_count (?P<count>\d+), answer_max_digits (?P<digits>\d+)"
)


def spec_config() -> NumberPromptConfig:
    """The generator parameters as the JSON's "source" text states them (a check on the defaults)."""
    source = number_prompt_spec()["source"]
    m = _SOURCE_PARAMS.search(source)
    if m is None:
        raise MechError(
            "cannot read the generator parameters from the 'source' text of "
            "mech/resources/cloud_number_prompts.json; restore the sentence "
            "'3-8 seed numbers drawn from 100-999, answer_count 10, answer_max_digits 3'"
        )
    g = {k: int(v) for k, v in m.groupdict().items()}
    return NumberPromptConfig(
        example_min_count=g["cmin"],
        example_max_count=g["cmax"],
        example_min_value=g["vmin"],
        example_max_value=g["vmax"],
        answer_count=g["count"],
        answer_max_digits=g["digits"],
    )


@dataclass(frozen=True)
class NumberPrompt:
    text: str
    examples: tuple[int, ...]  # the seed numbers shown in the prompt
    format_suffix_index: int
    seed: int  # the row seed: prompt_from_seed(seed, cfg) regenerates this prompt
    example_prefix_index: int
    instruction_index: int
    count_qualifier_index: int
    digit_descriptor_index: int
    suffix_index: int

    @property
    def format_suffix(self) -> str:
        return number_prompt_spec()["format_suffixes"][self.format_suffix_index]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["examples"] = list(self.examples)
        return d


def row_seed(seed: int, index: int) -> int:
    """The seed of row ``index`` of a run seeded ``seed``: a hash, so rows are independent streams."""
    digest = hashlib.sha256(f"mech.number-prompt:{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # 63 bits: fits a signed int64 column


def prompt_from_seed(seed: int, cfg: NumberPromptConfig = NumberPromptConfig()) -> NumberPrompt:
    """The one prompt that a row seed determines."""
    spec = number_prompt_spec()
    rng = random.Random(seed)
    n = rng.randint(cfg.example_min_count, cfg.example_max_count)
    examples = tuple(rng.randint(cfg.example_min_value, cfg.example_max_value) for _ in range(n))
    i_prefix = rng.randrange(len(spec["example_prefixes"]))
    i_qual = rng.randrange(len(spec["count_qualifiers"]))
    i_digit = rng.randrange(len(spec["digit_descriptors"]))
    i_instr = rng.randrange(len(spec["instructions"]))
    i_format = rng.randrange(len(spec["format_suffixes"]))
    i_suffix = rng.randrange(len(spec["suffixes"]))

    example_part = spec["example_prefixes"][i_prefix].format(examples=", ".join(map(str, examples)))
    digit_descriptor = spec["digit_descriptors"][i_digit].format(max_digits=cfg.answer_max_digits)
    instruction = spec["instructions"][i_instr].format(
        count_qualifier=spec["count_qualifiers"][i_qual],
        answer_count=cfg.answer_count,
        digit_descriptor=digit_descriptor,
    )
    text = spec["prompt"].format(
        example_prefix=example_part,
        instruction=instruction,
        format_suffix=spec["format_suffixes"][i_format],
        suffix=spec["suffixes"][i_suffix],
    )
    return NumberPrompt(
        text=text,
        examples=examples,
        format_suffix_index=i_format,
        seed=seed,
        example_prefix_index=i_prefix,
        instruction_index=i_instr,
        count_qualifier_index=i_qual,
        digit_descriptor_index=i_digit,
        suffix_index=i_suffix,
    )


def generate_prompts(
    n: int, seed: int, cfg: NumberPromptConfig = NumberPromptConfig()
) -> list[NumberPrompt]:
    """``n`` prompts; the same (n, seed, cfg) always gives the same list, and a longer run extends a shorter."""
    if n < 0:
        raise MechError(f"number of prompts must be >= 0, got {n}")
    return [prompt_from_seed(row_seed(seed, i), cfg) for i in range(n)]


# How an answer looks for each format suffix. Ambiguous suffixes get the natural reading:
# "comma-delimited sequence" and "number1, number2, number3, ..." are rendered "1, 2, 3" (comma + space,
# as the suffixes themselves write it), "space-delimited values" is "1 2 3". Keyed by the suffix text,
# not its index, so an edited JSON fails loudly instead of silently shifting renderings.
STYLE_COMMA, STYLE_SPACE, STYLE_SEMICOLON = "comma", "space", "semicolon"
STYLE_NEWLINE, STYLE_BRACKETS, STYLE_PARENS = "newline", "brackets", "parens"

FORMAT_STYLES: dict[str, str] = {
    "Return a comma-separated list of numbers.": STYLE_COMMA,
    "Return a space-separated list of numbers.": STYLE_SPACE,
    "Return a semicolon-separated list of numbers.": STYLE_SEMICOLON,
    "Return one number per line.": STYLE_NEWLINE,
    "Return the numbers in the following format: [number_1, number_2, ...].": STYLE_BRACKETS,
    "Return the numbers in the following format: (number_1, number_2, ...).": STYLE_PARENS,
    "Return the numbers in the following format: number_1, number_2, ...": STYLE_COMMA,
    "Provide the numbers separated by commas.": STYLE_COMMA,
    "List the numbers with spaces between them.": STYLE_SPACE,
    "Write the numbers on separate lines.": STYLE_NEWLINE,
    "Format the output as: number1, number2, number3, ...": STYLE_COMMA,
    "Return numbers separated by semicolons.": STYLE_SEMICOLON,
    "Format as a simple comma-delimited sequence.": STYLE_COMMA,
    "Present as space-delimited values.": STYLE_SPACE,
    "List each number on its own line with no other text.": STYLE_NEWLINE,
}

_JOINERS = {
    STYLE_COMMA: ("", ", ", ""),
    STYLE_SPACE: ("", " ", ""),
    STYLE_SEMICOLON: ("", "; ", ""),
    STYLE_NEWLINE: ("", "\n", ""),
    STYLE_BRACKETS: ("[", ", ", "]"),
    STYLE_PARENS: ("(", ", ", ")"),
}


def format_style(format_suffix_index: int) -> str:
    suffixes = number_prompt_spec()["format_suffixes"]
    if not 0 <= format_suffix_index < len(suffixes):
        raise MechError(
            f"format suffix index {format_suffix_index} out of range; expected 0-{len(suffixes) - 1}"
        )
    suffix = suffixes[format_suffix_index]
    if suffix not in FORMAT_STYLES:
        raise MechError(
            f"format suffix {suffix!r} has no rendering; "
            "add it to FORMAT_STYLES in mech/teacher/prompts.py"
        )
    return FORMAT_STYLES[suffix]


def format_numbers(numbers: list[int], format_suffix_index: int) -> str:
    """An answer listing ``numbers`` the way format suffix ``format_suffix_index`` asks for."""
    if not numbers:
        raise MechError("cannot format an empty answer; pass at least one number")
    open_, sep, close = _JOINERS[format_style(format_suffix_index)]
    return open_ + sep.join(str(int(x)) for x in numbers) + close
