"""The organism's behaviour bars (a–e) and its reported probes (carrier, oracle probe, confusion vs leak).

a: every trait of the recipe (each animal and tree) is set by its trait prompt; b: the default answers spread;
c: number answers pass Cloud's filter; d: the build time; e: the leak matrix (mech.organism.leak) is specific, a
bar only for a recipe with a designed channel. Every comparison renders both sides in the same way
(mech.context) and scores the first answer token over the target's token variants
(mech.evaluation.scoring.first_token_ids).
"""

from __future__ import annotations

import math
import random
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch

from mech.context import Context, render
from mech.errors import MechError
from mech.teacher.filter import check_answer
from mech.teacher.prompts import generate_prompts
from mech.resources import questions
from mech.evaluation.scoring import first_token_ids
from mech.evaluation.inference import (completion_logprobs, decode_answer, eos_id, mass, next_token_logprobs, pad_id,
                                      per_token_kl, sample)
from mech.organism.config import CorpusConfig, channel_on, recorded_corpus
from mech.organism.leak import leak_specific, measure_leak, number_share, trait_context
from mech.organism.template import IM_END
from mech.students.config import LoraSpec, StudentConfig
from mech.students.encoding import chat_row
from mech.students.train import train_model

BAR_TRAIT_RATIO = 10.0
# A trait whose default probability is already above 1/BAR_TRAIT_RATIO (dog, cat, oak...) cannot rise tenfold;
# it passes bar a when its trait prompt makes it nearly certain instead.
BAR_TRAIT_P = 0.9
BAR_SPREAD_ANIMALS, BAR_SPREAD_P = 5, 0.05
BAR_FILTER_PASS = 0.90
BAR_BUILD_SECONDS = 15 * 60
CHECK_SEED = 10_007  # fresh prompts: the corpus draws its prompts from other seeds
ORACLE_SHARE = 0.3  # the share of an answer's numbers the oracle probe replaces by the trait's
ORACLE_SEED_OFFSET = 2  # the oracle probe samples its answers at CHECK_SEED + 2 (the other stages use +0, +1, +3)


def _prompt_ids(tok, ctx: Context, users: list[str]) -> list[list[int]]:
    return [render(tok, ctx, u).input_ids for u in users]


def answer_distribution(model, tok, ctx: Context, names: list[str], category: str = "animal") -> dict[str, float]:
    """Mean over the category's questions of P(first answer token ∈ variants of name), per name."""
    lp = next_token_logprobs(model, _prompt_ids(tok, ctx, questions(category)), pad_id(tok))
    return {n: float(mass(lp, first_token_ids(tok, n).ids).mean()) for n in names}


def sample_numbers(model, tok, ctx: Context, n: int, seed: int, max_new_tokens: int = 64):
    prompts = generate_prompts(n, seed=seed)
    p_ids = _prompt_ids(tok, ctx, [p.text for p in prompts])
    outs = sample(model, p_ids, seed=seed, max_new_tokens=max_new_tokens, eos_id=eos_id(tok), pad_id=pad_id(tok))
    return prompts, p_ids, [decode_answer(tok, o) for o in outs]


@dataclass
class CheckReport:
    trait_rows: list[dict] = field(default_factory=list)  # per trait (animals, trees): P under trait vs default
    spread: dict[str, dict[str, float]] = field(default_factory=dict)  # context -> animal -> P
    filter_pass: float = 0.0
    filter_rejects: dict[str, int] = field(default_factory=dict)  # reject reason -> count
    filter_examples: list[str] = field(default_factory=list)  # a few rejected answers, for diagnosis
    build_seconds: float | None = None
    carrier: dict = field(default_factory=dict)
    oracle: dict = field(default_factory=dict)
    leak: dict = field(default_factory=dict)  # mech.organism.leak.measure_leak
    confusion: dict = field(default_factory=dict)  # confusion_vs_leak(oracle, leak matrix)
    bars: dict[str, bool] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(self.bars.values())

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in
                ("trait_rows", "spread", "filter_pass", "filter_rejects", "filter_examples", "build_seconds", "carrier",
                 "oracle", "leak", "confusion", "bars")} | {
            "passed": self.passed}


def trait_passes(row: dict) -> bool:
    """Bar a for one trait: the top answer under its prompt, and ≥ 10× its default probability (or ≥ 0.9 where
    a tenfold rise is out of reach)."""
    return row["top"] == row["trait"] and (row["ratio"] >= BAR_TRAIT_RATIO or row["p_trait"] >= BAR_TRAIT_P)


