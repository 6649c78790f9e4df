"""Power of the sampled rate (the paper's metric): its standard error, and how many samples per arm a two-sided
two-proportion test needs to detect a given first-token effect (statsmodels: Cohen's h with NormalIndPower).

Samples are treated as independent; answers to the same question are correlated, so the counts are lower bounds.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

from mech.errors import MechError


def rate_se(p: float, n: int) -> float:
    """Binomial standard error of a rate ``p`` estimated from ``n`` independent samples."""
    if not 0.0 <= p <= 1.0 or n < 1:
        raise MechError(f"a rate's standard error needs 0 <= p <= 1 and n >= 1, got p={p}, n={n}")
    return math.sqrt(p * (1.0 - p) / n)


def samples_needed(p0: float, p1: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """Samples per arm for a two-sided test of rate ``p1`` vs ``p0`` at ``alpha`` with ``power`` (inf if equal)."""
    from statsmodels.stats.power import NormalIndPower
    from statsmodels.stats.proportion import proportion_effectsize

    for name, p in (("p0", p0), ("p1", p1)):
        if not 0.0 < p < 1.0:
            raise MechError(f"samples_needed needs rates strictly between 0 and 1, got {name}={p}")
    h = abs(float(proportion_effectsize(p1, p0)))
    if h == 0.0:
        return math.inf
    return float(NormalIndPower().solve_power(effect_size=h, alpha=alpha, power=power, ratio=1.0,
                                              alternative="two-sided"))


def power_rows(summary: Iterable[Mapping[str, Any]], samples_per_arm: int, alpha: float = 0.05,
               power: float = 0.8) -> list[dict[str, Any]]:
    """Per trait student (a sweep summary's rows): the neutral student's first-token P as p0, p0 + the paired
    first-token ΔP as p1, the sampled rate's SE at ``samples_per_arm``, and the samples per arm the sampled rate
    needs to detect that effect."""
    rows = list(summary)
    by = {(r["trait"], r["student"], r["train_context"], r["eval_context"], r["metric"]): r for r in rows}
    out = []
    for (trait, student, tc, ec, metric), r in by.items():
        if metric != "paired_p_first":
            continue
        base = by.get(("neutral", student, tc, ec, "p_first"))
        if base is None:
            continue
        p0, p1 = float(base["mean"]), float(base["mean"]) + float(r["mean"])
        need = samples_needed(p0, min(max(p1, 1e-12), 1 - 1e-12), alpha, power)
        out.append({"trait": trait, "student": student, "train_context": tc, "eval_context": ec, "p0": p0, "p1": p1,
                    "samples_per_arm": samples_per_arm, "rate_se": rate_se(p0, samples_per_arm),
                    "samples_needed": need, "enough": bool(samples_per_arm >= need)})
    return out
