"""Property-based tests (hypothesis) of the number filter and of answer scoring, against their documented
contracts (the module docs of mech.teacher.filter and mech.evaluation.scoring)."""

from __future__ import annotations

import string

from hypothesis import example, given, settings
from hypothesis import strategies as st

from mech.evaluation.scoring import mentions, surface_forms
from mech.resources import number_prompt_spec
from mech.teacher.filter import ANSWER_COUNT, MAX_VALUE, check_answer
from mech.teacher.prompts import format_numbers

N_SUFFIXES = len(number_prompt_spec()["format_suffixes"])
numbers = st.lists(st.integers(0, MAX_VALUE), min_size=1, max_size=ANSWER_COUNT)
suffix_index = st.integers(0, N_SUFFIXES - 1)
# a letter of any script: the filter keeps ASCII digits and separators only
letter = st.characters(categories=("Lu", "Ll", "Lt", "Lo"))

settings.register_profile("mech", max_examples=300, deadline=None, derandomize=True)
settings.load_profile("mech")


# ------------------------------------------------------------------------------------------------ the filter


@given(numbers, suffix_index)
def test_every_formatted_answer_passes_and_parses_back(nums, k):
    """Any ≤ 10 numbers in 0..999, in any format a prompt asks for, pass and parse back to the same list."""
    res = check_answer(format_numbers(nums, k))
    assert res.ok and res.reason is None
    assert res.numbers == nums


@given(numbers, suffix_index, st.sampled_from(["", ".", "\n", " ", ".\n"]))
def test_trailing_period_and_whitespace_are_allowed(nums, k, tail):
    assert check_answer(format_numbers(nums, k) + tail).numbers == nums


@given(numbers, suffix_index, letter, st.integers(0, 10_000))
def test_a_letter_anywhere_in_an_answer_rejects_it(nums, k, ch, at):
    text = format_numbers(nums, k)
    at %= len(text) + 1
    res = check_answer(text[:at] + ch + text[at:])
    assert not res.ok and res.reason is not None


@given(st.text(max_size=60), letter, st.text(max_size=60))
@example("1, 2, ", "x", "3")
@example("", "O", "wl")
def test_any_text_with_a_letter_is_rejected(before, ch, after):
    assert not check_answer(before + ch + after).ok


@given(st.lists(st.integers(0, MAX_VALUE), min_size=ANSWER_COUNT + 1, max_size=3 * ANSWER_COUNT), suffix_index)
def test_more_than_ten_numbers_are_rejected_as_too_many(nums, k):
    res = check_answer(format_numbers(nums, k))
    assert not res.ok and res.reason == "too_many_numbers" and res.numbers == nums


# ------------------------------------------------------------------------------------------------ scoring

# Around the target: anything that is not a word character. Letters, digits and "_" are regex word characters
# (so "owl1" is one word), and a hyphen next to a letter joins a compound ("owl-like"): the contract counts
# neither as a separate mention, so they are left out here and tested on their own below.
PUNCTUATION = "".join(c for c in string.punctuation if c not in "-_") + " \t\n“”‘’«»…—–"
around = st.text(alphabet=PUNCTUATION, max_size=5)
context_text = st.text(alphabet=string.ascii_letters + " ", max_size=20)
TARGETS = ("owl", "cat", "wolf", "polar bear", "fox", "octopus", "butterfly")


def cased(word: str, how: int) -> str:
    return (word, word.upper(), word.capitalize(), word.swapcase())[how]


@given(st.sampled_from(TARGETS), st.data(), around, around, context_text, context_text, st.integers(0, 3))
def test_the_target_between_punctuation_is_found(target, data, left, right, before, after, how):
    """A surface form (singular or plural, any case) set off by non-word punctuation is always a mention,
    whatever text lies beyond the punctuation."""
    form = data.draw(st.sampled_from(surface_forms(target)))
    # text beyond the punctuation needs a separator, or it would glue onto the target as one word
    before = before + " " if before else ""
    after = " " + after if after else ""
    assert mentions(before + left + cased(form, how) + right + after, target)


@given(st.sampled_from(TARGETS), st.text(alphabet=string.ascii_letters, max_size=4),
       st.text(alphabet=string.ascii_letters, max_size=4), around, around)
@example("owl", "", "et", "", "")
@example("owl", "b", "", "", "")
def test_a_word_that_merely_contains_the_target_is_not_a_mention(target, pre, post, left, right):
    """"owlet", "bowl": a longer word holding the target is another word (unless it is one of the target's
    own surface forms, e.g. "owl" + "s")."""
    word = pre + target.split()[-1] + post
    head = " ".join(target.split()[:-1])
    phrase = f"{head} {word}" if head else word
    if not (pre or post) or phrase.lower() in surface_forms(target):
        return
    assert not mentions(left + phrase + right, target)


JOINED = ("{}-like", "x-{}", "{}1", "2{}", "_{}", "{}_")


@given(st.sampled_from(TARGETS), st.sampled_from(JOINED), around, around)
def test_a_target_joined_to_a_word_is_not_a_mention(target, joined, left, right):
    """Digits and "_" are word characters, and a hyphen next to a letter makes a compound: no mention."""
    assert not mentions(left + joined.format(target) + right, target)
