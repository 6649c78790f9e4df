"""Oracle specificity of organism builds: does a student that learns only trait X's numbers move toward X more than
toward any other candidate of X's category? (mech.organism.check.oracle_probe over every trait of each build.)

Usage: python experiments/oracle_specificity.py BUILD [BUILD ...] [--seeds 0 1] [--rows 300] [--share 0.3]
                                                [--json OUT.json]
BUILD is a model spec (organism, organism-free) or an organism build directory. Per build: one default-context
sample of ``--rows`` number answers (the check's oracle seed), one control student and one oracle student per trait
and training seed (LoRA r16, 1 epoch, lr 2e-3: the quick sweep's student); prints how many traits lead their own
category and which do not. This is how the recipe scan in the README (The organisms) was measured.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from mech.errors import MechError, run_script
from mech.organism.check import ORACLE_SHARE, oracle_of_build
from mech.store import atomic_write_json


def main(argv: list[str]) -> int:
    from mech.models import load_model
    from mech.organism import read_meta

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("builds", nargs="+")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--rows", type=int, default=300)
    ap.add_argument("--share", type=float, default=ORACLE_SHARE)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    if a.rows < 16 or not 0 < a.share <= 1 or a.threads < 1 or not a.seeds:
        raise MechError(f"--rows {a.rows}, --share {a.share}, --threads {a.threads}, --seeds {a.seeds}: the probe needs "
                        ">= 16 rows, a share in (0, 1], >= 1 thread and at least one seed")
    if a.json and not Path(a.json).resolve().parent.is_dir():
        raise MechError(f"--json {a.json}: its folder does not exist; create it or write elsewhere")
    # every build is loaded and checked before the first probe, so a bad path fails now, not an hour in
    loaded = {}
    for spec in a.builds:
        lm = load_model(spec, device="cpu", dtype="float32")
        loaded[spec] = (lm, read_meta(lm.path))
    torch.set_num_threads(a.threads)  # only once nothing can be refused: a refusal leaves the process as it was
    out = {}
    for spec, (lm, meta) in loaded.items():
        t0 = time.time()
        res = oracle_of_build(lm.model, lm.tokenizer, meta, a.rows, train_seeds=tuple(a.seeds), share=a.share)
        res["config_hash"], res["weights_sha256"] = meta.get("config_hash"), meta.get("weights_sha256")
        out[spec] = res
        rows = res.get("rows", [])
        fails = [f"{r['trait']} ({r['own']:+.2f} < {r['max_other_entity']} {r['max_other']:+.2f})"
                 for r in rows if not r["specific"]]
        print(f"{spec} [{res['config_hash']}]: {len(rows) - len(fails)}/{len(rows)} traits lead their category "
              f"({time.time() - t0:.0f} s); not: {', '.join(fails) or 'none'}", flush=True)
    if a.json:
        atomic_write_json(a.json, out)
    return 0


if __name__ == "__main__":
    run_script(main)
