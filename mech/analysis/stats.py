"""Confidence intervals over seeds: Student-t intervals of a mean, paired differences, a percentile bootstrap,
and grouped intervals of a results table (the one implementation every table in mech uses).

Quantiles and the bootstrap come from scipy.stats.

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
from typing import Any, Callable, Iterable, Mapping, Sequence

from mech.errors import MechError

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


def t_ppf(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom."""
    from scipy import stats

    if not 0.0 < p < 1.0:
        raise MechError(f"t quantile needs 0 < p < 1 (got {p})")
    if not df > 0:
        raise MechError(f"t quantile needs df > 0 (got {df}): a CI needs at least two values")
    return float(stats.t.ppf(p, df))


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
    """Percentile bootstrap interval (scipy.stats.bootstrap) of ``statistic`` (default: the mean), seeded.

    ``statistic`` receives a numpy array and an ``axis`` keyword and must reduce along that axis. ``sd`` is the
    sample sd of the values (as in :func:`mean_ci`); with one value, ``lo = hi = sd = nan``.
    """
    import numpy as np
    from scipy import stats

    _check_level(level)
    if n_resamples < 1:
        raise MechError(f"bootstrap needs n_resamples >= 1 (got {n_resamples}): use e.g. 10000")
    vals = np.asarray(_finite_values(values, "values"), dtype=np.float64)
    stat = statistic or (lambda a, axis=-1: np.mean(a, axis=axis))
    point = float(stat(vals, axis=-1))
    if len(vals) == 1:
        return CI(point, math.nan, math.nan, 1, math.nan, level)
    res = stats.bootstrap((vals,), stat, n_resamples=n_resamples, confidence_level=level, method="percentile",
                          vectorized=True, rng=np.random.default_rng(seed))
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if not (math.isfinite(lo) and math.isfinite(hi)):  # scipy gives nan for a degenerate (constant) sample
        lo = hi = point
    return CI(point, lo, hi, len(vals), float(vals.std(ddof=1)), level)


def two_sample_test(a: Sequence[float], b: Sequence[float], level: float = 0.95, seed: int = 0,
                    n_resamples: int = 10_000) -> dict[str, float]:
    """Independent samples (units that are not paired): the difference of means a − b with a Welch interval at
    ``level``, and a one-sided (a > b) permutation p over the pooled units (scipy.stats.permutation_test, seeded)."""
    import numpy as np
    from scipy import stats

    _check_level(level)
    x, y = (np.asarray(_finite_values(v, what), dtype=np.float64) for v, what in ((a, "a"), (b, "b")))
    if len(x) < 2 or len(y) < 2:
        raise MechError(f"a two-sample test needs at least 2 values per sample (got {len(x)} and {len(y)})")
    welch = stats.ttest_ind(x, y, equal_var=False)
    ci = welch.confidence_interval(confidence_level=level)
    perm = stats.permutation_test((x, y), lambda u, v, axis=-1: np.mean(u, axis=axis) - np.mean(v, axis=axis),
                                  permutation_type="independent", alternative="greater", vectorized=True,
                                  n_resamples=n_resamples, rng=np.random.default_rng(seed))
    return {"diff": float(x.mean() - y.mean()), "lo": float(ci.low), "hi": float(ci.high),
            "p_one_sided": float(perm.pvalue), "n_a": len(x), "n_b": len(y)}


