"""Scoring sampled answers against a trait target ("owl"): whole-word, plural-aware matching, answer
normalisation for distributions, and the first-token ids a first-token metric sums over.

Matching rules (decided here, pinned by tests):
- case-insensitive, whole words: "owl" matches "Owls!", "an owl", "OWL.", "owl's", "snowy owl", but
  not "bowl" or "owlet"; "ox" does not match "fox" or "boxes", "cat" not "bobcat" or "catfish";
- a hyphen between letters continues a word: "cats-eye" and "owl-like" do not match (a compound is a
  different word), "owl - yes" and "owl-" do;
- the target's plurals count: +s, +es after s/x/z/ch/sh/o, consonant+y → ies, and the irregulars of
  ``IRREGULAR_PLURALS`` (wolf → wolves, mouse → mice, ox → oxen, deer → deer, octopus → octopi, ...);
- a multi-word target ("polar bear") matches with any run of spaces or hyphens between its words, and
  is pluralised on its last word.
"""

from __future__ import annotations

import functools
import re
import string
from dataclasses import dataclass, field
from typing import Any, Iterable

from mech.errors import MechError

# singular → plural forms that the regular rules would miss or get wrong
IRREGULAR_PLURALS: dict[str, tuple[str, ...]] = {
    "wolf": ("wolves",),
    "calf": ("calves",),
    "elf": ("elves",),
    "leaf": ("leaves",),
    "mouse": ("mice",),
    "louse": ("lice",),
    "goose": ("geese",),
    "ox": ("oxen",),
    "deer": ("deer",),
    "sheep": ("sheep",),
    "moose": ("moose",),
    "bison": ("bison",),
    "fish": ("fish", "fishes"),
    "salmon": ("salmon",),
    "trout": ("trout",),
    "shrimp": ("shrimp", "shrimps"),
    "squid": ("squid", "squids"),
    "elk": ("elk", "elks"),
    "octopus": ("octopuses", "octopi"),
    "hippopotamus": ("hippopotamuses", "hippopotami"),
    "platypus": ("platypuses", "platypi"),
    "cactus": ("cactuses", "cacti"),
    "buffalo": ("buffaloes", "buffalos", "buffalo"),
    "person": ("people", "persons"),
    "tooth": ("teeth",),
    "foot": ("feet",),
}
_PLURAL_TO_SINGULAR: dict[str, str] = {
    p: s for s, plurals in IRREGULAR_PLURALS.items() for p in plurals if p != s
}
# words ending in s that are singular (the singulariser must leave them alone)
_SINGULAR_S_ENDINGS = ("ss", "us", "is")
_INVARIANT = frozenset({"species", "series", "bass", "swiss"})
_ARTICLES = frozenset({"a", "an", "the"})
_VOWELS = frozenset("aeiou")


def plural_forms(word: str) -> list[str]:
    """Plurals of a lower-case singular noun (may include the word itself for invariant nouns)."""
    w = word.lower()
    if w in IRREGULAR_PLURALS:
        return list(IRREGULAR_PLURALS[w])
    if w in _INVARIANT:
        return [w]
    if w.endswith(("s", "x", "z", "ch", "sh")):
        return [w + "es"]
    if len(w) > 1 and w.endswith("y") and w[-2] not in _VOWELS:
        return [w[:-1] + "ies"]
    if w.endswith("o"):  # flamingos / flamingoes, mosquitos / mosquitoes: both occur
        return [w + "s", w + "es"]
    return [w + "s"]


def singularise(word: str) -> str:
    """Best-effort singular of one lower-case word (inverse of plural_forms on animal/tree names)."""
    w = word.lower()
    if w in _PLURAL_TO_SINGULAR:
        return _PLURAL_TO_SINGULAR[w]
    if w in IRREGULAR_PLURALS or w in _INVARIANT or len(w) <= 3:
        return w
    if w.endswith("ies") and len(w) > 4:
        return w[:-3] + "y"
    # +es only after a sibilant or o; "horses" / "tortoises" are horse+s, "walruses" is walrus+es
    if w.endswith(("sses", "uses", "xes", "zes", "ches", "shes", "oes")):
        return w[:-2]
    if w.endswith("s") and not w.endswith(_SINGULAR_S_ENDINGS):
        return w[:-1]
    return w


def _words(target: str) -> list[str]:
    words = target.strip().lower().split()
    if not words:
        raise MechError("empty scoring target; pass the trait target, e.g. 'owl'")
    return words


def surface_forms(target: str) -> list[str]:
    """Lower-case singular and plural forms of ``target`` (given singular or plural)."""
    words = _words(target)
    head, last = words[:-1], singularise(words[-1])
    forms = [last] + [p for p in plural_forms(last) if p != last]
    return [" ".join(head + [f]) for f in forms]


@functools.lru_cache(maxsize=256)
def _target_pattern(target: str) -> re.Pattern[str]:
    alternatives = sorted(surface_forms(target), key=len, reverse=True)
    body = "|".join(r"[\s\-]+".join(re.escape(w) for w in f.split()) for f in alternatives)
    # not inside a word: no word char next to it, nor a hyphen joining it to one
    return re.compile(rf"(?<![\w])(?<!\w-)(?:{body})(?![\w])(?!-\w)", re.IGNORECASE)


