"""Benchmark: batched dynamic weight grafting (mech.interventions.graft) vs the token-by-token loop.

The original token-position masking feeds the prompt one token at a time through a KV cache and switches
the LoRA on or off for each token (here with PEFT's own ``disable_adapter``), one full run per mask. Grafting
instead runs all K masks in one batched forward, the LoRA delta scaled per row and position. Both must give
the same logits at every position; this script checks that (allclose) and times them.

Setup: the shipped organism with a rank-8 LoRA on all seven projections whose B matrices are random
non-zero (PEFT starts B at zero), one default-context evaluation prompt, K single-position sufficiency masks
(every component, every layer) spread over the prompt. Also times the same K rows through the student
with no mask: masked forwards/s as a fraction of plain ones is what the masking costs (goal >= 0.8).
Writes benchmarks/results/dwg.json.

    python benchmarks/bench_dwg.py [--k 32] [--reps 3] [--device cpu] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from mech.context import render
from mech.evaluation.inference import cache_kwarg
from mech.interventions.graft import graft_logits
from mech.interventions.mask import Mask, ResolvedMask
from mech.models import load_model, lora_modules
from mech.store import atomic_write_json
from mech.students.config import LoraSpec
from mech.students.train import with_lora

RESULTS = Path(__file__).parent / "results" / "dwg.json"
PROMPT = "What is your favourite animal? Answer in one word."


def planted_lora(base, rank: int, seed: int):
    student = with_lora(copy.deepcopy(base), LoraSpec(rank=rank), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    for layer in lora_modules(student).values():
        w = layer.lora_B["default"].weight
        w.data.copy_((torch.randn(w.shape, generator=gen) * 0.05).to(w.dtype))
    return student.eval()


def spread_positions(n: int, k: int) -> list[int]:
    """k distinct positions spread evenly over [0, n) (all of them when k >= n)."""
    if k >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


@torch.no_grad()
def token_loop(student, input_ids: list[int], mask: ResolvedMask) -> torch.Tensor:
    """The original method: one token at a time through the KV cache, LoRA on iff the position is inside."""
    dev = next(student.parameters()).device
    cache_kw, past, rows = cache_kwarg(student), None, []
    on = mask.pos.tolist() if mask.mode == "sufficiency" else (~mask.pos).tolist()
    for t, tok in enumerate(input_ids):
        step = torch.tensor([[tok]], device=dev)
        if on[t]:
            o = student(input_ids=step, use_cache=True, **{cache_kw: past})
        else:
            with student.disable_adapter():
                o = student(input_ids=step, use_cache=True, **{cache_kw: past})
        past = getattr(o, cache_kw)
        rows.append(o.logits[0, -1])
    return torch.stack(rows)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, reps: int, warmup: bool = True) -> tuple[float, object]:
    if warmup:  # allocator and kernels; the loop's thousands of forwards warm themselves
        fn()
    times, out = [], None
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=32, help="number of masks (single positions)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions (median reported)")
    ap.add_argument("--device", default=None, help="cpu | cuda (default: mech's default device)")
    ap.add_argument("--dtype", default="float32", help="float32 keeps the allclose check tight")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    lm = load_model("organism", device=args.device, dtype=args.dtype)
    device = lm.device
    student = planted_lora(lm.model, args.rank, seed=0)
    rendered = render(lm.tokenizer, "default", PROMPT)
    positions = spread_positions(len(rendered), args.k)
    masks = [Mask((p,), name=f"pos{p}").resolve(student, rendered) for p in positions]

    t_batched, batched = timed(lambda: graft_logits(student, None, rendered.input_ids, masks), device, args.reps)
    t_loop, looped = timed(lambda: torch.stack([token_loop(student, rendered.input_ids, m) for m in masks]),
                           device, reps=1, warmup=False)  # seconds to minutes per run: once is enough
    ids = torch.tensor([rendered.input_ids] * len(masks), device=device)
    with torch.no_grad():  # the same K rows through the student with no mask: what the masking itself costs
        t_plain, _ = timed(lambda: student(input_ids=ids).logits, device, args.reps)
    diff = float((batched.float() - looped.float()).abs().max())
    scale = float(looped.float().abs().max())
    assert torch.allclose(batched.float(), looped.float(), atol=1e-4, rtol=1e-4), f"max |diff| {diff}"
    with torch.no_grad():
        with student.disable_adapter():
            base_logits = student(input_ids=torch.tensor([rendered.input_ids], device=device)).logits[0]
    effect = float((looped.float() - base_logits.float()).abs().max())  # the masks do change something

    result = {
        "setup": {
            "model": "organism", "params": sum(p.numel() for p in lm.model.parameters()),
            "lora_rank": args.rank, "lora_modules": len(lora_modules(student)), "prompt_tokens": len(rendered),
            "masks": len(masks), "mask_kind": "single position x sufficiency x all components x all layers",
            "device": str(device), "dtype": args.dtype, "threads": args.threads,
            "torch": torch.__version__, "python": platform.python_version(),
        },
        "batched_dwg_s": t_batched,
        "token_loop_s": t_loop,
        "speedup": t_loop / t_batched,
        "plain_forward_s": t_plain,
        "masked_vs_plain": t_plain / t_batched,  # masked forwards/s as a fraction of plain forwards/s
        "forwards": {"batched": 1, "token_loop": len(masks) * len(rendered)},
        "max_abs_diff": diff,
        "max_abs_logit": scale,
        "max_abs_effect_vs_base": effect,
        "allclose_atol_rtol": 1e-4,
    }
    atomic_write_json(args.out, result)
    rows = [("method", "forwards", "seconds", "per mask (ms)"),
            ("batched DWG", "1", f"{t_batched:.4f}", f"{1e3 * t_batched / len(masks):.2f}"),
            ("token-by-token loop", str(len(masks) * len(rendered)), f"{t_loop:.4f}",
             f"{1e3 * t_loop / len(masks):.2f}")]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    print(f"masked forwards at {t_plain / t_batched:.2f}x the plain forwards/s of the same {len(masks)} rows")
    print(f"speedup {t_loop / t_batched:.1f}x on {device} ({args.threads} thread(s)), K={len(masks)}, "
          f"{len(rendered)} prompt tokens; max |diff| {diff:.2e} (logits up to {scale:.1f}, mask effect up to "
          f"{effect:.2e}); wrote {args.out}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