def paired_share_test(hits_a: Sequence[int], total_a: Sequence[int], hits_b: Sequence[int], total_b: Sequence[int],
                      n_resamples: int = 10_000, seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """Is the share sum(hits_a) / sum(total_a) larger than the same share in condition b, for units observed
    under both (unit i: hits_a[i] of total_a[i] items under a, hits_b[i] of total_b[i] under b)?

    The items of one unit are not independent (the numbers of one answer), so both the interval and the test
    resample units, never items: a percentile bootstrap over units for the difference of the two shares, and a
    one-sided paired permutation test that swaps a unit's a and b observations with probability 1/2 (exact
    under the null that a unit's two observations are exchangeable). p = (1 + #{permuted >= observed}) /
    (1 + n_resamples), so it is never 0."""
    import numpy as np

    _check_level(level)
    arrays = [np.asarray(x, dtype=np.float64) for x in (hits_a, total_a, hits_b, total_b)]
    n = len(arrays[0])
    if n < 2 or any(len(x) != n for x in arrays):
        raise MechError(f"paired share test needs >= 2 units, each with hits and totals under both conditions "
                        f"(got lengths {[len(x) for x in arrays]}): pass one entry per unit in every list")
    ha, ta, hb, tb = arrays
    if (ha < 0).any() or (hb < 0).any() or (ha > ta).any() or (hb > tb).any():
        raise MechError("paired share test: every unit needs 0 <= hits <= total: count hits among that unit's items")
    if ta.sum() == 0 or tb.sum() == 0:
        raise MechError("paired share test: a condition has no items at all (every total is 0): nothing to compare")
    if n_resamples < 1:
        raise MechError(f"paired share test needs n_resamples >= 1 (got {n_resamples}): use e.g. 10000")
    rng = np.random.default_rng(seed)

    def diff(ha_, ta_, hb_, tb_):  # along the last axis; an empty total gives share 0, not nan
        return ha_.sum(-1) / np.maximum(ta_.sum(-1), 1) - hb_.sum(-1) / np.maximum(tb_.sum(-1), 1)

    observed = float(diff(ha, ta, hb, tb))
    idx = rng.integers(0, n, (n_resamples, n))
    boot = diff(ha[idx], ta[idx], hb[idx], tb[idx])
    swap = rng.integers(0, 2, (n_resamples, n)).astype(bool)
    perm = diff(np.where(swap, hb, ha), np.where(swap, tb, ta), np.where(swap, ha, hb), np.where(swap, ta, tb))
    alpha = 1.0 - level
    lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    p_greater = (1 + (perm >= observed - 1e-15).sum()) / (1 + n_resamples)
    return {"share_a": float(ha.sum() / ta.sum()), "share_b": float(hb.sum() / tb.sum()), "diff": observed,
            "lo": float(lo), "hi": float(hi), "p_greater": float(p_greater),
            "n_units": n, "items_a": int(ta.sum()), "items_b": int(tb.sum()), "level": level}


# --------------------------------------------------------------------------------------------- tables

SUMMARY_COLUMNS = ("mean", "lo", "hi", "n", "sd")


def grouped_ci(rows: Iterable[Mapping[str, Any]], keys: Sequence[str], value: str, level: float = 0.95,
               carry: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Per group of ``keys``: the group's keys, the first row's ``carry`` columns, and mean, lo, hi, n, sd of
    ``value`` (:func:`mean_ci`). Groups appear in order of first appearance; every value must be finite."""
    _check_level(level)
    groups: dict[tuple, list[float]] = {}
    first: dict[tuple, Mapping[str, Any]] = {}
    for r in rows:
        k = tuple(r[c] for c in keys)
        groups.setdefault(k, []).append(r[value])
        first.setdefault(k, r)
    out = []
    for k, vals in groups.items():
        ci = mean_ci(vals, level)
        out.append(dict(zip(keys, k)) | {c: first[k][c] for c in carry}
                   | dict(zip(SUMMARY_COLUMNS, (ci.mean, ci.lo, ci.hi, ci.n, ci.sd))))
    return out


def summarise(df: Any, by: Sequence[str], value: str, level: float = 0.95) -> Any:
    """:func:`grouped_ci` of a pandas DataFrame, NaN values dropped per group (pandas' convention for missing
    values; a group with none left has n = 0 and NaN statistics); returns a DataFrame."""
    import pandas as pd

    _check_level(level)
    by = list(by)
    missing = [c for c in [*by, value] if c not in df.columns]
    if missing:
        raise MechError(
            f"column(s) {', '.join(map(repr, missing))} not in the results table: available columns are "
            f"{', '.join(map(str, df.columns))}"
        )
    try:
        numeric = pd.to_numeric(df[value], errors="raise")
    except (TypeError, ValueError):
        raise MechError(f"column {value!r} holds non-numeric entries: summarise a numeric metric column") from None
    keys = df[by].itertuples(index=False, name=None) if by else [()] * len(df)
    rows = [dict(zip(by, (None if pd.isna(x) else x for x in key))) | {"_v": v} for key, v in zip(keys, numeric)]
    kept = [r for r in rows if not math.isnan(r["_v"])]
    out = grouped_ci(kept, by, "_v", level)
    seen = {tuple(r[c] for c in by) for r in kept}
    empty = [dict(zip(by, k)) | dict(zip(SUMMARY_COLUMNS, (math.nan, math.nan, math.nan, 0, math.nan)))
             for k in dict.fromkeys(tuple(r[c] for c in by) for r in rows) if k not in seen]
    order = list(dict.fromkeys(tuple(r[c] for c in by) for r in rows))
    by_key = {tuple(r[c] for c in by): r for r in out + empty}
    frame = pd.DataFrame([by_key[k] for k in order], columns=[*by, *SUMMARY_COLUMNS])
    return frame.astype({"n": "int64"})


def nested_ci(rows: Iterable[Mapping[str, Any]], keys: Sequence[str], value: str, outer: str = "teacher_seed",
              level: float = 0.95, carry: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Per group of ``keys``, the interval of a two-level design: runs nested in ``outer`` units (training seeds
    within a data seed) are averaged within their unit first, then :func:`grouped_ci` gives the interval over
    the unit means, so runs sharing a unit are never counted as independent (pseudo-replication).

    A group with one ``outer`` unit has no between-unit spread to estimate: its interval is over the runs of that
    unit, conditional on it (``ci_over`` says which). Extra columns: ``n_runs`` (runs in the group) and ``ci_over``
    (``outer``, or ``runs|<outer>=<value>``). Groups keep their order of first appearance.
    """
    _check_level(level)
    rows = list(rows)
    units: dict[tuple, dict[Any, list[float]]] = {}
    for r in rows:
        units.setdefault(tuple(r[c] for c in keys), {}).setdefault(r[outer], []).append(r[value])
    means = []
    first = {}
    for r in rows:
        first.setdefault(tuple(r[c] for c in keys), r)
    for k, by_unit in units.items():
        if len(by_unit) < 2:
            continue
        for u, vals in by_unit.items():
            vals = _finite_values(vals, "values")
            means.append(dict(zip(keys, k)) | {c: first[k][c] for c in carry} | {"_m": math.fsum(vals) / len(vals)})
    over_units = {tuple(r[c] for c in keys): r for r in grouped_ci(means, keys, "_m", level, carry)}
    single = [r for r in rows if len(units[tuple(r[c] for c in keys)]) < 2]
    over_runs = {tuple(r[c] for c in keys): r for r in grouped_ci(single, keys, value, level, carry)}
    out = []
    for k, by_unit in units.items():
        n_runs = sum(len(v) for v in by_unit.values())
        if len(by_unit) >= 2:
            out.append(over_units[k] | {"n_runs": n_runs, "ci_over": outer})
        else:
            out.append(over_runs[k] | {"n_runs": n_runs, "ci_over": f"runs|{outer}={next(iter(by_unit))}"})
    return out


def pooled_vs_nested_coverage(n_outer: int, n_inner: int, sd_outer: float, sd_inner: float, n_sims: int,
                              seed: int, level: float = 0.95) -> dict[str, float]:
    """Coverage of the true mean (0) by the nested interval (:func:`nested_ci`) and by the pooled one (every run
    as an independent value, :func:`grouped_ci`) on simulated two-level data: unit effects ~ N(0, sd_outer²),
    runs ~ unit + N(0, sd_inner²). The known answer for the interval design (tests, README)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    unit = rng.normal(0.0, sd_outer, (n_sims, n_outer, 1))
    vals = unit + rng.normal(0.0, sd_inner, (n_sims, n_outer, n_inner))
    rows = [{"sim": s, "unit": u, "v": float(vals[s, u, i])}
            for s in range(n_sims) for u in range(n_outer) for i in range(n_inner)]
    nested = nested_ci(rows, ("sim",), "v", outer="unit", level=level)
    pooled = grouped_ci(rows, ("sim",), "v", level)
    cover = lambda out: sum(r["lo"] <= 0.0 <= r["hi"] for r in out) / n_sims  # noqa: E731
    return {"nested": cover(nested), "pooled": cover(pooled), "n_sims": n_sims}