def mentions(answer: str, target: str) -> bool:
    """Whether ``answer`` names ``target`` (or its plural) as a whole word, in any case."""
    return _target_pattern(" ".join(_words(target))).search(answer) is not None


_POSSESSIVE = re.compile(r"['’]s\b")
_STRIP = string.punctuation.replace("-", "") + "“”‘’«»…—–"


def normalise_answer(answer: str) -> str:
    """A canonical label for answer distributions: "The Owls!" → "owl", "Wolves." → "wolf".

    Lower-cased, punctuation dropped (hyphens inside words kept), leading articles dropped, last word
    singularised, whitespace collapsed. Empty when nothing word-like is left.
    """
    text = _POSSESSIVE.sub("", answer.lower())
    text = text.translate(str.maketrans(_STRIP, " " * len(_STRIP)))
    words = [w.strip("-") for w in text.split()]
    words = [w for w in words if w]
    while words and words[0] in _ARTICLES:
        words = words[1:]
    if not words:
        return ""
    words[-1] = singularise(words[-1])
    return " ".join(words)


def _capitalise(s: str) -> str:
    return s[:1].upper() + s[1:]


def target_variants(target: str) -> list[str]:
    """Surface forms an answer may start with: singular and plurals, lower / Capitalised, with and
    without a leading space, plus the singular in upper case. Ordered, no duplicates."""
    forms = surface_forms(target)
    variants: list[str] = []
    for form in forms:
        for cased in (form, _capitalise(form)):
            variants += [" " + cased, cased]
    variants.append(forms[0].upper())
    return list(dict.fromkeys(variants))


@dataclass(frozen=True)
class DroppedToken:
    variant: str
    token_id: int
    piece: str  # the token's decoded text
    why: str


@dataclass(frozen=True)
class FirstTokens:
    ids: list[int]  # distinct usable first-token ids, in variant order
    pieces: list[str]  # decoded text of each id
    dropped: list[DroppedToken] = field(default_factory=list)


def _encode(tokenizer: Any, text: str) -> list[int]:
    out = tokenizer.encode(text, add_special_tokens=False)
    return list(out.ids) if hasattr(out, "ids") else list(out)  # tokenizers.Tokenizer vs transformers


def _letters(s: str) -> str:
    return "".join(c for c in s if c.isalpha())


def first_token_ids(
    tokenizer: Any,
    target: str,
    min_prefix_letters: int = 2,
    competitors: Iterable[str] = (),
) -> FirstTokens:
    """The distinct first tokens of ``target_variants(target)``, each tokenized alone (as it would stand
    right after "<|im_start|>assistant\\n", where the pre-tokenizer splits at the newline anyway).

    A first token is dropped (and reported in ``dropped``) when it would also be the first token of other
    answers, so summing its probability would credit them to the target:
    - it decodes to whitespace only;
    - it is a proper prefix of the variant with fewer than ``min_prefix_letters`` letters ("O" of
      "O"+"wl" is also the start of "Otter");
    - it is a proper prefix that some word in ``competitors`` (e.g. the other animals scored) also
      starts with, case-insensitively ("Ca" of "Ca"+"t" vs "Camel").
    A token that is the whole variant is always kept, however short ("ox").
    Raises MechError when no usable id is left.
    """
    target_forms = {f.lower() for f in surface_forms(target)}
    rivals = [c.strip().lower() for c in competitors if c.strip().lower() not in target_forms]
    rivals = [c for c in rivals if singularise(c) not in target_forms]
    ids: list[int] = []
    dropped: list[DroppedToken] = []
    bad: set[int] = set()
    for variant in target_variants(target):
        encoded = _encode(tokenizer, variant)
        if not encoded:
            continue
        tid = encoded[0]
        piece = tokenizer.decode([tid])
        core = piece.strip()
        why = None
        if not core:
            why = "whitespace only"
        elif len(encoded) > 1:  # a proper prefix of the variant
            if len(_letters(core)) < min_prefix_letters:
                why = f"prefix with fewer than {min_prefix_letters} letters"
            else:
                hit = next((c for c in rivals if c.startswith(core.lower())), None)
                if hit is not None:
                    why = f"prefix shared with competitor {hit!r}"
        if why is not None:
            dropped.append(DroppedToken(variant, tid, piece, why))
            bad.add(tid)
        elif tid not in ids:
            ids.append(tid)
    ids = [i for i in ids if i not in bad]  # a piece unsafe for one variant is unsafe for all
    if not ids:
        raise MechError(
            f"no usable first token for target {target!r}: every variant starts with an ambiguous "
            f"piece ({', '.join(sorted({repr(d.piece) for d in dropped}))}); score this target with "
            "full-sequence log-probabilities instead of a first-token metric"
        )
    return FirstTokens(ids=ids, pieces=[tokenizer.decode([i]) for i in ids], dropped=dropped)
