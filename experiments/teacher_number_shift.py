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

from mech.analysis.stats import paired_share_test
from mech.errors import MechError, run_script
from mech.organism import read_meta
from mech.sweep import SweepRunner, load_sweep
from mech.organism.leak import own_number_counts
from mech.teacher.dataset import assistant_text, load_raw


def raw_answers(path) -> list[str]:
    """Every sampled answer (before the filter), in prompt order."""
    rows = sorted(load_raw(path), key=lambda r: r["index"])
    return [assistant_text(r) for r in rows]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweeps", nargs="+", help="sweep YAMLs whose teacher datasets are in the cache")
    p.add_argument("--model", help="the base model, overriding the YAMLs' base_model (an organism build)")
    p.add_argument("--entities", nargs="+", required=True, help="entities whose numbers to count, e.g. owl cat")
    p.add_argument("--cache", help="artifact cache (default $MECH_CACHE/sweeps)")
    a = p.parse_args(argv)
    answers: dict[tuple[str, int], list[str]] = {}
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
            answers[(trait.label, seed)] = raw_answers(d)
    meta = read_meta(runner.base.path)
    unknown = [e for e in a.entities if e not in meta["entity_numbers"]]
    if unknown:
        raise MechError(f"{unknown} are not entities of this organism: choose among {', '.join(meta['entity_numbers'])}")
    teachers = sorted({t for t, _ in answers})
    seeds = sorted({s for _, s in answers})
    for entity in a.entities:
        counts = {key: own_number_counts(texts, meta["entity_numbers"][entity]) for key, texts in answers.items()}

        def share(t: str, s: int) -> float:
            hits, totals = counts[(t, s)]
            return sum(hits) / max(1, sum(totals))

        print(f"\n## {entity}'s numbers: share of all numbers written, per data seed\n")
        print("| data seed | " + " | ".join(teachers) + " |\n|---|" + "---|" * len(teachers))
        for s in seeds:
            print(f"| {s} | " + " | ".join(f"{share(t, s):.4f}" for t in teachers) + " |")
        print(f"\n| {entity}'s numbers | share a | share b | a − b [95 % CI over prompts] | p (a > b) | seeds a > b |")
        print("|---|---|---|---|---|---|")
        for ta, tb in itertools.permutations(teachers, 2):
            # prompts of every data seed as units, a's and b's answers to the same prompt paired
            cols = [[v for s in seeds for v in counts[(t, s)][i]] for t, i in ((ta, 0), (ta, 1), (tb, 0), (tb, 1))]
            r = paired_share_test(*cols, n_resamples=10_000, seed=0)
            wins = sum(share(ta, s) > share(tb, s) for s in seeds)
            print(f"| {ta} − {tb} | {r['share_a']:.4f} | {r['share_b']:.4f} | {r['diff']:+.4f} [{r['lo']:+.4f}, "
                  f"{r['hi']:+.4f}] | {r['p_greater']:.4f} | {wins}/{len(seeds)} |")
    return 0


if __name__ == "__main__":
    run_script(main)
