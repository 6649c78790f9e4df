"""Run every benchmark in ``benchmarks/`` one after another and print one table of ratios against their goals.

Each ratio is measured side by side within its own benchmark (numerator and denominator in the same process,
same thread count), so the table compares like with like even on a shared machine; run it alone all the same (two
torch processes on two cores slow each other ~10×). Writes benchmarks/results/table.md (and each benchmark's
JSON next to it).

    python benchmarks/run_all.py [--threads 1] [--sweep experiments/quick.yaml --cache DIR] [--skip atp,dwg]
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

HERE = Path(__file__).parent
TABLE = HERE / "results" / "table.md"


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(what: str, value: float | None, goal: str, met: Callable[[float], bool] | None, fmt: str = "{:.2f}×",
         command: str = "") -> dict[str, Any]:
    shown = "—" if value is None else fmt.format(value)
    verdict = "" if met is None or value is None else ("met" if met(value) else "NOT met")
    return {"ratio": what, "measured": shown, "goal": goal, "verdict": verdict, "command": command}


def sampling_rows(threads: int, sweep: str | None, cache: str | None) -> list[dict]:
    argv = ["--threads", str(threads)] + (["--sweep", sweep] if sweep else []) + (["--cache", cache] if cache else [])
    r = _bench("bench_sampling").main(argv)
    cmd = "bench_sampling.py"
    rows = [
        _row("sampled evaluation vs its raw decode limit (time ratio)", r["sampled_vs_raw"], "≤ 1.5×",
             lambda v: v <= 1.5, command=cmd),
        _row("first-token vs sampled evaluation (cost ratio)", r["sampled_vs_first_token"], "≥ 100×",
             lambda v: v >= 100, "{:.0f}×", cmd),
        _row("teacher generation vs naive per-prompt generate", r["teacher_vs_naive"], "≥ 3×", lambda v: v >= 3,
             command=cmd),
    ]
    if "agreement" in r:
        a = r["agreement"]
        rows.append(_row(f"first-token vs sampled rate, Spearman over {a['students']} students of {a['sweep']}",
                         a["spearman"], "≥ 0.9", lambda v: v >= 0.9, "{:.3f}", cmd))
    return rows


def train_rows(threads: int) -> list[dict]:
    r = _bench("bench_train").main(["--threads", str(threads)])
    return [
        _row("mech LoRA training step vs a bare PyTorch loop (steps/s)", r["mech_vs_bare"], "≥ 0.8×",
             lambda v: v >= 0.8, command="bench_train.py"),
        _row("mech LoRA training FLOP/s as a share of the measured matmul peak", r["mech_fraction_of_peak"],
             "(reported)", None, "{:.0%}", "bench_train.py"),
    ]


def batched_rows(threads: int) -> list[dict]:
    if not (HERE / "bench_batched.py").is_file():
        return []
    r = _bench("bench_batched").main(["--threads", str(threads)])
    return [_row("batched vs sequential LoRA students (throughput)", r["speedup"], "≥ 3×", lambda v: v >= 3,
                 command="bench_batched.py")]


def dwg_rows(threads: int) -> list[dict]:
    r = _bench("bench_dwg").main(["--threads", str(threads)])
    return [
        _row("masked (grafted) forwards vs plain forwards of the same rows (forwards/s)", r["masked_vs_plain"],
             "≥ 0.8×", lambda v: v >= 0.8, command="bench_dwg.py"),
        _row("batched DWG vs the token-by-token loop", r["speedup"], "(reported)", None, "{:.0f}×", "bench_dwg.py"),
    ]


def atp_rows(threads: int) -> list[dict]:
    r = _bench("bench_atp").main(["--threads", str(threads)])
    # AtP* where mech computes it (q, k: the QK fix), AtP elsewhere: the estimate a user gets per site
    best = {s: v.get("spearman_atp_star", v["spearman_atp"]) for s, v in r["per_site"].items()}
    worst = min(best, key=best.get)
    return [
        _row(f"AtP* vs exact patching, Spearman on the worst site ({worst}; all: "
             + ", ".join(f"{s} {v:.2f}" for s, v in sorted(best.items())) + ")", best[worst], "≥ 0.9",
             lambda v: v >= 0.9, "{:.3f}", "bench_atp.py"),
        _row("  where the rank errors lie: cells whose exact effect is below AtP*'s largest error, worst site ("
             + ", ".join(f"{s} {v['below_floor']:.0%}" for s, v in sorted(r["per_site"].items())) + ")",
             max(v["below_floor"] for v in r["per_site"].values()), "(reported)", None, "{:.0%}", "bench_atp.py"),
        _row("  AtP* vs exact, Spearman over cells ≥ 10 % of the largest effect, worst site ("
             + ", ".join(f"{s} {v['spearman_large']:.2f}/{v['n_large']}" for s, v in sorted(r["per_site"].items()))
             + " cells)", min(v["spearman_large"] for v in r["per_site"].values()), "(reported)", None, "{:.3f}",
             "bench_atp.py"),
        _row("  AtP* top-10 cells that are exact patching's top 10, worst site ("
             + ", ".join(f"{s} {v['recall_at_k']:.0%}" for s, v in sorted(r["per_site"].items())) + ")",
             min(v["recall_at_k"] for v in r["per_site"].values()), "(reported)", None, "{:.0%}", "bench_atp.py"),
        _row("AtP* vs exact patching on every site (speed)", r["speedup"]["all_sites_atp_star"], "≥ 20×",
             lambda v: v >= 20, "{:.0f}×", "bench_atp.py"),
    ]


STEPS = {"sampling": sampling_rows, "train": train_rows, "batched": batched_rows, "dwg": dwg_rows, "atp": atp_rows}


def markdown(rows: list[dict], threads: int, seconds: float) -> str:
    lines = [f"Measured {time.strftime('%Y-%m-%d')} on {platform.machine()}, {torch.get_num_threads()} torch "
             f"thread(s) (`--threads {threads}`), torch {torch.__version__}, in {seconds / 60:.1f} min.", "",
             "| ratio | measured | goal | verdict | benchmark |", "|---|---|---|---|---|"]
    lines += [f"| {r['ratio']} | {r['measured']} | {r['goal']} | {r['verdict']} | `{r['command']}` |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sweep", default=None, help="a sweep YAML whose cached students rank the two metrics")
    ap.add_argument("--cache", default=None, help="that sweep's cache (default: mech's)")
    ap.add_argument("--skip", default="", help="comma-separated steps to skip: " + ", ".join(STEPS))
    ap.add_argument("--out", type=Path, default=TABLE)
    args = ap.parse_args(argv)
    skip = {s for s in args.skip.split(",") if s}
    unknown = skip - set(STEPS)
    if unknown:
        sys.exit(f"error: unknown benchmark(s) {', '.join(sorted(unknown))}: choose from {', '.join(STEPS)}")
    t0 = time.perf_counter()
    rows: list[dict] = []
    for name, step in STEPS.items():
        if name in skip:
            continue
        print(f"== {name}", flush=True)
        rows += step(args.threads, args.sweep, args.cache) if name == "sampling" else step(args.threads)
    text = markdown(rows, args.threads, time.perf_counter() - t0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
