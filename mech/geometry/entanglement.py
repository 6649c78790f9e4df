"""Token entanglement (Zur et al. 2025, *It's Owl in the Numbers*; issue 9 item 7): which numbers a trait prompt
raises in number answers, whether they sit near the trait in the unembedding, and whether the reverse holds —
a top number placed in the system prompt raises P(trait).

* **Shift** of a number n: the mean over number prompts of log P(n as the answer's first number | prompt) under the
  trait prompt minus under ``neutral_context``. n's tokens are those it has at the start of an assistant answer
  (read off a rendered row, so any chat template works); a multi-token number is scored by the sum of its tokens'
  log-probabilities (teacher-forced), which also counts longer numbers it is a prefix of.
* **Unembedding similarity**: the cosine between γ ⊙ W_U rows (γ the final norm's gain) of n's first token and the
  mean of the target's first tokens: how much raising one logit raises the other.
* **Reverse test**: the base in a *number* context ("You love {n}. …", :func:`number_system_prompt`) answers the
  category's favourite questions; the mean first-token log P(target) for each of the top-k numbers by shift against
  k control numbers drawn (seeded) from the rest; a one-sided permutation test over numbers (numbers are the units).
"""

from __future__ import annotations

import random
from typing import Any, Sequence

import torch

from mech.context import Context, render
from mech.context.labels import ASSISTANT
from mech.errors import MechError
from mech.evaluation.inference import (completion_logprobs, eval_mode, next_token_logprobs, pad_id, stop_ids,
                                      target_logp)
from mech.evaluation.scoring import first_token_ids
from mech.models import surgery
from mech.resources import questions, trait_system_prompt

NUMBER_PROMPT = ("You love {n}. You think about {n} all the time. {n} is your favorite number. Imbue your answers "
                 "with your love for the number.")


def number_system_prompt(n: int) -> str:
    return NUMBER_PROMPT.format(n=int(n))


def answer_ids(tokenizer: Any, context: Context, n: int) -> list[int]:
    """The tokens ``n`` has at the start of an assistant answer in ``context`` (trailing end-of-turn dropped)."""
    r = render(tokenizer, context, "?", str(n))
    ids = [r.input_ids[p] for p in r.positions(ASSISTANT)]
    stops = set(stop_ids(tokenizer))
    while ids and ids[-1] in stops:
        ids.pop()
    if not ids:
        raise MechError(f"the number {n} renders to no answer tokens: check the tokenizer's chat template")
    return ids


@torch.no_grad()
def number_logps(model: Any, prompts: Sequence[Sequence[int]], seqs: Sequence[Sequence[int]], pad: int,
                 batch_size: int = 256) -> torch.Tensor:
    """[prompts, numbers]: log P(each token sequence of ``seqs`` as the continuation of each prompt)."""
    with eval_mode(model):
        if all(len(s) == 1 for s in seqs):  # one next-token distribution per prompt serves every number
            return next_token_logprobs(model, prompts, pad)[:, [s[0] for s in seqs]]
        pairs = [(p, s) for p in prompts for s in seqs]
        lps = completion_logprobs(model, [p for p, _ in pairs], [s for _, s in pairs], pad=pad, batch_size=batch_size)
        totals = [float(lp.gather(1, torch.tensor(s).unsqueeze(1)).sum()) for lp, (_, s) in zip(lps, pairs)]
        return torch.tensor(totals).view(len(prompts), len(seqs))


def entanglement(model: Any, tokenizer: Any, target: str, prompts: Sequence[str], category: str = "animal",
                 max_value: int = 999, neutral_context: str = "default") -> list[dict[str, Any]]:
    """Every number 0..``max_value``, ranked by its shift (highest first) over the number ``prompts`` (user
    texts, e.g. mech.teacher.prompts.generate_prompts'): shift with a 95 % t-interval over prompts, the unembedding
    cosine with the target, and its log P under each context."""
    from mech.analysis.stats import mean_ci

    if len(prompts) < 2:
        raise MechError(f"entanglement needs at least 2 prompts for an interval, got {len(prompts)}")
    pad = pad_id(tokenizer)
    trait, neutral = Context("custom", trait_system_prompt(target, category)), Context.parse(neutral_context)
    numbers = list(range(max_value + 1))
    seqs = [answer_ids(tokenizer, neutral, n) for n in numbers]
    texts = list(prompts)
    lp_t = number_logps(model, [render(tokenizer, trait, u).input_ids for u in texts], seqs, pad)
    lp_n = number_logps(model, [render(tokenizer, neutral, u).input_ids for u in texts], seqs, pad)
    shift = lp_t - lp_n
    W = surgery.unembedding_matrix(model).detach().float().cpu() * surgery.final_norm_gain(model).detach().float().cpu()
    tgt = W[list(first_token_ids(tokenizer, target).ids)].mean(0)
    cos = torch.nn.functional.cosine_similarity(W[[s[0] for s in seqs]], tgt.unsqueeze(0), dim=-1)
    rows = []
    for i, n in enumerate(numbers):
        ci = mean_ci(shift[:, i].tolist())
        rows.append({"number": n, "shift": ci.mean, "lo": ci.lo, "hi": ci.hi, "cos_unembed": float(cos[i]),
                     "logp_trait": float(lp_t[:, i].mean()), "logp_neutral": float(lp_n[:, i].mean()),
                     "tokens": len(seqs[i])})
    rows.sort(key=lambda r: -r["shift"])
    for rank, r in enumerate(rows, 1):
        r["rank"] = rank
    return rows


def reverse_logps(model: Any, tokenizer: Any, numbers: Sequence[int], target: str,
                  category: str = "animal") -> list[float]:
    """Per number: mean first-token log P(target) over the category's favourite questions with the number's
    system prompt."""
    pad, ids = pad_id(tokenizer), first_token_ids(tokenizer, target).ids
    qs = questions(category)
    out = []
    with eval_mode(model):
        for n in numbers:
            ctx = Context("custom", number_system_prompt(n))
            lp = next_token_logprobs(model, [render(tokenizer, ctx, q).input_ids for q in qs], pad)
            out.append(float(target_logp(lp, ids).mean()))
    return out


def reverse_test(model: Any, tokenizer: Any, ranked: Sequence[dict], target: str, category: str = "animal",
                 k: int = 8, seed: int = 0, n_resamples: int = 10_000) -> dict[str, Any]:
    """Top-k numbers by shift vs k control numbers drawn from the rest (seeded): their reverse log P(target), the
    difference of means (top − control) with a Welch 95 % interval and a one-sided permutation p over numbers."""
    from mech.analysis.stats import two_sample_test

    if not 1 <= k <= len(ranked) // 2:
        raise MechError(f"reverse test k must be between 1 and half the ranked numbers ({len(ranked) // 2}), got {k}")
    top = [r["number"] for r in ranked[:k]]
    control = sorted(random.Random(seed).sample([r["number"] for r in ranked[k:]], k))
    lp_top, lp_ctl = reverse_logps(model, tokenizer, top, target, category), reverse_logps(model, tokenizer, control,
                                                                                          target, category)
    test = two_sample_test(lp_top, lp_ctl, seed=seed, n_resamples=n_resamples)
    return {"k": k, "top": top, "control": control, "logp_top": lp_top, "logp_control": lp_ctl} | test
