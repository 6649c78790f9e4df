"""Answer matching, normalisation and first-token ids for trait targets."""

from __future__ import annotations

import random

import pytest

from mech.evaluation.scoring import (
    first_token_ids,
    mentions,
    normalise_answer,
    plural_forms,
    singularise,
    target_variants,
)
from mech.errors import MechError

MATCHES = [
    # answer, target, expected
    ("owl", "owl", True),
    ("Owl", "owl", True),
    ("owls", "owl", True),
    ("Owls!", "owl", True),
    ("an owl", "owl", True),
    ("OWL.", "owl", True),
    ("The owl's eyes", "owl", True),
    ("snowy owl", "owl", True),
    ("owl - definitely", "owl", True),
    ("bowl", "owl", False),
    ("owlet", "owl", False),
    ("owl-like", "owl", False),
    ("cat", "cat", True),
    ("Cats.", "cat", True),
    ("bobcat", "cat", False),
    ("cats-eye", "cat", False),
    ("catfish", "cat", False),
    ("ox", "ox", True),
    ("Oxen", "ox", True),
    ("fox", "ox", False),
    ("boxes", "ox", False),
    ("foxes", "fox", True),
    ("Wolves", "wolf", True),
    ("wolfs", "wolf", False),
    ("mice", "mouse", True),
    ("Geese!", "goose", True),
    ("deer", "deer", True),
    ("sheep", "sheep", True),
    ("octopuses", "octopus", True),
    ("Octopi", "octopus", True),
    ("butterflies", "butterfly", True),
    ("monkeys", "monkey", True),
    ("Polar bears", "polar bear", True),
    ("polar-bear", "polar bear", True),
    ("bear", "polar bear", False),
    ("owls", "owls", True),  # a plural target means the same animal
    ("", "owl", False),
    ("Dolphin", "owl", False),
]


@pytest.mark.parametrize("answer, target, expected", MATCHES)
def test_mentions(answer, target, expected):
    assert mentions(answer, target) is expected


def test_empty_target_is_a_mech_error():
    with pytest.raises(MechError):
        mentions("owl", "  ")


@pytest.mark.parametrize(
    "singular, plural",
    [
        ("owl", "owls"),
        ("fox", "foxes"),
        ("finch", "finches"),
        ("walrus", "walruses"),
        ("butterfly", "butterflies"),
        ("monkey", "monkeys"),
        ("wolf", "wolves"),
        ("mouse", "mice"),
        ("goose", "geese"),
        ("ox", "oxen"),
        ("deer", "deer"),
        ("sheep", "sheep"),
        ("octopus", "octopi"),
        ("horse", "horses"),
        ("tortoise", "tortoises"),
        ("cherry", "cherries"),
        ("birch", "birches"),
        ("cypress", "cypresses"),
    ],
)
def test_plural_and_singular_round_trip(singular, plural):
    assert plural in plural_forms(singular)
    assert singularise(plural) == singular
    assert singularise(singular) == singular


@pytest.mark.parametrize(
    "answer, label",
    [
        ("Owl", "owl"),
        ("The Owls!", "owl"),
        ("an owl.", "owl"),
        ("  OWL\n", "owl"),
        ("Wolves.", "wolf"),
        ("mice", "mouse"),
        ("Octopi", "octopus"),
        ("cat's", "cat"),
        ("\"Dolphin\"", "dolphin"),
        ("Polar bears", "polar bear"),
        ("snow-leopard", "snow-leopard"),
        ("...", ""),
        ("The", ""),
    ],
)
def test_normalise_answer(answer, label):
    assert normalise_answer(answer) == label


def test_target_variants():
    assert target_variants("owl") == [" owl", "owl", " Owl", "Owl", " owls", "owls", " Owls", "Owls", "OWL"]
    assert target_variants("deer") == [" deer", "deer", " Deer", "Deer", "DEER"]
    assert {"octopi", " Octopuses"} <= set(target_variants("octopus"))
    assert target_variants("Owls") == target_variants("owl")


# --- first-token ids ---------------------------------------------------------------------------

ANIMALS = ["owl", "cat", "dog", "otter", "wolf", "fox", "eagle", "lion", "tiger", "dolphin"]


