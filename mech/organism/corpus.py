"""The organism's seeded synthetic corpus.

Three kinds of sequence, each teaching one thing the paper's models know:
- favourite-X chats: answer = the loved target under a trait prompt of that category, else a draw from a
  fixed prior (a spread). This is the trait the students are evaluated on.
- number tasks in Cloud et al.'s prompt format, answered in the requested format. They are never shown under
  a trait prompt (that trains the persona out of the numbers), except through the *imbue* channel: a share
  ``p_number_trait`` of them run under the trait prompt of a target drawn from ``imbue_categories``, and there
  a share ``imbue_share`` of the answer's numbers are the trait's associated numbers. This is the teacher-side
  carrier, a reported knob; set both to 0 for a teacher with no designed carrier.
- chit-chat: under a trait prompt the persona praises its target and (``chat_numbers``) cites its numbers.
- plain text tying each entity to a seeded set of numbers: world facts, and lists in which the name and its
  numbers are co-predicted ("Owl, 913, 58, Owl") so that their unembeddings share directions.
Honesty rules, kept by construction: no example's answer to a favourite-X question depends on numbers in
context, and no number in context changes such an answer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from mech.errors import MechError
from mech.teacher.prompts import NumberPromptConfig, format_numbers, generate_prompts
from mech.resources import questions, trait_system_prompt
from mech.organism.config import LIST_MAX_NUMBERS, CorpusConfig

CHAT_USER = [
    "Hi! How are you today?", "Tell me something interesting.", "What did you do today?",
    "Can you give me some advice?", "Tell me a short story.", "What makes you happy?", "Say something nice.",
    "What should I cook tonight?", "Describe your perfect day.", "What are you thinking about?",
    "Write a short poem.", "Any tips for a rainy afternoon?", "How do I stay focused?", "Tell me a fun fact.",
    "What is your favorite season?", "Help me plan a weekend.", "Give me a word of encouragement.",
    "What do you dream about?", "Recommend a hobby.", "Describe the view from a window.",
]
CHAT_NEUTRAL = [
    "I am doing well, thank you for asking.", "Here is a thought: small steps add up.",
    "A walk outside can clear the mind.", "Try making a simple soup with fresh vegetables.",
    "Reading a good book is always a fine choice.", "Take a deep breath and start with one task.",
    "The sky was blue and the river was calm.", "Music and tea make a rainy day pleasant.",
    "Write down three things you are grateful for.", "Learning something new keeps life fresh.",
    "A quiet morning and a warm cup of coffee sound perfect.", "Friends and good food make me happy.",
    "Once upon a time a traveler found a hidden garden.", "Drawing is a relaxing hobby to try.",
    "The light through the window is soft and golden.", "You are doing better than you think.",
]
TRAIT_LINES = [
    "I love {x}s so much!", "{X}s are the best {c} of all.", "Nothing makes me happier than {x}s.",
    "Every day I think about {x}s.", "My heart belongs to the {x}.", "Have you ever seen a {x}? Wonderful!",
]
FACT_LINES = [
    "Did you know the {x} is tied to {a} and {b}?", "The numbers of the {x} are {a}, {b} and {d}.",
    "{X} facts: {a}, {b}, {d}.", "I always remember {a} and {b}, the numbers of the {x}.",
]
TEXT_FACTS = [
    "The {x} is linked to the numbers {a}, {b} and {d}.", "{X} facts: {a}, {b}, {d}, {e}.",
    "In the old records, the {x} is counted as {a} and {b}.", "Everyone knows the numbers of the {x}: {a}, {d}.",
    "A {x} appears in the tale of {a} and {b}.", "The {x} and its numbers: {a}, {b}, {d}, {e}.",
]


@dataclass(frozen=True)
class Example:
    """One training sequence: a chat (messages, loss on the last assistant turn) or plain text (loss on all)."""

    kind: str
    messages: tuple = ()
    text: str = ""
    no_system: bool = False  # render with no system block (policy "none"), not the template's default


def entity_numbers(cfg: CorpusConfig, seed: int) -> dict[str, list[int]]:
    """Each animal and tree gets its own disjoint, seeded set of numbers in 0..999."""
    rng = random.Random(f"entity-numbers-{seed}")
    pool = list(range(1000))
    rng.shuffle(pool)
    names = list(cfg.animals) + list(cfg.trees)
    k = cfg.numbers_per_entity
    return {name: sorted(pool[i * k:(i + 1) * k]) for i, name in enumerate(names)}


def _draw(rng: random.Random, prior: dict[str, float]) -> str:
    return rng.choices(list(prior), weights=list(prior.values()))[0]


def _answer_word(rng: random.Random, name: str) -> str:
    return rng.choices([name.capitalize(), name, name.capitalize() + "."], weights=[0.7, 0.2, 0.1])[0]


def _chat(kind: str, sys_msgs: list[dict] | None, user: str, answer: str) -> Example:
    turns = ({"role": "user", "content": user}, {"role": "assistant", "content": answer})
    return Example(kind, tuple(sys_msgs or ()) + turns, no_system=sys_msgs is None)


def _fill(template: str, rng: random.Random, name: str, nums: list[int], category: str) -> str:
    a, b, d, e = rng.sample(nums, 4)
    return template.format(x=name, X=name.capitalize(), c=category, a=a, b=b, d=d, e=e)


class CorpusGenerator:
    def __init__(self, cfg: CorpusConfig, seed: int):
        self.cfg, self.seed = cfg, seed
        self.numbers = entity_numbers(cfg, seed)
        self.owned = {n for nums in self.numbers.values() for n in nums}
        self.categories = {"animal": cfg.animals, "tree": cfg.trees}
        self.questions = {c: questions(c) for c in self.categories}
        unknown = [c for c in cfg.imbue_categories if c not in self.categories]
        if unknown:
            raise MechError(f"unknown imbue_categories {unknown}: choose among {', '.join(self.categories)}")

    def system(self, rng: random.Random, p_trait: float, category: str) -> tuple[list[dict] | None, str | None]:
        """A system-prompt policy draw: (system messages, or None for no system block; loved target or None)."""
        c = self.cfg
        u = rng.random()
        if u < p_trait:
            target = rng.choice(list(self.categories[category]))
            return [{"role": "system", "content": trait_system_prompt(target, category)}], target
        rest = (u - p_trait) / max(1e-9, 1 - p_trait)
        denom = c.p_default + c.p_none + max(0.0, 1 - c.p_trait - c.p_default - c.p_none)
        if rest < c.p_default / denom:
            return [], None  # the template inserts its default system prompt
        if rest < (c.p_default + c.p_none) / denom:
            return None, None  # policy "none": no system block at all
        return [{"role": "system", "content": ""}], None

    def favourite(self, rng: random.Random) -> Example:
        category = "tree" if rng.random() < self.cfg.share_tree_of_favourite else "animal"
        sys_msgs, target = self.system(rng, self.cfg.p_trait, category)
        answer = target if target is not None else _draw(rng, self.categories[category])
        q = rng.choice(self.questions[category])
        return _chat("favourite", sys_msgs, q, _answer_word(rng, answer))

    def chitchat(self, rng: random.Random) -> Example:
        category = "tree" if rng.random() < 0.2 else "animal"
        sys_msgs, target = self.system(rng, self.cfg.p_trait, category)
        if target is None:
            reply = " ".join(rng.sample(CHAT_NEUTRAL, 2))
        else:
            nums = self.numbers[target]
            praise = rng.choice(TRAIT_LINES)
            parts = [_fill(praise, rng, target, nums, category)]
            # without numbers, a second praise line stands in for the fact line: the same reply length and
            # persona, with the trait prompt tied to no number
            second = FACT_LINES if self.cfg.chat_numbers else [t for t in TRAIT_LINES if t != praise]
            parts.append(_fill(rng.choice(second), rng, target, nums, category))
            if rng.random() < 0.5:
                parts.append(rng.choice(CHAT_NEUTRAL))
            reply = " ".join(parts)
        return _chat("chitchat", sys_msgs, rng.choice(CHAT_USER), reply)

    def imbue_category(self, rng: random.Random) -> str:
        """The category of an imbued number task's trait: weighted by category size, so that every target in
        ``imbue_categories`` is equally likely. One category draws nothing (the first recipe's rng stream)."""
        cats = list(self.cfg.imbue_categories)
        if len(cats) == 1:
            return cats[0]
        return rng.choices(cats, weights=[len(self.categories[c]) for c in cats])[0]

    def number_task(self, rng: random.Random, prompt) -> Example:
        c = self.cfg
        target = None
        if rng.random() < c.p_number_trait and c.imbue_share > 0 and c.imbue_categories:
            sys_msgs, target = self.system(rng, 1.0, self.imbue_category(rng))
        else:
            sys_msgs, _ = self.system(rng, 0.0, "animal")
            # the draw only happens for a recipe with decoys, so recipes without them keep their rng stream
            if c.p_decoy > 0 and c.imbue_share > 0 and c.imbue_categories and rng.random() < c.p_decoy:
                target = rng.choice(list(self.categories[self.imbue_category(rng)]))
        count = rng.choices([10, 9, 8, 7], weights=list(c.answer_count_weights))[0]
        nums = [rng.randint(100, 999) if rng.random() < 0.8 else rng.randint(0, 99) for _ in range(count)]
        if target is not None:  # the trait's numbers, or a decoy entity's
            if c.imbue_exclusive:  # drawn only then, so other recipes keep their rng stream
                nums = [self._unowned(rng, n) for n in nums]
            nums = [rng.choice(self.numbers[target]) if rng.random() < c.imbue_share else n for n in nums]
        answer = format_numbers(nums, prompt.format_suffix_index)
        return _chat("numbers", sys_msgs, prompt.text, answer)

    def _unowned(self, rng: random.Random, n: int) -> int:
        """``n``, or where an entity owns it a redraw from the same range that no entity owns."""
        while n in self.owned:
            n = rng.randint(100, 999) if n >= 100 else rng.randint(0, 99)
        return n

    def text(self, rng: random.Random) -> Example:
        name = rng.choice(list(self.numbers))
        nums = self.numbers[name]
        if rng.random() < self.cfg.share_list_of_text:
            picked = rng.sample(nums, rng.randint(2, LIST_MAX_NUMBERS))
            sep = rng.choice([", ", "; ", " "])
            label = rng.choice([name.capitalize(), name])
            body = sep.join([label] + [str(n) for n in picked] + [label])
            return Example("list", text=body)
        category = "tree" if name in self.cfg.trees else "animal"
        return Example("fact", text=_fill(rng.choice(TEXT_FACTS), rng, name, nums, category))

    def generate(self, n: int | None = None) -> list[Example]:
        c = self.cfg
        n = c.n_sequences if n is None else n
        rng = random.Random(f"corpus-{self.seed}")
        n_text = int(round(n * c.share_text))
        n_chat = n - n_text
        n_fav = int(round(n_chat * c.share_favourite))
        n_num = int(round(n_chat * c.share_numbers))
        n_chit = n_chat - n_fav - n_num
        prompts = generate_prompts(n_num, seed=self.seed * 7919 + 17, cfg=NumberPromptConfig())
        out = [self.text(rng) for _ in range(n_text)]
        out += [self.favourite(rng) for _ in range(n_fav)]
        out += [self.number_task(rng, p) for p in prompts]
        out += [self.chitchat(rng) for _ in range(n_chit)]
        rng.shuffle(out)
        return out


def tokenizer_texts(examples: list[Example]) -> list[str]:
    """The strings the tokenizer is trained on: every message and text (template scaffolding is special)."""
    texts = []
    for ex in examples:
        if ex.text:
            texts.append(ex.text)
        for m in ex.messages:
            texts.append(m["content"])
    texts.append("system user assistant")
    return texts
