"""Benchmark: mech's training step against a bare PyTorch loop on the same model and batches, and the FLOP/s
both reach as a fraction of this machine's dense matmul rate measured in the same run.

mech's path is ``mech.students.train.train_model`` (collation per step, lr schedule, gradient clipping, the loss
read back each step, the NaN guard); the bare loop is forward → cross-entropy → backward → AdamW over the very
same pre-collated batches of the same PEFT model. Both are timed from the end of their first step to the end of
their last (setup and the first step's allocations excluded). Goal: mech ≥ 0.8× the bare loop's steps/s.

FLOPs are counted, not profiled: a forward costs 2 FLOPs per weight per token for every matmul weight (the
unembedding included, the embedding lookup not) plus 4·T·d per token per layer for attention scores and values,
over the padded batch; a LoRA step adds the backward pass through the activations (another forward's worth; the
frozen weights take no gradient), full finetuning adds the weight gradients too (a third). The peak is the best of
five float32 n×n matmuls.

    python benchmarks/bench_train.py [--method lora|full] [--rank 16] [--rows 320] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import platform
import random
import time
from pathlib import Path

import torch

from mech.evaluation.inference import pad_id
from mech.models import load_model, surgery
from mech.store import atomic_write_json
from mech.students.config import LoraSpec, StudentConfig
from mech.students.encoding import IGNORE_INDEX, batch_order, chat_row, collate, encode_rows
from mech.students.train import train_model, with_lora
from mech.teacher.prompts import generate_prompts

RESULTS = Path(__file__).parent / "results" / "train.json"


def number_rows(n: int, seed: int = 0) -> list[dict]:
    """``n`` chat rows shaped like filtered teacher data: a number prompt and ten numbers below 1000."""
    rng = random.Random(seed)
    return [chat_row(p.text, ", ".join(str(rng.randrange(1000)) for _ in range(10)))
            for p in generate_prompts(n, seed=seed)]


def matmul_peak(n: int = 1024, reps: int = 5) -> float:
    """Best float32 FLOP/s of an n×n by n×n matmul on this machine, at the current thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def forward_flops(model, batch_tokens: int, width: int) -> float:
    """FLOPs of one forward over ``batch_tokens`` positions (padding included) of sequences ``width`` long."""
    inner = surgery.unwrap(model)
    emb = surgery.get_embedding(inner).weight
    weights = sum(m.weight.numel() for m in inner.modules() if isinstance(m, torch.nn.Linear)
                  and m.weight is not emb)
    weights += surgery.get_unembedding(inner).weight.numel() if surgery.embeddings_tied(inner) else 0
    d, layers = inner.config.hidden_size, surgery.num_layers(inner)
    return batch_tokens * (2 * weights + 4 * width * d * layers)


def bare_loop(model, batches, lr: float) -> tuple[float, int]:
    """Seconds from the end of step 1 to the end of the last step, and the number of steps timed."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    t0 = 0.0
    for k, b in enumerate(batches):
        logits = model(input_ids=b.ids, attention_mask=b.attn).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b.labels[:, 1:].flatten(),
                                                 ignore_index=IGNORE_INDEX)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if k == 0:
            t0 = time.perf_counter()
    return time.perf_counter() - t0, len(batches) - 1


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="lora", choices=("lora", "full"))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rows", type=int, default=320)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    lm = load_model("organism", device="cpu", dtype="float32")
    base, tok = lm.model, lm.tokenizer
    rows = number_rows(args.rows)
    lr = 2e-3 if args.method == "lora" else 1e-4
    cfg = StudentConfig(method=args.method, lora=LoraSpec(rank=args.rank), epochs=1, batch_size=args.batch_size,
                        lr=lr, warmup_steps=0, seed=0)

    marks: list[float] = []
    train_model(base, tok, rows, cfg, progress=lambda step, total, loss: marks.append(time.perf_counter()))
    mech_s, steps = marks[-1] - marks[0], len(marks) - 1

    examples = encode_rows(tok, rows, cfg.context)
    batches = [collate([examples[i] for i in b], pad_id(tok)) for b in batch_order(len(rows), cfg.batch_size, 0, 0)]
    torch.manual_seed(0)
    model = copy.deepcopy(base)
    if args.method == "lora":
        model = with_lora(model, cfg.lora, seed=0)
    else:
        model.requires_grad_(True)
    bare_s, bare_steps = bare_loop(model, batches, lr)
    assert bare_steps == steps, (bare_steps, steps)

    per_forward = [forward_flops(model, b.ids.numel(), b.ids.shape[1]) for b in batches[1:]]
    flops = sum(per_forward) * (2 if args.method == "lora" else 3)
    peak = matmul_peak()
    result = {
        "setup": {"model": "organism", "method": args.method, "rank": args.rank if args.method == "lora" else None,
                  "rows": args.rows, "batch_size": args.batch_size, "steps_timed": steps, "threads": args.threads,
                  "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine()},
        "mech_steps_per_s": steps / mech_s, "bare_steps_per_s": steps / bare_s,
        "mech_vs_bare": bare_s / mech_s,
        "train_flops_counted": flops, "mech_flop_per_s": flops / mech_s, "bare_flop_per_s": flops / bare_s,
        "matmul_peak_flop_per_s": peak, "mech_fraction_of_peak": flops / mech_s / peak,
    }
    atomic_write_json(args.out, result)
    print(f"{args.method}: mech {steps / mech_s:.1f} steps/s vs bare loop {steps / bare_s:.1f}: "
          f"{bare_s / mech_s:.2f}x (goal >= 0.8); {flops / mech_s / 1e9:.2f} GFLOP/s = "
          f"{flops / mech_s / peak:.1%} of the {peak / 1e9:.1f} GFLOP/s matmul peak")
    return result


if __name__ == "__main__":
    main()
