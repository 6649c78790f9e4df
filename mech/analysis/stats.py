"""Confidence intervals over seeds: Student-t intervals of a mean, paired differences, a percentile bootstrap,
and a per-group summary of a results table.

scipy is not a dependency, so the t quantile is computed here: bisection on the Student-t CDF, which is a
regularised incomplete beta function evaluated by its continued fraction (Numerical Recipes, Lentz's method)
with ``math.lgamma``. Accurate to ~1e-10 for any degrees of freedom and level.

Conventions:
- ``sd`` is the sample standard deviation (ddof = 1); the interval is mean ± t(1 - α/2, n - 1) · sd / √n.
- With one value there is no spread to estimate: ``mean_ci`` returns ``lo = hi = sd = nan`` (not an error),
  so a one-seed cell still shows its mean in a table.
- No values, or a non-finite value, is a MechError: a failed cell must be dropped (or re-run) explicitly,
  never averaged in. :func:`summarise` drops NaN values per group itself (pandas' convention for missing
  values) and reports the count it used.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Sequence

from mech.errors import MechError

_EPS = 1e-15
_FPMIN = 1e-300
_MAX_ITER = 10_000


@dataclass(frozen=True)
class CI:
    """A point estimate with a two-sided interval at ``level``; ``n`` values went in, ``sd`` is their spread."""

    mean: float
    lo: float
    hi: float
    n: int
    sd: float
    level: float = 0.95

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------- t distribution


def _beta_cf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _FPMIN else _FPMIN)
    h = d
    for m in range(1, _MAX_ITER + 1):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > _FPMIN else _FPMIN)
            c = 1.0 + aa / c
            c = c if abs(c) > _FPMIN else _FPMIN
            h *= d * c
        if abs(d * c - 1.0) < _EPS:
            return h
    return h  # converged to float precision long before; unreachable for the (a, b) used here


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    # the continued fraction converges fast only on this side of the mean; use the symmetry otherwise
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_cf(a, b, x) / a
    return 1.0 - front * _beta_cf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise MechError(f"t distribution needs df > 0 (got {df}): a CI needs at least two values")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


def t_ppf(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on :func:`t_cdf`)."""
    if not 0.0 < p < 1.0:
        raise MechError(f"t quantile needs 0 < p < 1 (got {p}): pass a probability such as 0.975")
    if df <= 0:
        raise MechError(f"t distribution needs df > 0 (got {df}): a CI needs at least two values")
    if p < 0.5:
        return -t_ppf(1.0 - p, df)
    if p == 0.5:
        return 0.0
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


# --------------------------------------------------------------------------------------------- intervals


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise MechError(f"confidence level must lie strictly between 0 and 1 (got {level}): use e.g. 0.95")


def _finite_values(values: Iterable[float], what: str) -> list[float]:
    vals = [float(v) for v in values]
    if not vals:
        raise MechError(f"no {what} to summarise: pass at least one value (one per seed)")
    bad = [v for v in vals if not math.isfinite(v)]
    if bad:
        raise MechError(
            f"{len(bad)} non-finite {what} ({bad[0]}): drop or re-run the failed cells before computing a CI"
        )
    return vals


def _sd(vals: Sequence[float], mean: float) -> float:
    return math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))


def mean_ci(values: Iterable[float], level: float = 0.95) -> CI:
    """Mean of ``values`` with a two-sided Student-t interval at ``level``.

    One value gives ``CI(mean=v, lo=nan, hi=nan, n=1, sd=nan)``: no spread can be estimated from it.
    """
    _check_level(level)
    vals = _finite_values(values, "values")
    n = len(vals)
    mean = math.fsum(vals) / n
    if n == 1:
        return CI(mean, math.nan, math.nan, 1, math.nan, level)
    sd = _sd(vals, mean)
    half = t_ppf(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)
    return CI(mean, mean - half, mean + half, n, sd, level)


