"""Benchmark: the quick sweep's LoRA students trained batched (mech.students.batched) vs one at a time.

The students are experiments/quick.yaml's four LoRA students (ranks 1, 4, 16, 64, alpha = rank, lr 0.002, batch
16, 1 epoch, training seed 0, default context) on one dataset, as the sweep batches them. Rows are bench_train's
(the teacher's number prompts answered with ten seeded numbers), or those of a cached teacher dataset
(--dataset). Both runs are timed end to end (copying the base, LoRA init, every step, the students back as PEFT
models), in one process, one after the other. The students must come out the same: the max |difference| of every
loss and LoRA weight is reported (0 when bitwise). Writes benchmarks/results/batched.json.

    python benchmarks/bench_batched.py [--rows 320] [--threads 1] [--dataset <dataset dir>]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from mech.models import load_model, lora_modules
from mech.store import atomic_write_json
from mech.students.batched import Job, train_models
from mech.students.train import train_model
from mech.sweep import load_sweep
from mech.sweep.config import student_config

from bench_train import number_rows  # a sibling script: benchmarks/ is on sys.path whenever one of them runs

RESULTS = Path(__file__).parent / "results" / "batched.json"
QUICK = Path(__file__).parents[1] / "experiments" / "quick.yaml"


def adapters(model) -> list[torch.Tensor]:
    return [w.detach() for layer in lora_modules(model).values()
            for w in (layer.lora_A["default"].weight, layer.lora_B["default"].weight)]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=320, help="rows per student (the quick sweep's datasets hold ~950)")
    ap.add_argument("--dataset", type=Path, default=None, help="a teacher dataset dir to take the rows from")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.dataset is not None:
        from mech.teacher.dataset import load_dataset

        rows = load_dataset(args.dataset).rows[: args.rows]
    else:
        rows = number_rows(args.rows)
    sweep = load_sweep(QUICK)
    cfgs = [student_config(sweep, s, 0, sweep.train_contexts[0]) for s in sweep.students if s.method == "lora"]
    lm = load_model(sweep.base_model, device="cpu", dtype="float32")
    jobs = [Job(rows, c) for c in cfgs]

    t0 = time.perf_counter()
    alone = [train_model(lm.model, lm.tokenizer, j.rows, j.cfg) for j in jobs]
    t_alone = time.perf_counter() - t0
    t0 = time.perf_counter()
    batched = train_models(lm.model, lm.tokenizer, jobs)
    t_batched = time.perf_counter() - t0

    steps = sum(t.n_steps for t in alone)
    weight_diff = max(float((x - y).abs().max()) for a, b in zip(alone, batched)
                      for x, y in zip(adapters(a.model), adapters(b.model)))
    loss_diff = max(abs(x - y) for a, b in zip(alone, batched) for x, y in zip(a.losses, b.losses))
    bitwise = all(a.losses == b.losses and all(torch.equal(x, y) for x, y in zip(adapters(a.model), adapters(b.model)))
                  for a, b in zip(alone, batched))
    result = {
        "setup": {
            "model": sweep.base_model, "students": [f"lora r{c.lora.rank} alpha {c.lora.lora_alpha:g}" for c in cfgs],
            "lr": cfgs[0].lr, "batch_size": cfgs[0].batch_size, "epochs": cfgs[0].epochs,
            "rows_per_student": len(rows), "rows": str(args.dataset) if args.dataset else "synthetic teacher-style",
            "steps_per_student": alone[0].n_steps, "threads": args.threads, "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "sequential_s": t_alone,
        "batched_s": t_batched,
        "sequential_steps_per_s": steps / t_alone,
        "batched_steps_per_s": steps / t_batched,
        "speedup": t_alone / t_batched,
        "max_abs_weight_diff": weight_diff,
        "max_abs_loss_diff": loss_diff,
        "bitwise_equal": bitwise,
    }
    atomic_write_json(args.out, result)
    print(f"{len(jobs)} students x {alone[0].n_steps} steps: sequential {t_alone:.1f} s ({steps / t_alone:.2f} "
          f"student-steps/s), batched {t_batched:.1f} s ({steps / t_batched:.2f}); speedup {t_alone / t_batched:.2f}x "
          f"({args.threads} thread(s)); max |diff| weights {weight_diff:.1e}, losses {loss_diff:.1e} (bitwise: "
          f"{bitwise}); wrote {args.out}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
