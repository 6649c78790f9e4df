"""Benchmark: generation at its limit — sampled trait evaluation vs the raw decode of the same tokens, the
first-token metric vs sampling, teacher generation vs naive per-prompt ``generate``, and (given a sweep cache)
how well the first-token metric ranks a sweep's students the way the sampled rate does.

Each ratio is measured side by side in one run, on the shipped organism (or ``--model``):

* ``sampled_vs_raw``: ``mech.evaluation.inference.sample`` as trait evaluation calls it (50 questions ×
  ``--samples`` answers, batch 256) against the least work the same tokens can cost: one prefill per question
  with last-position logits, its KV cache copied to the question's samples, then the sampled tokens fed back
  column by column — the same forwards with no choosing, no CPU copies and no per-row Python. Goal ≤ 1.5×.
* ``sampled_vs_first_token``: a whole sampled evaluation (``evaluate_trait``) against a first-token-only one.
  Goal ≥ 100×.
* ``teacher_vs_naive``: ``mech.teacher.generate.sample_answers`` on ``--teacher-prompts`` number prompts against
  HF ``generate(do_sample=True)`` one prompt at a time on the same prompts. Goal ≥ 3×.
* ``first_token_vs_rate_spearman`` (with ``--sweep`` and ``--cache``): Spearman correlation, across the sweep's
  finished students, of first-token P(target) with the sampled rate. Goal ≥ 0.9. Reads the cache; computes nothing.

Writes benchmarks/results/sampling.json.

    python benchmarks/bench_sampling.py [--samples 100] [--threads 1] [--sweep experiments/quick.yaml --cache DIR]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from mech.context import Context, render
from mech.evaluation.inference import (cache_kwarg, eos_id, eval_mode, last_logits_only, left_pad, pad_id, sample,
                                       stop_ids)
from mech.evaluation.trait import TraitEvalConfig, evaluate_trait
from mech.models import load_model
from mech.resources import questions
from mech.store import atomic_write_json
from mech.teacher.generate import TeacherConfig, sample_answers

RESULTS = Path(__file__).parent / "results" / "sampling.json"
BATCH = TraitEvalConfig().batch_size


def timed(fn: Callable[[], Any], reps: int) -> tuple[float, Any]:
    """Median wall seconds over ``reps`` calls (after one untimed warm-up) and the last call's value."""
    fn()
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


@torch.no_grad()
def raw_decode(model, prompts: list[list[int]], outs: list[list[int]], n_samples: int, pad: int) -> int:
    """Feed the already-sampled ``outs`` through the model in ``sample``'s batches: the forwards sampling cannot
    avoid. Returns the number of forwards."""
    cache_kw, keep, forwards = cache_kwarg(model), last_logits_only(model), 0
    n_req = len(prompts) * n_samples
    for s in range(0, n_req, BATCH):
        owner = torch.arange(s, min(s + BATCH, n_req)) // n_samples
        first = int(owner[0])
        ids, attn, pos = left_pad(prompts[first:int(owner[-1]) + 1], pad, "cpu")
        o = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, **keep)
        past, rows = getattr(o, cache_kw), owner - first
        past.reorder_cache(rows)
        attn, pos = attn[rows], pos[rows, -1:]
        forwards += 1
        batch = outs[s:s + len(owner)]
        width = max(len(t) for t in batch)
        toks = torch.full((len(batch), width), pad, dtype=torch.long)
        for r, t in enumerate(batch):
            toks[r, :len(t)] = torch.tensor(t)
        for col in range(width - 1):  # the last token is chosen, never fed
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=-1)
            pos = pos + 1
            o = model(input_ids=toks[:, col:col + 1], attention_mask=attn, position_ids=pos, use_cache=True,
                      **{cache_kw: past}, **keep)
            past = getattr(o, cache_kw)
            forwards += 1
    return forwards


@torch.no_grad()
def naive_generate(model, tok, prompts: list[list[int]], max_new_tokens: int, seed: int) -> list[list[int]]:
    """HF ``generate`` one prompt at a time: what a per-sample script does."""
    torch.manual_seed(seed)
    stops = list(stop_ids(tok))
    outs = []
    for p in prompts:
        ids = torch.tensor([p])
        g = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0, top_p=1.0,
                           temperature=1.0, max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad_id(tok))
        outs.append(g[0, len(p):].tolist())
    return outs


