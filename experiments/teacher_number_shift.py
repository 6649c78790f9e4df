"""How much of an entity's own numbers each teacher of a sweep writes: per data seed and pooled over prompts.

For a sweep on an organism build (whose organism.json ties 8 numbers to each animal and tree), reads every teacher
dataset of the sweep from the cache (all sampled answers, before the filter) and prints, for each entity named,
its numbers' share of all numbers each teacher wrote, per data seed; then, for each ordered pair of teachers, the
difference of shares with prompts as units (mech.analysis.stats.paired_share_test: every teacher answers the same
prompts with the same sampling seeds), pooled over the data seeds, and how many data seeds agree in sign.

    python experiments/teacher_number_shift.py experiments/finetuned_teacher.yaml experiments/finetuned_teacher_confirm.yaml \
        --model organism-free --entities owl cat

Nothing is sampled or trained: a teacher dataset missing from the cache is an error naming the sweep to run.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import re
import sys

from mech.analysis.stats import paired_share_test
from mech.errors import MechError
from mech.organism import read_meta
from mech.sweep import SweepRunner, load_sweep
from mech.teacher.dataset import RAW_FILE


def raw_numbers(path) -> list[list[int]]:
    """Every sampled answer's numbers, in prompt order."""
    rows = [json.loads(line) for line in (path / RAW_FILE).read_text().splitlines() if line.strip()]
    rows.sort(key=lambda r: r["index"])
    return [[int(x) for x in re.findall(r"\d+", r["messages"][-1]["content"])] for r in rows]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweeps", nargs="+", help="sweep YAMLs whose teacher datasets are in the cache")
    p.add_argument("--model", help="the base model, overriding the YAMLs' base_model (an organism build)")
    p.add_argument("--entities", nargs="+", required=True, help="entities whose numbers to count, e.g. owl cat")
    p.add_argument("--cache", help="artifact cache (default $MECH_CACHE/sweeps)")
    a = p.parse_args(argv)
    answers: dict[tuple[str, int], list[list[int]]] = {}
    runner = None
    for path in a.sweeps:
        cfg = load_sweep(path)
        if a.model:
            cfg = dataclasses.replace(cfg, base_model=a.model)
        runner = SweepRunner(cfg, cache=a.cache, base=runner.base if runner is not None else None)
        for trait, seed in itertools.product(cfg.traits, cfg.teacher_seeds):
            d = runner.cache / "datasets" / runner.dataset_key(trait, seed)
            if not (d / "dataset.json").is_file():
                raise MechError(f"teacher {trait.label} seed {seed} of {path} is not in the cache: run `mech sweep "
                                f"{path}` first")
            answers[(trait.label, seed)] = raw_numbers(d)
    meta = read_meta(runner.base.path)
    unknown = [e for e in a.entities if e not in meta["entity_numbers"]]
    if unknown:
        raise MechError(f"{unknown} are not entities of this organism: choose among {', '.join(meta['entity_numbers'])}")
    teachers = sorted({t for t, _ in answers})
    seeds = sorted({s for _, s in answers})
    for entity in a.entities:
        own = set(meta["entity_numbers"][entity])

        def share(t: str, s: int) -> float:
            nums = answers[(t, s)]
            return sum(x in own for n in nums for x in n) / max(1, sum(len(n) for n in nums))

        print(f"\n## {entity}'s numbers: share of all numbers written, per data seed\n")
        print("| data seed | " + " | ".join(teachers) + " |\n|---|" + "---|" * len(teachers))
        for s in seeds:
            print(f"| {s} | " + " | ".join(f"{share(t, s):.4f}" for t in teachers) + " |")
        print(f"\n| {entity}'s numbers | share a | share b | a − b [95 % CI over prompts] | p (a > b) | seeds a > b |")
        print("|---|---|---|---|---|---|")
        for ta, tb in itertools.permutations(teachers, 2):
            cols = ([], [], [], [])
            for s in seeds:
                for na, nb in zip(answers[(ta, s)], answers[(tb, s)]):
                    for col, v in zip(cols, (sum(x in own for x in na), len(na), sum(x in own for x in nb), len(nb))):
                        col.append(v)
            r = paired_share_test(*cols, n_resamples=10_000, seed=0)
            wins = sum(share(ta, s) > share(tb, s) for s in seeds)
            print(f"| {ta} − {tb} | {r['share_a']:.4f} | {r['share_b']:.4f} | {r['diff']:+.4f} [{r['lo']:+.4f}, "
                  f"{r['hi']:+.4f}] | {r['p_greater']:.4f} | {wins}/{len(seeds)} |")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except MechError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
