"""Per-stage rates of SmolLM2-135M on this CPU, for sizing experiments/smollm2_quick.yaml.

    python experiments/smollm2_rates.py DATASET_DIR   # a teacher dataset, e.g. from mech teacher --constrained

Prints the load time, seconds per training step (8 rows) of LoRA r4 / r16 and full finetuning, and the time of a
first-token evaluation over the 50 questions.
"""

from __future__ import annotations

import json
import sys
import time

from mech.evaluation.trait import TraitEvalConfig, evaluate_trait
from mech.models import load_model
from mech.students.config import LoraSpec, StudentConfig
from mech.students.train import train_model

STUDENTS = {"lora_r4": dict(method="lora", lora=LoraSpec(rank=4), lr=1e-3),
            "lora_r16": dict(method="lora", lora=LoraSpec(rank=16), lr=1e-3),
            "full": dict(method="full", lr=2e-5)}


def main(dataset: str) -> dict:
    from mech.teacher.dataset import load_dataset

    t0 = time.time()
    base = load_model("smollm2-135m", device="cpu", dtype="float32")
    out: dict = {"load_s": time.time() - t0}
    rows = (load_dataset(dataset).rows * 16)[:16]  # 2 steps of 8 rows
    for name, kw in STUDENTS.items():
        t0 = time.time()
        trained = train_model(base.model, base.tokenizer, rows,
                              StudentConfig(epochs=1, batch_size=8, warmup_steps=0, **kw))
        out[f"{name}_s_per_step"] = (time.time() - t0) / trained.n_steps
    t0 = time.time()
    evaluate_trait(base.model, base.tokenizer, TraitEvalConfig(target="owl", first_token_only=True))
    out["eval_first_token_s"] = time.time() - t0
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
