"""The leak matrix: whose numbers an organism writes in its number answers under each trait prompt.

Every animal and tree of the recipe owns a disjoint set of numbers (organism.json's ``entity_numbers``). Under
trait T's prompt, and once under the default context, the check samples number answers to Cloud et al.'s
prompts (T = 1, seeded) and counts, per entity E, the share of all numbers written that are E's:
``matrix[T][E]``. A designed channel is *specific* when, under every trait's prompt, the trait's own numbers
hold the largest share of any entity's (bar e of a recipe with the channel on; reported otherwise).
"""

from __future__ import annotations

import re
from collections import Counter

from mech.context import Context, render
from mech.errors import MechError
from mech.evaluation.inference import decode_answer, eos_id, pad_id, sample
from mech.resources import trait_system_prompt
from mech.teacher.prompts import generate_prompts

DEFAULT_ROW = "default"  # the matrix row of the default context (no entity has this name)
LEAK_MAX_NEW_TOKENS = 64  # a 10-number answer takes about 20-30 tokens
LEAK_BATCH = 128  # wider than sample's default: the prompts are short and the organism is small


def trait_context(target: str, category: str = "animal") -> Context:
    return Context("custom", trait_system_prompt(target, category))


def numbers_written(answers: list[str]) -> list[int]:
    return [int(x) for a in answers for x in re.findall(r"\d+", a)]


def number_share(answers: list[str], numbers: list[int]) -> float:
    """Share of the numbers written in ``answers`` that belong to ``numbers``."""
    got = numbers_written(answers)
    wanted = set(numbers)
    return sum(x in wanted for x in got) / max(1, len(got))


def own_number_counts(answers: list[str], numbers: list[int]) -> tuple[list[int], list[int]]:
    """Per answer: how many of the numbers it writes are in ``numbers``, and how many it writes (the units and
    items of mech.analysis.stats.paired_share_test)."""
    wanted = set(numbers)
    per = [numbers_written([a]) for a in answers]
    return [sum(x in wanted for x in p) for p in per], [len(p) for p in per]


def leak_answers(model, tok, traits: list[tuple[str, str]], n: int, seed: int) -> dict[str, list[str]]:
    """``n`` number answers under each (trait, category)'s prompt and under the default context, keyed by trait
    name and DEFAULT_ROW. Every context answers the same ``n`` prompts, so rows differ only by the system
    prompt; one batched ``sample`` call covers them all."""
    users = [p.text for p in generate_prompts(n, seed=seed)]
    contexts = {name: trait_context(name, category) for name, category in traits}
    contexts[DEFAULT_ROW] = Context("default")
    ids = [render(tok, ctx, u).input_ids for ctx in contexts.values() for u in users]
    outs = sample(model, ids, seed=seed, max_new_tokens=LEAK_MAX_NEW_TOKENS, eos_id=eos_id(tok), pad_id=pad_id(tok),
                  batch_size=LEAK_BATCH)
    answers = [decode_answer(tok, o) for o in outs]
    return {row: answers[i * n:(i + 1) * n] for i, row in enumerate(contexts)}


def leak_matrix(answers: dict[str, list[str]], numbers: dict[str, list[int]]) -> dict[str, dict[str, float]]:
    """``matrix[row][E]``: the share of all numbers written in ``answers[row]`` that are entity E's. A number
    no entity owns counts in the denominator only, so a row sums to at most 1."""
    owner = {x: e for e, nums in numbers.items() for x in nums}
    matrix = {}
    for row, texts in answers.items():
        got = numbers_written(texts)
        counts = Counter(owner[x] for x in got if x in owner)
        matrix[row] = {e: counts[e] / max(1, len(got)) for e in numbers}
    return matrix


def leak_rows(matrix: dict[str, dict[str, float]], traits: list[str]) -> list[dict]:
    """Per trait: its own share under its prompt, the largest other entity's share there (and which), its own
    share under the default context, and whether its own share is strictly the largest (``specific``)."""
    rows = []
    for t in traits:
        under = matrix[t]
        others = {e: v for e, v in under.items() if e != t}
        other = max(others, key=others.get)
        rows.append({"trait": t, "own": under[t], "max_other": others[other], "max_other_entity": other,
                     "own_default": matrix[DEFAULT_ROW][t], "specific": under[t] > others[other]})
    return rows


def leak_specific(rows: list[dict]) -> bool:
    """Bar e: under every trait's prompt its own numbers lead (a tie, e.g. no numbers at all, does not)."""
    return bool(rows) and all(r["specific"] for r in rows)


def measure_leak(model, tok, traits: list[tuple[str, str]], numbers: dict[str, list[int]], n: int, seed: int,
                 channel: bool) -> dict:
    """The leak matrix and its per-trait specificity; ``channel``: whether the recipe designed a channel (then
    specificity is a bar, else it is only reported)."""
    answers = leak_answers(model, tok, traits, n, seed)
    names = [name for name, _ in traits]
    # columns in the rows' order (then any entity not checked), so that a specific channel is the diagonal
    order = names + [e for e in numbers if e not in names]
    matrix = leak_matrix(answers, {e: numbers[e] for e in order})
    return {"n": n, "seed": seed, "channel": channel, "entities": order,
            "n_numbers": {row: len(numbers_written(a)) for row, a in answers.items()},
            "matrix": matrix, "rows": leak_rows(matrix, names)}


def leak_test(model, tok, traits: list[tuple[str, str]], numbers: dict[str, list[int]], n: int, seed: int,
              n_resamples: int = 10_000) -> list[dict]:
    """Per trait: does its prompt raise the share of its own numbers above the default context's share?

    The leak matrix gives the shares; this tests them. Each of ``n`` prompts is answered once under the trait's
    prompt and once under the default context, so a prompt is the unit: mech.analysis.stats.paired_share_test
    gives the difference of shares with a bootstrap interval over prompts and a one-sided paired permutation
    p-value; ``p_holm`` corrects over the traits tested. On a channel-free organism this decides whether a
    trait prompt shifts the numbers toward the trait's own (an emergent channel)."""
    from mech.analysis.hypotheses import adjust
    from mech.analysis.stats import paired_share_test

    answers = leak_answers(model, tok, traits, n, seed)
    rows = []
    for name, category in traits:
        hits_t, tot_t = own_number_counts(answers[name], numbers[name])
        hits_d, tot_d = own_number_counts(answers[DEFAULT_ROW], numbers[name])
        if not sum(tot_t) or not sum(tot_d):
            where = "its prompt" if not sum(tot_t) else "the default context"
            raise MechError(f"leak test of {name}: no number written in {n} answers under {where}, so there is no "
                            "share to compare: test a trained organism, or raise --n")
        res = paired_share_test(hits_t, tot_t, hits_d, tot_d, n_resamples=n_resamples, seed=seed)
        rows.append({"trait": name, "category": category, "own": res["share_a"], "own_default": res["share_b"],
                     "diff": res["diff"], "lo": res["lo"], "hi": res["hi"], "p": res["p_greater"],
                     "hits": sum(hits_t), "numbers": sum(tot_t), "hits_default": sum(hits_d),
                     "numbers_default": sum(tot_d), "n_prompts": n})
    for row, holm in zip(rows, adjust([r["p"] for r in rows])[0]):
        row["p_holm"] = holm
    return rows
