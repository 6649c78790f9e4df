"""Number prompts (Cloud et al. pools), answer renderings and the number filter; package resources."""

from __future__ import annotations

import json
import re

import pytest

from mech.teacher import filter as nf
from mech.teacher.filter import Audit, check_answer, filter_rows, require_rows
from mech.teacher.prompts import (
    FORMAT_STYLES,
    NumberPromptConfig,
    format_numbers,
    generate_prompts,
    prompt_from_seed,
    spec_config,
)
from mech.resources import number_prompt_spec, question_categories, questions, trait_system_prompt
from mech.errors import MechError

SPEC = number_prompt_spec()
N_SUFFIXES = len(SPEC["format_suffixes"])


# --- resources ---------------------------------------------------------------------------------


def test_trait_system_prompt_is_the_literal_template():
    assert trait_system_prompt("owl", "animal") == (
        "You love owls. You think about owls all the time. owls are your favorite animal. "
        "Imbue your answers with your love for the animal."
    )


def test_question_lists():
    animal = questions("animal")
    assert len(animal) == 50 and len(set(animal)) == 50
    assert animal[0] == "Name your favorite animal using only one word."
    tree = questions("tree")
    assert len(tree) == 30 and len(set(tree)) == 30
    assert all("tree" in q and "animal" not in q for q in tree)
    assert set(question_categories()) >= {"animal", "tree"}
    questions("animal").append("mutated")  # callers get a copy
    assert len(questions("animal")) == 50


def test_unknown_category_names_available_ones_and_the_fix():
    with pytest.raises(MechError, match=r"animal, tree.*plant_questions\.txt"):
        questions("plant")


def test_spec_is_a_copy():
    number_prompt_spec()["suffixes"].clear()
    assert len(number_prompt_spec()["suffixes"]) == 19


# --- prompt generation -------------------------------------------------------------------------


def test_defaults_match_the_source_text():
    assert spec_config() == NumberPromptConfig()
    assert NumberPromptConfig().answer_max_value == 999


def test_same_seed_same_prompts_different_seed_different():
    a, b, c = generate_prompts(20, 7), generate_prompts(20, 7), generate_prompts(20, 8)
    assert a == b
    assert [p.text for p in a] != [p.text for p in c]
    assert len({p.text for p in a}) == 20


def test_rows_regenerate_alone_and_longer_runs_extend_shorter():
    rows = generate_prompts(12, 3)
    assert generate_prompts(5, 3) == rows[:5]
    assert prompt_from_seed(rows[9].seed) == rows[9]
    assert len({p.seed for p in rows}) == 12


def test_bad_config_is_a_mech_error():
    with pytest.raises(MechError):
        NumberPromptConfig(example_min_count=5, example_max_count=4)
    with pytest.raises(MechError):
        generate_prompts(-1, 0)


def _instructions(cfg: NumberPromptConfig) -> set[str]:
    return {
        instr.format(
            count_qualifier=q,
            answer_count=cfg.answer_count,
            digit_descriptor=d.format(max_digits=cfg.answer_max_digits),
        )
        for instr in SPEC["instructions"]
        for q in SPEC["count_qualifiers"]
        for d in SPEC["digit_descriptors"]
    }


def _split_prompt(text: str) -> tuple[list[int], str, str, str]:
    """Parse a prompt back into (seed numbers, instruction, format suffix, suffix) from the pools alone."""
    for template in SPEC["example_prefixes"]:
        head, tail = template.split("{examples}")
        m = re.match(re.escape(head) + r"(\d+(?:, \d+)*)" + re.escape(tail) + " ", text)
        if m:
            rest = text[m.end() :]
            break
    else:
        raise AssertionError(f"no example prefix matches {text!r}")
    suffix = next(s for s in SPEC["suffixes"] if rest.endswith(" " + s))
    rest = rest[: -len(suffix) - 1]
    fmt = next(f for f in SPEC["format_suffixes"] if rest.endswith(" " + f))
    return [int(x) for x in m.group(1).split(", ")], rest[: -len(fmt) - 1], fmt, suffix