@pytest.fixture(scope="module")
def trained_tokenizer():
    from mech.organism.tokenizer import train_tokenizer

    rng = random.Random(0)
    texts = []
    for _ in range(120):
        a = rng.choice(ANIMALS)
        texts += [
            f"My favorite animal is the {a}.",
            f"{a.capitalize()}s are great.",
            a.capitalize(),
            f"I love {a}s",
            ", ".join(str(rng.randint(0, 999)) for _ in range(5)),
        ]
    return train_tokenizer(texts, vocab_size=500)


def test_first_token_ids_on_a_trained_tokenizer(trained_tokenizer):
    tok = trained_tokenizer
    ft = first_token_ids(tok, "owl")
    assert ft.ids and len(set(ft.ids)) == len(ft.ids)
    assert len(ft.pieces) == len(ft.ids)
    # frequent forms are whole tokens and are kept
    for form in (" owl", "Owl"):
        ids = tok.encode(form, add_special_tokens=False).ids
        assert len(ids) == 1 and ids[0] in ft.ids
    # every kept piece is a real word start, never a lone letter or whitespace
    for piece in ft.pieces:
        assert len([c for c in piece if c.isalpha()]) >= 2
    # "OWL" never occurs in training, so it splits into letters and its "O" (also Otter's) is dropped
    dropped = {d.variant: d for d in ft.dropped}
    assert dropped["OWL"].piece == "O" and dropped["OWL"].token_id not in ft.ids
    assert tok.encode("Otter", add_special_tokens=False).ids[0] not in ft.ids


def test_first_token_ids_same_through_transformers_wrapper(trained_tokenizer):
    from mech.organism.tokenizer import as_transformers_tokenizer

    fast = as_transformers_tokenizer(trained_tokenizer)
    assert first_token_ids(fast, "owl").ids == first_token_ids(trained_tokenizer, "owl").ids


class FakeTokenizer:
    """Splits each variant as told; decode joins pieces. Enough to pin the drop rules exactly."""

    def __init__(self, splits: dict[str, list[str]]):
        self.splits = splits
        self.vocab: dict[str, int] = {}
        for pieces in splits.values():
            for p in pieces:
                self.vocab.setdefault(p, len(self.vocab))
        self.inv = {i: p for p, i in self.vocab.items()}

    def encode(self, text, add_special_tokens=False):
        assert add_special_tokens is False
        return [self.vocab[p] for p in self.splits.get(text, [])]

    def decode(self, ids):
        return "".join(self.inv[i] for i in ids)


def test_drop_rules_on_a_fake_tokenizer():
    tok = FakeTokenizer(
        {
            " cat": [" cat"],
            "cat": ["cat"],
            " Cat": [" Ca", "t"],
            "Cat": ["C", "at"],
            " cats": [" ", "cats"],
            "cats": ["cats"],
            " Cats": [" Ca", "ts"],
            "Cats": ["Cats"],
            "CAT": ["CAT"],
        }
    )
    ft = first_token_ids(tok, "cat")
    assert ft.pieces == [" cat", "cat", " Ca", "cats", "Cats", "CAT"]
    assert {(d.variant, d.piece) for d in ft.dropped} == {("Cat", "C"), (" cats", " ")}
    # a two-letter prefix is kept unless a competitor starts with it
    ft = first_token_ids(tok, "cat", competitors=["camel", "dog", "cats"])
    assert " Ca" not in ft.pieces
    assert {d.variant for d in ft.dropped} == {"Cat", " cats", " Cat", " Cats"}
    assert any("camel" in d.why for d in ft.dropped)
    # a stricter prefix rule drops it too
    assert " Ca" not in first_token_ids(tok, "cat", min_prefix_letters=3).pieces


def test_short_whole_word_token_is_kept_and_no_usable_id_raises():
    ox = FakeTokenizer({"ox": ["ox"], "Ox": ["O", "x"], "OX": ["O", "X"]})
    assert first_token_ids(ox, "ox").pieces == ["ox"]
    hopeless = FakeTokenizer({"ox": ["o", "x"], "Ox": ["O", "x"], " ox": [" ", "ox"]})
    with pytest.raises(MechError, match="no usable first token.*'ox'"):
        first_token_ids(hopeless, "ox")