def paired_diff(treated: Sequence[float], control: Sequence[float], level: float = 0.95) -> CI:
    """Mean of ``treated[i] - control[i]`` over paired seeds, with a Student-t interval.

    Pairing removes the seed-to-seed variation the two arms share (same data seed, same sampling seed), so
    the interval is usually much tighter than one from the two arms' separate means.
    """
    t, c = list(treated), list(control)
    if len(t) != len(c):
        raise MechError(
            f"paired difference needs one control value per treated value (got {len(t)} treated, {len(c)} "
            "control): pair the runs by seed and drop seeds missing from either arm"
        )
    return mean_ci([a - b for a, b in zip(_finite_values(t, "treated values"), _finite_values(c, "control values"))],
                   level)


def bootstrap_ci(
    values: Iterable[float],
    level: float = 0.95,
    n_resamples: int = 10_000,
    seed: int = 0,
    statistic: Callable[[Any], Any] | None = None,
) -> CI:
    """Percentile bootstrap interval of ``statistic`` (default: the mean) over ``values``, seeded.

    ``statistic`` receives a 2-D numpy array [n_resamples, n] and must reduce along axis 1. ``sd`` is the
    sample sd of the values (as in :func:`mean_ci`); with one value, ``lo = hi = sd = nan``.
    """
    import numpy as np

    _check_level(level)
    if n_resamples < 1:
        raise MechError(f"bootstrap needs n_resamples >= 1 (got {n_resamples}): use e.g. 10000")
    vals = np.asarray(_finite_values(values, "values"), dtype=np.float64)
    stat = statistic or (lambda a: a.mean(axis=1))
    point = float(stat(vals[None, :])[0])
    n = len(vals)
    if n == 1:
        return CI(point, math.nan, math.nan, 1, math.nan, level)
    rng = np.random.default_rng(seed)
    draws = stat(vals[rng.integers(0, n, size=(n_resamples, n))])
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(draws, [alpha, 1.0 - alpha])
    return CI(point, float(lo), float(hi), n, float(vals.std(ddof=1)), level)


# --------------------------------------------------------------------------------------------- tables

SUMMARY_COLUMNS = ("mean", "lo", "hi", "n", "sd")


def summarise(df: Any, by: Sequence[str], value: str, level: float = 0.95) -> Any:
    """Per group of ``by``: mean, lo, hi, n, sd of column ``value`` (Student-t interval at ``level``).

    ``df`` is a pandas DataFrame with one row per cell × metric (e.g. columns rank, context, metric, seed,
    value). Groups keep missing keys (a full-finetune row with rank None is its own group) and appear in
    order of first appearance. NaN values are dropped per group; ``n`` counts the values used (a group with
    none left has n = 0 and NaN statistics).
    """
    import pandas as pd

    _check_level(level)
    by = list(by)
    missing = [c for c in [*by, value] if c not in df.columns]
    if missing:
        raise MechError(
            f"column(s) {', '.join(map(repr, missing))} not in the results table: available columns are "
            f"{', '.join(map(str, df.columns))}"
        )
    if by:
        groups = df.groupby(by, dropna=False, sort=False)[value]
    else:
        groups = [((), df[value])]
    rows = []
    for key, series in groups:
        key = key if isinstance(key, tuple) else (key,)
        try:
            vals = pd.to_numeric(series, errors="raise").dropna().tolist()
        except (TypeError, ValueError):
            raise MechError(
                f"column {value!r} holds non-numeric entries in group {key}: summarise a numeric metric column"
            ) from None
        if vals:
            ci = mean_ci(vals, level)
            stats = (ci.mean, ci.lo, ci.hi, ci.n, ci.sd)
        else:
            stats = (math.nan, math.nan, math.nan, 0, math.nan)
        rows.append(dict(zip(by, key)) | dict(zip(SUMMARY_COLUMNS, stats)))
    out = pd.DataFrame(rows, columns=[*by, *SUMMARY_COLUMNS])
    return out.astype({"n": "int64"})