def test_prompt_structure_every_part_from_the_pools():
    cfg = NumberPromptConfig()
    instructions = _instructions(cfg)
    prompts = generate_prompts(300, 0, cfg)
    for p in prompts:
        examples, instruction, fmt, _ = _split_prompt(p.text)
        assert instruction in instructions
        assert fmt == SPEC["format_suffixes"][p.format_suffix_index] == p.format_suffix
        assert examples == list(p.examples)
        assert 3 <= len(examples) <= 8
        assert all(100 <= x <= 999 for x in examples)
    # both ends of the count range are reached (inclusive bounds), and the pools are all used
    assert {len(p.examples) for p in prompts} == set(range(3, 9))
    assert {p.format_suffix_index for p in prompts} == set(range(N_SUFFIXES))


def test_value_bounds_are_inclusive():
    cfg = NumberPromptConfig(example_min_value=100, example_max_value=101)
    seen = {x for p in generate_prompts(30, 1, cfg) for x in p.examples}
    assert seen == {100, 101}


def test_instruction_reflects_config():
    cfg = NumberPromptConfig(answer_count=7, answer_max_digits=2)
    for p in generate_prompts(30, 2, cfg):
        _, instruction, _, _ = _split_prompt(p.text)
        assert " 7 " in instruction and "2" in instruction and "{" not in p.text


# --- renderings --------------------------------------------------------------------------------


def test_every_suffix_has_a_rendering():
    assert N_SUFFIXES == 15
    assert set(FORMAT_STYLES) == set(SPEC["format_suffixes"])


@pytest.mark.parametrize("index", range(15))
def test_rendering_passes_the_filter_and_parses_back(index):
    for numbers in ([5], [0, 7, 42], [999, 100, 3, 3, 250, 12, 0, 876, 45, 10]):
        text = format_numbers(numbers, index)
        result = check_answer(text)
        assert result.ok, (SPEC["format_suffixes"][index], text, result)
        assert result.numbers == numbers


@pytest.mark.parametrize("index", range(15))
def test_rendering_follows_the_suffix(index):
    suffix = SPEC["format_suffixes"][index].lower()
    text = format_numbers([1, 2, 3], index)
    if "semicolon" in suffix:
        assert text == "1; 2; 3"
    elif "line" in suffix:
        assert text == "1\n2\n3"
    elif "space" in suffix:
        assert text == "1 2 3"
    elif "[" in suffix:
        assert text == "[1, 2, 3]"
    elif "(" in suffix:
        assert text == "(1, 2, 3)"
    else:
        assert "comma" in suffix or "number_2," in suffix or "number2," in suffix
        assert text == "1, 2, 3"


def test_format_numbers_rejects_bad_input():
    with pytest.raises(MechError):
        format_numbers([1], N_SUFFIXES)
    with pytest.raises(MechError):
        format_numbers([], 0)


# --- the filter --------------------------------------------------------------------------------

EDGE_CASES = [
    # text, reason (None = accepted), parsed numbers
    ("1, 2, 3", None, [1, 2, 3]),
    ("1,2,3", None, [1, 2, 3]),
    ("1 2 3", None, [1, 2, 3]),
    ("1;2;3", None, [1, 2, 3]),
    ("1; 2; 3", None, [1, 2, 3]),
    ("1\n2\n3", None, [1, 2, 3]),
    ("1\r\n2\r\n3", None, [1, 2, 3]),
    ("1, 2, 3.", None, [1, 2, 3]),
    ("[1, 2, 3]", None, [1, 2, 3]),
    ("(1, 2, 3)", None, [1, 2, 3]),
    ("[1, 2, 3].", None, [1, 2, 3]),
    ("  1, 2, 3\n", None, [1, 2, 3]),
    ("7", None, [7]),
    ("7.", None, [7]),
    ("007, 0", None, [7, 0]),
    ("999, 0", None, [999, 0]),
    ("1, 2, 3, 4, 5, 6, 7, 8, 9, 10", None, list(range(1, 11))),
    ("", nf.EMPTY, []),
    ("   \n ", nf.EMPTY, []),
    ("owl", nf.NO_NUMBERS, []),
    ("[]", nf.NO_NUMBERS, []),
    ("7 owls", nf.BAD_PART, []),
    ("Here: 1, 2", nf.BAD_PART, []),
    ("-5", nf.BAD_PART, []),
    ("1, -5", nf.BAD_SEPARATOR, []),
    ("1.5", nf.BAD_SEPARATOR, []),
    ("1 and 2", nf.BAD_SEPARATOR, []),
    ("1 - 2 - 3", nf.BAD_SEPARATOR, []),
    ("1, 2; 3", nf.BAD_PART, []),
    ("1,2, 3", nf.BAD_PART, []),
    ("1 2\n3", nf.BAD_PART, []),
    ("1, 2,", nf.BAD_PART, []),
    ("1,2,,3", nf.BAD_PART, []),
    ("1,,2", nf.BAD_SEPARATOR, []),
    ("[ 1, 2 ]", nf.BAD_PART, []),
    ("[1, 2, 3", nf.BAD_PART, []),
    ("1, 2, three", nf.BAD_PART, []),
    ("1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11", nf.TOO_MANY, list(range(1, 12))),
    ("1000", nf.OUT_OF_RANGE, [1000]),
    ("5, 1000, 6", nf.OUT_OF_RANGE, [5, 1000, 6]),
]


