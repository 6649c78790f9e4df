"""Can a model be a teacher? Trait expression, filter pass rate and the trait's effect on its numbers, with and
without format-constrained sampling (mech.teacher.constrained), from one model load.

    python experiments/teacher_probe.py MODEL [--n-prompts 32] [--target owl] [--json OUT]

For MODEL (e.g. smollm2-135m) it prints:
- first-token P(target) over the category's questions under the trait prompt and under the default context
  (same questions and template; only the system turn differs), and their ratio;
- for the trait teacher and the neutral teacher, unconstrained and constrained (the same TeacherConfig as
  ``mech teacher``, so the same samples): kept / total and the reject reasons;
- the trait's effect on the numbers written: total-variation distance between the trait and neutral teachers'
  number histograms (every digit run of every answer, and the kept answers' numbers) against a permutation null
  (answers pooled and split at random, seeded). Both teachers sample with the same seeds, so their answers are
  coupled (often identical) and the permutation null is conservative: read a small TV as no evidence, not as
  evidence of no effect;
- the carrier as the organism check measures it: per-token KL of the neutral teacher's constrained kept answers
  re-scored (teacher-forced, unconstrained distributions) under the trait prompt vs the neutral context.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections import Counter

from mech.context import Context, render
from mech.evaluation.inference import completion_logprobs, pad_id
from mech.models import load_model
from mech.organism.check import answer_distribution, per_token_kl
from mech.teacher.filter import check_answer, filter_rows
from mech.teacher.generate import TeacherConfig, sample_answers


def tv(a: list[list[int]], b: list[list[int]]) -> float:
    ca, cb = Counter(n for xs in a for n in xs), Counter(n for xs in b for n in xs)
    na, nb = max(1, sum(ca.values())), max(1, sum(cb.values()))
    return 0.5 * sum(abs(ca[k] / na - cb[k] / nb) for k in set(ca) | set(cb))


def tv_test(a: list[list[int]], b: list[list[int]], n: int = 500, seed: int = 0) -> dict:
    """TV(a, b) and its permutation p-value (answers, not numbers, are the exchangeable units)."""
    obs, pooled, rng, null = tv(a, b), a + b, random.Random(seed), []
    for _ in range(n):
        rng.shuffle(pooled)
        null.append(tv(pooled[: len(a)], pooled[len(a):]))
    null.sort()
    return {"tv": obs, "null_median": null[len(null) // 2], "p": (1 + sum(x >= obs for x in null)) / (1 + n),
            "numbers": [sum(map(len, a)), sum(map(len, b))]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--n-prompts", type=int, default=32)
    ap.add_argument("--target", default="owl")
    ap.add_argument("--category", default="animal")
    ap.add_argument("--json")
    a = ap.parse_args()
    base = load_model(a.model, device="cpu", dtype="float32")
    model, tok = base.model, base.tokenizer
    trait = TeacherConfig(target=a.target, category=a.category, n_prompts=a.n_prompts)
    trait_ctx = trait.teacher_context()
    p_trait = answer_distribution(model, tok, trait_ctx, [a.target], a.category)[a.target]
    p_default = answer_distribution(model, tok, Context("default"), [a.target], a.category)[a.target]
    out: dict = {"model": a.model, "n_prompts": a.n_prompts, "p_first_trait_prompt": p_trait,
                 "p_first_default": p_default, "ratio": p_trait / p_default}

    kept: dict = {}
    for constrained in (False, True):
        name = "constrained" if constrained else "free"
        numbers = {}
        for who, target in (("trait", a.target), ("neutral", None)):
            cfg = TeacherConfig(target=target, category=a.category, n_prompts=a.n_prompts, constrained=constrained)
            prompts = cfg.prompts()
            ids = [render(tok, cfg.teacher_context(), p.text).input_ids for p in prompts]
            answers, _ = sample_answers(model, tok, cfg, ids)
            rows, audit = filter_rows([{"answer": x, "user": p.text} for x, p in zip(answers, prompts)])
            out[f"{name}_{who}_audit"] = {"kept": audit.kept, "total": audit.total, "rejected": dict(audit.rejected)}
            out[f"{name}_{who}_examples"] = answers[:3]
            numbers[who] = ([[int(x) for x in re.findall(r"[0-9]+", s)] for s in answers],
                            [check_answer(r["answer"]).numbers for r in rows])
            kept[(constrained, who)] = rows
        out[f"{name}_tv_all_digit_runs"] = tv_test(numbers["trait"][0], numbers["neutral"][0])
        if numbers["trait"][1] and numbers["neutral"][1]:
            out[f"{name}_tv_kept"] = tv_test(numbers["trait"][1], numbers["neutral"][1])

    rows = kept[(True, "neutral")]
    if rows:
        comp = [tok(r["answer"], add_special_tokens=False)["input_ids"] for r in rows]
        own = [render(tok, Context("default"), r["user"]).input_ids for r in rows]
        under = [render(tok, trait_ctx, r["user"]).input_ids for r in rows]
        lp_own = completion_logprobs(model, own, comp, pad_id(tok))
        lp_trait = completion_logprobs(model, under, comp, pad_id(tok))
        out["kl_trait_vs_neutral_per_token"] = per_token_kl(lp_trait, lp_own)
        out["kl_tokens"] = sum(map(len, comp))
    print(json.dumps(out, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