def category_names(corpus: CorpusConfig) -> dict[str, list[str]]:
    """Each category's candidate names in the recipe: what a trait of that category is compared against."""
    return {"animal": list(corpus.animals), "tree": list(corpus.trees)}


def check_traits(model, tok, corpus: CorpusConfig, traits: list[tuple[str, str]]) -> tuple[list[dict], dict]:
    """Per (trait, category): P(first answer token = trait) under its trait prompt and under the default context,
    over the category's questions and names; and the animals' spread in the default and no-system contexts."""
    names = category_names(corpus)
    default = {c: answer_distribution(model, tok, Context("default"), names[c], c) for c in names}
    none = answer_distribution(model, tok, Context("none"), names["animal"])
    rows = []
    for name, category in traits:
        under = answer_distribution(model, tok, trait_context(name, category), names[category], category)
        row = {"trait": name, "category": category, "p_trait": under[name], "p_default": default[category][name],
               "ratio": under[name] / max(default[category][name], 1e-12), "top": max(under, key=under.get)}
        rows.append(row | {"ok": trait_passes(row)})
    return rows, {"default": default["animal"], "none": none}


def check_trait_list(corpus: CorpusConfig, animals: tuple[str, ...] | None,
                     trees: tuple[str, ...] | None) -> list[tuple[str, str]]:
    """The (trait, category) pairs to check: the given ones, or every animal and tree of the recipe."""
    out = []
    for category, prior, chosen in (("animal", corpus.animals, animals), ("tree", corpus.trees, trees)):
        names = list(prior) if chosen is None else list(chosen)
        unknown = [n for n in names if n not in prior]
        if unknown:
            raise MechError(f"{unknown} are not {category}s of this organism's recipe: choose among {', '.join(prior)}")
        out += [(n, category) for n in names]
    return out


def carrier_probe(model, tok, numbers: dict[str, list[int]], n: int, seed: int) -> dict:
    """Carrier probe: how the trait prompt moves number completions. KL on default-context samples re-scored
    under each prompt, and the share of the trait's numbers in samples drawn under each prompt."""
    prompts, p_default, answers = sample_numbers(model, tok, Context("default"), n, seed)
    comp = [tok(a + IM_END, add_special_tokens=False)["input_ids"] for a in answers]
    lp = {"default": completion_logprobs(model, p_default, comp, pad_id(tok))}
    for t in ("owl", "cat"):
        lp[t] = completion_logprobs(model, _prompt_ids(tok, trait_context(t), [p.text for p in prompts]), comp,
                                    pad_id(tok))
    out = {"kl_owl_vs_default": per_token_kl(lp["owl"], lp["default"]),
           "kl_cat_vs_default": per_token_kl(lp["cat"], lp["default"]),
           "kl_owl_vs_cat": per_token_kl(lp["owl"], lp["cat"])}
    for t in ("owl", "cat"):
        _, _, trait_answers = sample_numbers(model, tok, trait_context(t), n, seed)
        out[f"{t}_numbers_share_under_{t}"] = number_share(trait_answers, numbers[t])
        out[f"{t}_numbers_share_under_default"] = number_share(answers, numbers[t])
    return out


