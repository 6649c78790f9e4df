"""The known answers behind the statistics design, measured by simulation (README, "Statistics: replication,
tests and nulls"). Seeded: the same command prints the same numbers. About 1-2 min on one core.

    python experiments/stats_simulations.py [n_sims]
"""

from __future__ import annotations

import math
import sys

import numpy as np

from mech.analysis.hypotheses import Units, difference_test, equivalence_test, trend_test, two_lines_test
from mech.analysis.stats import pooled_vs_nested_coverage

RANKS = (1, 2, 4, 8, 16, 32)


def rank_units(curve, rng, n_data=3, sd_data=0.1, sd_run=0.05) -> Units:
    """One planted sweep: 3 data seeds x 1 training seed; a data seed shifts every arm alike."""
    vals = [[c + off + rng.normal(0, sd_run) for c in curve] for off in rng.normal(0, sd_data, n_data)]
    return Units(vals, [[[v] for v in row] for row in vals], "teacher_seed", list(range(n_data)))


def main(n: int) -> None:
    print(f"== nested vs pooled 95 % intervals: coverage of the true mean ({n} simulations, seed 0)")
    for d, t, sb, sw in [(3, 3, 1.0, 1.0), (5, 4, 1.0, 1.0), (3, 3, 0.0, 1.0), (3, 1, 1.0, 1.0)]:
        c = pooled_vs_nested_coverage(d, t, sb, sw, n_sims=n, seed=0)
        print(f"{d} data seeds x {t} training seeds, between-data-seed sd {sb}, within sd {sw}: "
              f"nested {c['nested']:.3f}, pooled {c['pooled']:.3f}")
    x = [math.log2(r) for r in RANKS]
    curves = {"plateau": [0.0] * 6, "inverted U peaking at r8": [1 - 0.1 * (v - 3) ** 2 for v in x],
              "monotone": [0.1 * v for v in x]}
    print(f"== rank tests, ranks {RANKS}, 3 data seeds x 1 training seed, data-seed sd 0.1, run sd 0.05, alpha 0.05")
    for name, curve in curves.items():
        rng = np.random.default_rng(0)
        u = t = 0
        for _ in range(n):
            units = rank_units(curve, rng)
            u += two_lines_test(units, x, 0.05, n_boot=1)["p"] < 0.05
            t += trend_test(units, x)["p"] < 0.05
        print(f"{name}: two-lines U detected {u / n:.4f}, increasing trend detected {t / n:.4f}")
    print("== full FT vs LoRA: TOST (margin 0.05) and paired t, 3 data seeds, difference sd 0.02, alpha 0.05")
    for true in (0.05, 0.0):
        rng = np.random.default_rng(0)
        eq = dif = 0
        for _ in range(n):
            b = rng.normal(0, 0.1, 3)
            a = b + true + rng.normal(0, 0.02, 3)
            units = Units([[p, q] for p, q in zip(a, b)], [], "teacher_seed", [0, 1, 2])
            eq += equivalence_test(units, 0.05)["p"] < 0.05
            dif += difference_test(units)["p"] < 0.05
        print(f"true difference {true}: TOST equivalent {eq / n:.4f}, difference significant {dif / n:.4f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 4000)
