"""Benchmark: update spectra of many students, the fast path vs the naive one, in the same run.

Fast path (mech.geometry.update): a LoRA module's SVD through its r × r core (``linalg.low_rank_svd``), full-FT
updates SVD'd in batches of stacked same-shape matrices (``linalg.svd_stack``). Naive baseline: form every ΔW
and call ``torch.linalg.svd`` on it alone. Both must give the same singular values (checked, max |Δσ|).

Setup: the shipped organism and planted students standing in for the quick sweep's 30 (5 student kinds × 3 seeds
× 2 teachers): LoRA r ∈ {1, 4, 16, 64} on all seven projections with random non-zero B, and a full-FT student
(the base plus Gaussian noise on every matrix, embeddings included). Writes benchmarks/results/geometry.json.

    python benchmarks/bench_geometry.py [--copies 6] [--reps 3] [--threads 1]
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

from mech.geometry import linalg
from mech.geometry import update as upd
from mech.models import load_model, surgery
from mech.store import atomic_write_json
from mech.students.config import LoraSpec
from mech.students.train import with_lora

RESULTS = Path(__file__).parent / "results" / "geometry.json"


def planted_students(base, copies: int) -> list:
    students = []
    for c in range(copies):
        for r in (1, 4, 16, 64):
            s = with_lora(copy.deepcopy(base), LoraSpec(rank=r), seed=c)
            g = torch.Generator().manual_seed(100 * c + r)
            with torch.no_grad():
                for layer in surgery.lora_modules(s).values():
                    for _, B, _ in [(None, layer.lora_B[n].weight, None) for n in layer.lora_B.keys()]:
                        B.copy_(torch.randn(B.shape, generator=g) * 0.01)
            students.append(s.eval())
        full = copy.deepcopy(base)
        g = torch.Generator().manual_seed(c)
        with torch.no_grad():
            for p in full.parameters():
                if p.ndim == 2:
                    p.add_(torch.randn(p.shape, generator=g) * 1e-3)
        students.append(full.eval())
    return students


@torch.no_grad()
def naive(base, student) -> list[torch.Tensor]:
    out = []
    lora = surgery.lora_modules(student)
    if lora:
        for layer in lora.values():
            out.append(torch.linalg.svdvals(layer.get_delta_weight("default").float()))
        return out
    for _, _, s, b in surgery.paired_projections(student, base, ""):
        out.append(torch.linalg.svdvals(surgery.projection_weight(s).float() - surgery.projection_weight(b).float()))
    emb_s, emb_b = surgery.get_embedding(student).weight, surgery.get_embedding(base).weight
    out.append(torch.linalg.svdvals(emb_s.float() - emb_b.float()))
    return out


def fast(base, student) -> list[torch.Tensor]:
    return [u.spectrum.S for u in upd.student_updates(base, student).values()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--copies", type=int, default=6, help="copies of the 5 student kinds (6 → 30 students)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    base = load_model("organism").model
    students = planted_students(base, a.copies)
    times: dict[str, list[float]] = {"fast": [], "naive": []}
    for _ in range(a.reps):
        for name, fn in (("fast", fast), ("naive", naive)):
            t = time.perf_counter()
            res = {name: [fn(base, s) for s in students]}
            times[name].append(time.perf_counter() - t)
            if name == "fast":
                fast_res = res["fast"]
            else:
                naive_res = res["naive"]
    diff = 0.0
    for f, n in zip(fast_res, naive_res):
        for sf, sn in zip(f, n):
            k = sf.numel()
            diff = max(diff, float((sf - sn[:k]).abs().max()))
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"students": len(students), "fast_s": med["fast"], "naive_s": med["naive"],
              "speedup": med["naive"] / med["fast"], "max_abs_sigma_diff": diff, "threads": a.threads,
              "python": sys.version.split()[0], "torch": torch.__version__, "machine": platform.machine()}
    atomic_write_json(RESULTS, result)
    print(result)


if __name__ == "__main__":
    main()