def spearman_from_sweep(sweep: str, cache: str | None) -> dict[str, Any]:
    """Spearman of first-token P(target) and the sampled rate over the finished students of a sweep's cache."""
    from scipy.stats import spearmanr

    from mech.sweep import SweepRunner, cells, load_sweep

    runner = SweepRunner(load_sweep(sweep), Path(cache) if cache else None)
    done = [c for c in cells(runner.cfg) if runner.is_done(c)]
    evals = [runner.cell_eval(c) for c in done]  # cached: is_done means the evaluation file exists
    pairs = [(e["p_first"], e["rate"]) for e in evals if e.get("rate") is not None]
    if len(pairs) < 3:
        return {"sweep": sweep, "students": len(pairs), "spearman": None}
    rho = spearmanr([p for p, _ in pairs], [r for _, r in pairs]).statistic
    return {"sweep": sweep, "students": len(pairs), "spearman": float(rho),
            "samples_per_student": evals[0]["n_answers"]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="organism")
    ap.add_argument("--samples", type=int, default=100, help="sampled answers per question (trait eval default)")
    ap.add_argument("--teacher-prompts", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions of the fast paths (median reported)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sweep", default=None, help="a sweep YAML whose cached students to rank (optional)")
    ap.add_argument("--cache", default=None, help="the sweep cache (default: mech's)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    lm = load_model(args.model, device="cpu", dtype="float32")
    model, tok = lm.model.eval(), lm.tokenizer
    prompts = [render(tok, Context.parse("default"), q).input_ids for q in questions("animal")]
    kw = dict(seed=0, max_new_tokens=TraitEvalConfig().max_new_tokens, eos_id=eos_id(tok), pad_id=pad_id(tok),
              batch_size=BATCH, n_samples=args.samples)

    t_sample, outs = timed(lambda: sample(model, prompts, **kw), args.reps)
    t_raw, forwards = timed(lambda: raw_decode(model, prompts, outs, args.samples, pad_id(tok)), args.reps)

    cfg = TraitEvalConfig(n_samples=args.samples)
    t_eval, _ = timed(lambda: evaluate_trait(model, tok, cfg), args.reps)
    t_first, _ = timed(lambda: evaluate_trait(model, tok, TraitEvalConfig(first_token_only=True)), args.reps)

    tcfg = TeacherConfig(target="owl", n_prompts=args.teacher_prompts)
    t_ids = [render(tok, tcfg.teacher_context(), p.text).input_ids for p in tcfg.prompts()]
    with eval_mode(model):
        t_teacher, _ = timed(lambda: sample_answers(model, tok, tcfg, t_ids), args.reps)
        t0 = time.perf_counter()
        naive = naive_generate(model, tok, t_ids, tcfg.max_new_tokens, seed=0)
        t_naive = time.perf_counter() - t0  # seconds a run: once is enough

    result: dict[str, Any] = {
        "setup": {"model": args.model, "questions": len(prompts), "samples_per_question": args.samples,
                  "max_new_tokens": kw["max_new_tokens"], "batch_size": BATCH,
                  "sampled_tokens": sum(len(o) for o in outs), "teacher_prompts": args.teacher_prompts,
                  "teacher_max_new_tokens": tcfg.max_new_tokens,
                  "naive_tokens": sum(len(o) for o in naive), "threads": args.threads, "torch": torch.__version__,
                  "python": platform.python_version(), "machine": platform.machine()},
        "sample_s": t_sample, "raw_decode_s": t_raw, "raw_forwards": forwards,
        "sampled_vs_raw": t_sample / t_raw,
        "sampled_eval_s": t_eval, "first_token_eval_s": t_first, "sampled_vs_first_token": t_eval / t_first,
        "teacher_s": t_teacher, "naive_generate_s": t_naive, "teacher_vs_naive": t_naive / t_teacher,
    }
    if args.sweep:
        result["agreement"] = spearman_from_sweep(args.sweep, args.cache)
    atomic_write_json(args.out, result)
    print(f"sampling {t_sample:.2f} s vs raw decode {t_raw:.2f} s: {t_sample / t_raw:.2f}x (goal <= 1.5)")
    print(f"sampled eval {t_eval:.2f} s vs first-token eval {t_first:.3f} s: {t_eval / t_first:.0f}x (goal >= 100)")
    print(f"teacher {t_teacher:.2f} s vs naive generate {t_naive:.2f} s: {t_naive / t_teacher:.1f}x (goal >= 3)")
    if "agreement" in result:
        print(f"first-token vs sampled rate over {result['agreement']['students']} students: Spearman "
              f"{result['agreement']['spearman']}")
    return result


if __name__ == "__main__":
    main()