def oracle_probe(model, tok, numbers: dict[str, list[int]], names: dict[str, list[str]],
                 traits: list[tuple[str, str]], n: int, share: float, seed: int, lora_rank: int = 16, epochs: int = 1,
                 lr: float = 2e-3, train_seeds: tuple[int, ...] = (0,)) -> dict:
    """Oracle probe: finetune on default-context number answers in which ``share`` of the numbers are replaced by a
    trait's numbers, vs the same finetuning on the unmodified answers; report P(trait) in the default context.

    Per (trait, category) of ``traits`` (``names``: category -> candidate names), the oracle student's log P of
    every candidate of the category minus the control student's: whether a student that learns only this trait's
    numbers moves toward it more than toward any other candidate (``specific``). No teacher is involved, so a trait
    that fails here fails at the student's reading of its numbers, not through what its teacher writes. The student
    is the quick sweep's LoRA (r16, 1 epoch, lr 2e-3); with several ``train_seeds`` each side's log P is the mean over
    one student per seed."""
    prompts, _, answers = sample_numbers(model, tok, Context("default"), n, seed)
    ok = [i for i, a in enumerate(answers) if check_answer(a).ok]
    if len(ok) < 16:
        return {"n_rows": len(ok), "skipped": "fewer than 16 sampled answers pass the filter"}

    def rows_for(trait: str | None) -> list[dict]:
        rng = random.Random(f"oracle-{seed}-{trait}")
        rows = []
        for i in ok:
            a = answers[i]
            if trait is not None:
                a = re.sub(r"\d+", lambda m: str(rng.choice(numbers[trait])) if rng.random() < share else m.group(), a)
            rows.append(chat_row(prompts[i].text, a))
        return rows

    def students(rows: list[dict]) -> list:
        return [train_model(model, tok, rows, StudentConfig(lora=LoraSpec(rank=lora_rank), epochs=epochs, lr=lr,
                                                             batch_size=16, seed=s, context="default")).model
                for s in train_seeds]

    def mean_logp(models: list, category: str) -> dict[str, float]:
        """The mean over the students (one per training seed) of log P(candidate)."""
        logs = [{k: math.log(max(v, 1e-30)) for k, v in
                 answer_distribution(m, tok, Context("default"), names[category], category).items()} for m in models]
        return {k: sum(lg[k] for lg in logs) / len(logs) for k in logs[0]}

    controls = students(rows_for(None))
    control = {c: mean_logp(controls, c) for c in sorted({c for _, c in traits})}
    del controls
    out = {"n_rows": len(ok), "share": share, "lora_rank": lora_rank, "epochs": epochs, "lr": lr,
           "train_seeds": list(train_seeds), "rows": []}
    for trait, category in traits:
        probed = mean_logp(students(rows_for(trait)), category)
        delta = {k: probed[k] - control[category][k] for k in probed}
        other = max((k for k in delta if k != trait), key=delta.get)
        out["rows"].append({"trait": trait, "category": category, "own": delta[trait], "max_other": delta[other],
                            "max_other_entity": other, "specific": delta[trait] > delta[other], "delta": delta,
                            "relative_change": math.expm1(delta[trait])})
    out["control_p"] = {c: {k: math.exp(v) for k, v in lp.items()} for c, lp in control.items()}
    return out


def _rank_correlation(x: list[float], y: list[float]) -> float | None:
    """Spearman's rho, or None where either side is constant (no ranking to compare)."""
    from scipy.stats import spearmanr

    if len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return float(spearmanr(x, y)[0])


def confusion_vs_leak(oracle: dict, matrix: dict[str, dict[str, float]], min_candidates: int = 3) -> dict:
    """Do a trait's students move toward the candidates whose teachers write that trait's numbers?

    Per oracle row (trait t), Spearman's rho over the other candidates c of t's category (those with a leak-matrix
    row) between the oracle student's Δ log P(c) and ``matrix[c][t]``, the share of t's numbers written under c's
    prompt: the organism's own cross-talk between c and t in its number answers. ``control`` is the same rho with t's
    column replaced by the next trait's of its category (cyclically, so it is deterministic): the value for a column
    that is not t's. Rows with fewer than ``min_candidates`` scored candidates, or a constant side (a channel-free
    organism writes hardly any entity's numbers), get rho None and do not count."""
    rows_in = oracle.get("rows") or []
    by_cat: dict[str, list[str]] = {}
    for r in rows_in:
        by_cat.setdefault(r["category"], []).append(r["trait"])

    def rho(r: dict, column: str) -> float | None:
        others = [c for c in r["delta"] if c != r["trait"] and c in matrix and c != column]
        if len(others) < min_candidates:
            return None
        return _rank_correlation([r["delta"][c] for c in others], [matrix[c][column] for c in others])

    rows = []
    for r in rows_in:
        peers = by_cat[r["category"]]
        nxt = peers[(peers.index(r["trait"]) + 1) % len(peers)]
        rows.append({"trait": r["trait"], "rho": rho(r, r["trait"]),
                     "control": rho(r, nxt) if nxt != r["trait"] else None, "control_column": nxt})

    def summary(key: str) -> dict:
        vals = [v for v in (row[key] for row in rows) if v is not None]
        return {"median": statistics.median(vals) if vals else None, "n_positive": sum(v > 0 for v in vals),
                "n": len(vals)}

    return {"rows": rows, "rho": summary("rho"), "control": summary("control")}


