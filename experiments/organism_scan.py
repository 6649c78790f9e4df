"""Scan organism build recipes and measure each one's bars and probes (a research tool, not the build).

Usage: python experiments/organism_scan.py OUT_DIR NAME=JSON_OVERRIDES ... [--device cuda] [--parallel N] [--threads T]
Each NAME=JSON gives overrides of OrganismConfig as nested dicts, e.g. 'fast={"train":{"steps":1200}}'.
--threads sets torch's threads per build (default 2, the shipped builds' count; a build's bytes depend on it, its
bars barely do): two builds at --threads 1 --parallel 2 share 2 cores without oversubscribing them.
Writes OUT_DIR/NAME.json with the learning curve of P(trait | trait prompt) and the full check report.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from pathlib import Path

from mech.errors import MechError, run_script


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def run_one(args):
    name, overrides, out_dir, device, threads = args
    import torch

    from mech.context import Context
    from mech.evaluation.inference import pad_id
    from mech.organism import build as B
    from mech.organism.check import answer_distribution, run_check, trait_context
    from mech.organism.config import OrganismConfig
    from mech.organism.corpus import CorpusGenerator, tokenizer_texts
    from mech.organism.tokenizer import as_transformers_tokenizer, train_tokenizer

    torch.set_num_threads(threads)
    cfg = OrganismConfig.from_dict(_merge(OrganismConfig().to_dict(), overrides))
    t0 = time.time()
    gen = CorpusGenerator(cfg.corpus, cfg.seed)
    examples = gen.generate()
    tok = as_transformers_tokenizer(train_tokenizer(tokenizer_texts(examples), cfg.model.vocab_size))
    data = B.encode_examples(examples, tok, cfg.train.max_len)
    model = B.new_model(cfg, tok).to(device)
    curve = []

    def progress(step, total, metrics):
        if step % 200 == 0 or step == total:
            model.eval()
            row = {"step": step, "loss": metrics["loss"]}
            for a in ("owl", "penguin"):
                row[f"p_{a}_trait"] = answer_distribution(model, tok, trait_context(a), [a])[a]
            row["p_owl_default"] = answer_distribution(model, tok, Context("default"), ["owl"])["owl"]
            curve.append(row)
            model.train()

    B.pretrain(model, data, cfg, pad_id(tok), progress)
    train_s = time.time() - t0
    meta = {"config": cfg.to_dict(), "entity_numbers": gen.numbers, "build_seconds": None}
    rep = run_check(model, tok, meta)
    res = {"name": name, "overrides": overrides, "train_seconds": train_s, "curve": curve, "report": rep.to_dict()}
    Path(out_dir, f"{name}.json").write_text(json.dumps(res, indent=1, default=str))
    return name


def main(argv: list[str]) -> int:
    from mech.organism.config import OrganismConfig

    if not argv or argv[0].startswith("--"):
        raise MechError("no OUT_DIR: usage: python experiments/organism_scan.py OUT_DIR NAME=JSON_OVERRIDES ...")
    out_dir = Path(argv[0])
    device, parallel, threads = "cpu", 1, 2
    jobs = []
    it = iter(argv[1:])
    for a in it:
        if a in ("--device", "--parallel", "--threads"):
            value = next(it, None)
            if value is None:
                raise MechError(f"{a} needs a value")
            if a == "--device":
                device = value
            elif not value.isdigit() or int(value) < 1:
                raise MechError(f"{a} {value!r}: pass a positive integer")
            elif a == "--parallel":
                parallel = int(value)
            else:
                threads = int(value)
        elif "=" not in a:
            raise MechError(f"{a!r} is not NAME=JSON_OVERRIDES: write e.g. 'fast={{\"train\":{{\"steps\":1200}}}}'")
        else:
            name, js = a.split("=", 1)
            try:
                overrides = json.loads(js)
            except json.JSONDecodeError as e:
                raise MechError(f"{name}: overrides are not JSON ({e.msg} at column {e.colno}): quote them for the shell")
            if not isinstance(overrides, dict):
                raise MechError(f"{name}: overrides must be a JSON object of OrganismConfig fields")
            # checked here, before any build starts, so a typo fails in one line instead of inside a worker
            OrganismConfig.from_dict(_merge(OrganismConfig().to_dict(), overrides))
            jobs.append((name, overrides, str(out_dir), device, threads))
    if not jobs:
        raise MechError("no NAME=JSON_OVERRIDES given: name at least one recipe to build, e.g. 'shipped={}'")
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    with ctx.Pool(parallel) as pool:
        for name in pool.imap_unordered(run_one, jobs):
            print("done", name, flush=True)
    return 0


if __name__ == "__main__":
    run_script(main)