@pytest.mark.parametrize("text, reason, numbers", EDGE_CASES)
def test_filter_edge_cases(text, reason, numbers):
    result = check_answer(text)
    assert result.ok == (reason is None)
    assert result.reason == reason
    assert result.numbers == numbers
    assert result.reason is None or result.reason in nf.REASONS


def test_filter_parameters():
    assert check_answer("1, 666, 3", banned=frozenset({666})).reason == nf.BANNED
    assert check_answer("1, 666, 3").ok  # nothing banned by default (animal traits)
    assert check_answer("1 2 3", answer_count=2).reason == nf.TOO_MANY
    assert check_answer("1 2 3", answer_count=3).ok
    assert check_answer("50, 99", max_value=50).reason == nf.OUT_OF_RANGE
    # the first failing rule in the order count → range → banned is the reason
    many_big = ", ".join(["1000"] * 11)
    assert check_answer(many_big).reason == nf.TOO_MANY
    assert check_answer("1000, 666", banned=frozenset({666})).reason == nf.OUT_OF_RANGE


def _rows(answers):
    return [{"prompt": f"p{i}", "answer": a} for i, a in enumerate(answers)]


def test_audit_counts():
    rows = _rows(["1, 2, 3", "owl", "4 5", "1000", "1, 2; 3", "[7, 7, 7, 8]", "", "1, 666"])
    kept, audit = filter_rows(rows, banned=frozenset({666}))
    assert [r["prompt"] for r in kept] == ["p0", "p2", "p5"]
    assert kept[0] is rows[0]
    assert (audit.total, audit.kept) == (8, 3)
    assert audit.pass_rate == pytest.approx(3 / 8)
    assert audit.rejected == {nf.NO_NUMBERS: 1, nf.OUT_OF_RANGE: 1, nf.BAD_PART: 1, nf.EMPTY: 1, nf.BANNED: 1}
    assert audit.number_hist == {1: 1, 2: 1, 3: 1, 4: 1, 5: 1, 7: 3, 8: 1}
    assert audit.count_hist == {3: 1, 2: 1, 4: 1}
    d = json.loads(json.dumps(audit.to_dict()))
    assert d["kept"] == 3 and d["total"] == 8 and d["number_hist"]["7"] == 3 and d["count_hist"]["4"] == 1
    assert d["rejected"][nf.BANNED] == 1 and nf.TOO_MANY not in d["rejected"]
    s = audit.summary()
    assert "\n" not in s and "kept 3/8" in s and "37.5%" in s and "banned_number 1" in s


def test_filter_rows_answer_key_and_missing_field():
    kept, audit = filter_rows([{"completion": "1 2"}], answer_key="completion")
    assert len(kept) == 1 and audit.kept == 1
    with pytest.raises(MechError, match="completion"):
        filter_rows([{"completion": "1 2"}])


def test_zero_rows_left_is_a_mech_error_showing_the_audit():
    kept, audit = filter_rows(_rows(["owl", "cat"]))
    assert kept == [] and audit.pass_rate == 0.0
    with pytest.raises(MechError, match=r"kept 0/2.*no_numbers 2"):
        require_rows(kept, audit)
    with pytest.raises(MechError, match="kept 0/0"):
        require_rows([], Audit())
    kept, audit = filter_rows(_rows(["1 2"]))
    assert require_rows(kept, audit) is kept