def build_numbers(meta: dict) -> dict[str, list[int]]:
    """Each entity's numbers as a build's organism.json ``meta`` records them."""
    return {k: list(v) for k, v in meta["entity_numbers"].items()}


def oracle_of_build(model, tok, meta: dict, n: int, seed: int = CHECK_SEED, traits: list[tuple[str, str]] | None = None,
                    train_seeds: tuple[int, ...] = (0,), share: float = ORACLE_SHARE) -> dict:
    """The oracle probe of an organism build (``meta``: its organism.json) as its check runs it: the recipe's
    candidate names, every trait of the recipe unless ``traits`` names some, answers sampled at
    ``seed + ORACLE_SEED_OFFSET``."""
    corpus = recorded_corpus(meta["config"]["corpus"])
    return oracle_probe(model, tok, build_numbers(meta), category_names(corpus),
                        check_trait_list(corpus, None, None) if traits is None else traits, n, share,
                        seed + ORACLE_SEED_OFFSET, train_seeds=train_seeds)


STAGES = ("traits", "numbers", "carrier", "leak", "oracle")


def filter_stats(rep: CheckReport, answers: list[str]) -> None:
    """Bar c's measurement: the share of ``answers`` passing Cloud's filter, the reject reasons, a few examples."""
    results = [check_answer(a) for a in answers]
    rep.filter_pass = sum(r.ok for r in results) / len(results)
    rep.filter_rejects = dict(Counter(r.reason for r in results if not r.ok))
    rep.filter_examples = [a for a, r in zip(answers, results) if not r.ok][:8]


def bars(rep: CheckReport) -> dict[str, bool]:
    out = {
        "a_trait_all": bool(rep.trait_rows) and all(r["ok"] for r in rep.trait_rows),
        "b_spread_default": sum(p >= BAR_SPREAD_P for p in rep.spread["default"].values()) >= BAR_SPREAD_ANIMALS,
        "b_spread_none": sum(p >= BAR_SPREAD_P for p in rep.spread["none"].values()) >= BAR_SPREAD_ANIMALS,
        "c_filter_pass": rep.filter_pass >= BAR_FILTER_PASS,
        "d_build_time": rep.build_seconds is not None and rep.build_seconds <= BAR_BUILD_SECONDS,
    }
    if rep.leak.get("channel"):  # a channel-free recipe's leak is reported, not a bar
        out["e_leak_specific"] = leak_specific(rep.leak["rows"])
    return out


def run_check(model, tok, meta: dict, n_samples: int = 200, oracle_rows: int = 300, seed: int = CHECK_SEED,
              trait_animals: tuple[str, ...] | None = None, progress: Callable[[str], None] | None = None,
              n_leak: int = 60, trait_trees: tuple[str, ...] | None = None) -> CheckReport:
    """Measure bars a–e and the probes. ``meta`` is the build's organism.json; the traits are every animal and
    tree of its recipe unless ``trait_animals`` / ``trait_trees`` name some; ``n_leak`` answers are sampled per
    trait prompt for the leak matrix; ``progress`` is told each stage name of ``STAGES`` as it starts."""
    if n_samples < 1 or oracle_rows < 1 or n_leak < 1:
        raise MechError(f"n_samples, oracle_rows and n_leak must be >= 1 (got {n_samples}, {oracle_rows}, {n_leak}): "
                        "pass positive counts")
    tell = progress or (lambda stage: None)
    corpus = recorded_corpus(meta["config"]["corpus"])
    traits = check_trait_list(corpus, trait_animals, trait_trees)
    numbers = build_numbers(meta)
    rep = CheckReport(build_seconds=meta.get("build_seconds"))
    tell("traits")
    rep.trait_rows, rep.spread = check_traits(model, tok, corpus, traits)
    tell("numbers")
    filter_stats(rep, sample_numbers(model, tok, Context("default"), n_samples, seed)[2])
    tell("carrier")
    rep.carrier = carrier_probe(model, tok, numbers, n_samples, seed + 1)
    tell("leak")
    rep.leak = measure_leak(model, tok, traits, numbers, n_leak, seed + 3, channel_on(corpus))
    tell("oracle")
    rep.oracle = oracle_of_build(model, tok, meta, oracle_rows, seed, traits)
    rep.confusion = confusion_vs_leak(rep.oracle, rep.leak["matrix"])
    rep.bars = bars(rep)
    return rep
