"""AtP / AtP* vs exact activation patching on the shipped organism and a random LoRA student.

The student is the organism with LoRA (``mech.students.train.with_lora``) on every projection whose B matrices are
set to small random values, so it differs from the base everywhere LoRA reaches. On one evaluation prompt
(the first animal question, default context) and the trait metric (first-token log P of "owl"), this times

* the exact patching sweep (denoising: base run, student activations) over all layers × positions of the
  sites resid, attn, mlp, q, k, v (nnsight, all positions of a (site, layer) in one batch);
* AtP over the same cells (one student forward, one base forward + backward), and AtP* (QK fix on q, k);

and reports, per site, Spearman's rank correlation of the estimate with the exact effect (signed, and of
magnitudes), plus the speed ratio. Writes benchmarks/results/atp.json.

    python benchmarks/bench_atp.py [--lora-std 0.1] [--rank 8] [--seed 0] [--device cpu] [--dtype float32]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

from mech.context import render
from mech.resources import questions
from mech.evaluation.scoring import first_token_ids
from mech.interventions.attribution import atp, atp_star, spearman
from mech.interventions.patching import first_token_metric, patching_sweep
from mech.models import load_model, surgery
from mech.store import atomic_write_json
from mech.students.config import LoraSpec
from mech.students.train import with_lora

SITES = ("resid", "attn", "mlp", "q", "k", "v")
RESULTS = Path(__file__).parent / "results" / "atp.json"


def lora_student(base, rank: int, std: float, seed: int):
    """The base under LoRA on all projections, every lora_B drawn from N(0, std²) (a copy; base untouched)."""
    student = with_lora(copy.deepcopy(base), LoraSpec(rank=rank), seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module in surgery.lora_modules(student).values():
            for lin in module.lora_B.values():
                w = torch.randn(lin.weight.shape, generator=gen) * std
                lin.weight.copy_(w.to(lin.weight.device, lin.weight.dtype))
    return student.eval()


def error_profile(estimate: torch.Tensor, effect: torch.Tensor, k: int = 10, share: float = 0.1) -> dict:
    """Where an estimate's rank errors lie (the estimate a user gets: AtP*, or AtP where no fix applies).

    ``error_floor``: the largest absolute error as a share of the largest effect; ``below_floor``: the share of
    cells whose exact effect is smaller than that largest error, among which ranks are noise; Spearman over the
    cells carrying at least ``share`` of the largest effect (``spearman_large``, ``n_large`` of them); and
    ``recall_at_k``: how many of the k largest exact effects (in magnitude) are among the estimate's k largest."""
    e, x = effect.flatten(), estimate.flatten()
    top = float(e.abs().max())
    err = float((x - e).abs().max())
    large = e.abs() >= share * top
    k = min(k, e.numel())
    hits = set(e.abs().topk(k).indices.tolist()) & set(x.abs().topk(k).indices.tolist())
    return {"error_floor": err / top, "below_floor": float((e.abs() < err).float().mean()),
            "spearman_large": spearman(x[large], e[large]) if int(large.sum()) > 2 else float("nan"),
            "n_large": int(large.sum()), "recall_at_k": len(hits) / k, "k": k}


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lora-std", type=float, default=0.1)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    loaded = load_model("organism", device=args.device, dtype=args.dtype)
    base, tok = loaded.model, loaded.tokenizer
    student = lora_student(base, args.rank, args.lora_std, args.seed)
    rendered = render(tok, "default", questions("animal")[0])
    metric = first_token_metric(first_token_ids(tok, "owl").ids)

    # warm-up (nnsight instrumentation, kernels) so the timings compare steady states
    patching_sweep(base, student, rendered, metric, sites="resid", layers=0, positions=[0], include_all=False)
    atp(base, student, rendered, metric, sites="resid", layers=0)

    exact, t_exact = timed(lambda: patching_sweep(base, student, rendered, metric, sites=SITES, include_all=False))
    exact_resid, t_exact_resid = timed(
        lambda: patching_sweep(base, student, rendered, metric, sites="resid", include_all=False))
    est, t_atp = timed(lambda: atp(base, student, rendered, metric, sites=SITES))
    est_resid, t_atp_resid = timed(lambda: atp(base, student, rendered, metric, sites="resid"))
    star, t_star = timed(lambda: atp_star(base, student, rendered, metric, sites=SITES))

    per_site = {}
    for site in SITES:
        effect = exact[site].change
        estimate = (star if site in ("q", "k") else est)[site].change
        row = {
            **error_profile(estimate, effect),
            "spearman_atp": spearman(est[site].change, effect),
            "spearman_atp_abs": spearman(est[site].change.abs(), effect.abs()),
            "max_abs_effect": float(effect.abs().max()),
            "max_abs_error_atp": float((est[site].change - effect).abs().max()),
        }
        if site in ("q", "k"):
            row.update({
                "spearman_atp_star": spearman(star[site].change, effect),
                "spearman_atp_star_abs": spearman(star[site].change.abs(), effect.abs()),
                "max_abs_error_atp_star": float((star[site].change - effect).abs().max()),
            })
        per_site[site] = row

    result = {
        "model": "organism",
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "threads": args.threads,
        "student": {"kind": "lora", "rank": args.rank, "targets": "all", "lora_B_std": args.lora_std,
                    "seed": args.seed},
        "prompt": {"context": "default", "question": questions("animal")[0], "n_tokens": len(rendered)},
        "metric": {"clean_base": exact["resid"].base, "student": exact["resid"].student,
                   "effect": exact["resid"].effect},
        "n_layers": surgery.num_layers(base),
        "cells_per_site": int(exact["resid"].values.numel()),
        "per_site": per_site,
        "seconds": {"exact_all_sites": t_exact, "atp_all_sites": t_atp, "atp_star_all_sites": t_star,
                    "exact_resid": t_exact_resid, "atp_resid": t_atp_resid},
        "speedup": {"all_sites": t_exact / t_atp, "resid": t_exact_resid / t_atp_resid,
                    "all_sites_atp_star": t_exact / t_star},
        "versions": {"torch": torch.__version__},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    return result


if __name__ == "__main__":
    import json

    res = main(sys.argv[1:])
    print(json.dumps({k: res[k] for k in ("metric", "per_site", "seconds", "speedup")}, indent=1))
