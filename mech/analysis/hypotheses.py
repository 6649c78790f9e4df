"""Tests that decide a claim, each declared before it is run (an experiment YAML's ``hypotheses:`` list).

Tests (scipy / statsmodels):
* ``trend``: a monotone trend over log rank. Page's L test (scipy.stats.page_trend_test) with the replicate units
  as blocks and the arms, in rank order, as treatments; the reported effect is the mean over units of each unit's
  OLS slope of the metric on log2 rank, with its t-interval.
* ``inverted_u``: Simonsohn's (2018) two-lines test. The breakpoint is the arm with the highest mean (ranks are
  discrete, so the flexible fit of the original reduces to the arm means); a line is fitted on each side, both
  including the breakpoint, per unit; the U is detected when the left slopes are significantly positive and the
  right slopes significantly negative, each one-sided at alpha (an intersection-union test: p = the larger p).
  A maximum at either end of the rank range is no inverted U (p = 1). The breakpoint gets a two-stage bootstrap
  interval: data seeds resampled, then training seeds within each (seeded).
* ``equivalence``: TOST on the paired per-unit differences of two arms with a declared margin
  (statsmodels.stats.weightstats.ttost_paired), and ``difference``: the paired t-test (scipy.stats.ttest_rel).

Replication units: with more than one data (teacher) seed a unit is a data seed, its value the mean over its
training seeds (never pooled as independent, as in mech.analysis.stats.nested_ci); with one data seed a unit is a
training seed, and the test is conditional on that dataset (``units`` says which).

Multiplicity: Holm and Benjamini–Hochberg over every hypothesis of an experiment (statsmodels multipletests); the
verdict uses the Holm-adjusted p.

Verdict rule, per test (p is Holm-adjusted; CI(1 − 2α) is the interval TOST uses):
* trend: *supported* if p < α in the claimed direction; *not supported* if the opposite direction has p < α, or a
  margin is declared and the CI(1 − 2α) of the mean slope lies inside ±margin; else *inconclusive*.
* inverted_u: *supported* if p < α; *not supported* if the maximum is at an end of the range, or either line's
  slope is significant (one-sided, α) in the wrong direction; else *inconclusive*.
* equivalence: *supported* if the TOST p < α; *not supported* if the CI(1 − α) of the difference lies wholly
  outside ±margin; else *inconclusive*.
* difference: *supported* if p < α; *not supported* if a margin is declared and the CI(1 − 2α) lies inside
  ±margin; else *inconclusive*.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from mech.errors import MechError

TESTS = ("trend", "inverted_u", "equivalence", "difference")
DIRECTIONS = ("increasing", "decreasing")
VERDICTS = ("supported", "not supported", "inconclusive")
RESULT_COLUMNS = ("name", "claim", "test", "arms", "metric", "units", "n_units", "statistic", "estimate", "lo", "hi",
                  "p", "p_holm", "p_bh", "alpha", "margin", "breakpoint", "breakpoint_lo", "breakpoint_hi",
                  "verdict", "detail", "paper", "agrees_if")


@dataclass(frozen=True)
class HypothesisSpec:
    """One declared test. ``arms`` are student names of the sweep, each optionally ``student@trait`` (a teacher arm
    other than ``trait``'s): ≥ 3 LoRA students (their ranks are the x axis) for trend / inverted_u; for
    equivalence / difference two (the first minus the second) or one (against 0)."""

    name: str = ""
    claim: str = ""
    test: str = ""
    arms: tuple[str, ...] = ()
    margin: float | None = None
    alpha: float = 0.05
    metric: str = "paired_logp_first"
    direction: str = "increasing"  # trend: the claimed direction over rank
    # which rows: the teacher trait (null: the sweep's eval.target) and contexts (null: the sweep's first)
    trait: str | None = None
    train_context: str | None = None
    eval_context: str | None = None
    # the paper's claim this test bears on (mech.analysis.paper.PAPER_CLAIMS) and the verdict that agrees with it
    paper: str | None = None
    agrees_if: str | None = None

    def __post_init__(self) -> None:
        from mech.analysis.paper import check_claim

        where = f"hypothesis {self.name!r}"
        check_claim(self.paper, self.agrees_if, where)
        if not self.name:
            raise MechError("a hypothesis needs a name: add name: <short id>")
        if not self.claim:
            raise MechError(f"{where} needs a claim: state it in words before it is tested")
        if self.test not in TESTS:
            raise MechError(f"{where}: unknown test {self.test!r}: expected one of {', '.join(TESTS)}")
        if not 0.0 < self.alpha < 0.5:
            raise MechError(f"{where}: alpha must lie strictly between 0 and 0.5, got {self.alpha}")
        if self.direction not in DIRECTIONS:
            raise MechError(f"{where}: direction must be one of {', '.join(DIRECTIONS)}, got {self.direction!r}")
        if self.margin is not None and not (math.isfinite(self.margin) and self.margin > 0):
            raise MechError(f"{where}: margin must be a number > 0, got {self.margin}")
        if self.test == "equivalence" and self.margin is None:
            raise MechError(f"{where}: an equivalence test needs a declared margin (margin: 0.05, in metric units)")
        n = len(self.arms)
        if self.test in ("trend", "inverted_u") and n < 3:
            raise MechError(f"{where}: a {self.test} test needs at least 3 arms (students at different ranks), "
                            f"got {n}")
        if self.test in ("equivalence", "difference") and n not in (1, 2):
            raise MechError(f"{where}: a {self.test} test compares 2 arms (or 1 arm against 0), got {n}")
        if len(set(self.arms)) != n:
            raise MechError(f"{where}: arms repeat a student: list each once")


# --------------------------------------------------------------------------------------------- replicate units


@dataclass(frozen=True)
class Units:
    """The replicate matrix of some arms: ``values[u][a]`` is unit u's value of arm a; ``runs[u][a]`` the run
    values (training seeds) it averages; ``kind`` names the unit (``teacher_seed`` or ``training_seed``)."""

    values: list[list[float]]
    runs: list[list[list[float]]]
    kind: str
    labels: list[Any]


def unit_matrix(rows: Iterable[Mapping[str, Any]], arms: Sequence[str], arm_key: str = "student",
                outer: str = "teacher_seed", inner: str = "training_seed") -> Units:
    """Rows (already one metric, trait and context) → the per-unit values of ``arms``. A unit missing an arm is
    dropped; fewer than 2 complete units is a MechError."""
    grid: dict[Any, dict[Any, dict[str, float]]] = {}
    for r in rows:
        if r[arm_key] in arms:
            v = float(r["value"])
            if not math.isfinite(v):
                raise MechError(f"non-finite value in arm {r[arm_key]!r}: drop or re-run the failed cell")
            grid.setdefault(r[outer], {}).setdefault(r[inner], {})[r[arm_key]] = v
    nested = len(grid) > 1
    values, runs, labels = [], [], []
    if nested:
        for d in sorted(grid):
            per_arm = [[grid[d][t][a] for t in sorted(grid[d]) if a in grid[d][t]] for a in arms]
            if all(per_arm):
                runs.append(per_arm)
                values.append([math.fsum(x) / len(x) for x in per_arm])
                labels.append(d)
    else:
        for d in grid:
            for t in sorted(grid[d]):
                if all(a in grid[d][t] for a in arms):
                    runs.append([[grid[d][t][a]] for a in arms])
                    values.append([grid[d][t][a] for a in arms])
                    labels.append(t)
    if len(values) < 2:
        raise MechError(f"the arms {', '.join(arms)} have {len(values)} complete replicate unit(s): a test needs at "
                        "least 2 (data seeds, or training seeds with one data seed); is every arm in the sweep?")
    return Units(values, runs, outer if nested else inner, labels)


# --------------------------------------------------------------------------------------------- the tests


def _slope(x: Sequence[float], y: Sequence[float]) -> float:
    mx, my = math.fsum(x) / len(x), math.fsum(y) / len(y)
    sxx = math.fsum((a - mx) ** 2 for a in x)
    return math.fsum((a - mx) * (b - my) for a, b in zip(x, y)) / sxx


def _one_sample(values: Sequence[float], alternative: str) -> float:
    """One-sided one-sample t-test of mean > 0 (``greater``) or < 0 (``less``); scipy's ttest_1samp, computed
    directly (the simulations call it many thousands of times)."""
    from scipy import stats

    vals = list(values)
    if max(vals) == min(vals):  # no spread: the sign decides, exactly
        m = vals[0]
        return 0.0 if (m > 0 if alternative == "greater" else m < 0) else 1.0
    n = len(vals)
    mean = math.fsum(vals) / n
    t = mean / (math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (n - 1)) / math.sqrt(n))
    return float(stats.t.sf(t if alternative == "greater" else -t, n - 1))


def _t_interval(values: Sequence[float], level: float) -> tuple[float, float, float]:
    from mech.analysis.stats import mean_ci

    ci = mean_ci(values, level)
    return ci.mean, ci.lo, ci.hi


def trend_test(units: Units, x: Sequence[float], direction: str = "increasing", alpha: float = 0.05,
               margin: float | None = None) -> dict[str, Any]:
    """Page's L test of a monotone trend of the arms (ordered by ``x``) in ``direction``, and the opposite one;
    the estimate is the mean per-unit slope on ``x`` with its (1 − 2α) interval."""
    import numpy as np
    from scipy import stats

    order = np.argsort(x)
    y = np.asarray(units.values)[:, order]
    xs = [x[i] for i in order]
    up = stats.page_trend_test(y, predicted_ranks=list(range(1, len(xs) + 1)))
    down = stats.page_trend_test(y, predicted_ranks=list(range(len(xs), 0, -1)))
    claimed, opposite = (up, down) if direction == "increasing" else (down, up)
    slopes = [_slope(xs, row) for row in y]
    est, lo, hi = _t_interval(slopes, 1 - 2 * alpha)
    return {"statistic": float(claimed.statistic), "p": float(claimed.pvalue), "p_opposite": float(opposite.pvalue),
            "estimate": est, "lo": lo, "hi": hi}


def _breakpoint_index(means: Sequence[float]) -> int:
    return int(max(range(len(means)), key=lambda i: (means[i], -i)))


def two_lines_test(units: Units, x: Sequence[float], alpha: float = 0.05, n_boot: int = 2000,
                   seed: int = 0) -> dict[str, Any]:
    """Simonsohn's two-lines test for an inverted U over ``x`` (see the module docstring)."""
    import numpy as np

    order = list(np.argsort(x))
    xs = [float(x[i]) for i in order]
    y = [[row[i] for i in order] for row in units.values]
    means = [math.fsum(col) / len(col) for col in zip(*y)]
    b = _breakpoint_index(means)
    boot = _breakpoint_bootstrap(units, order, n_boot, seed)
    bp = {"breakpoint": xs[b], "breakpoint_lo": xs[int(np.floor(np.quantile(boot, alpha / 2)))],
          "breakpoint_hi": xs[int(np.ceil(np.quantile(boot, 1 - alpha / 2)))]}
    if b in (0, len(xs) - 1):
        return bp | {"statistic": math.nan, "p": 1.0, "estimate": math.nan, "lo": math.nan, "hi": math.nan,
                     "left": math.nan, "right": math.nan, "p_left": math.nan, "p_right": math.nan,
                     "p_left_wrong": math.nan, "p_right_wrong": math.nan, "at_end": True}
    left = [_slope(xs[: b + 1], row[: b + 1]) for row in y]
    right = [_slope(xs[b:], row[b:]) for row in y]
    p_left, p_right = _one_sample(left, "greater"), _one_sample(right, "less")
    ml, mr = math.fsum(left) / len(left), math.fsum(right) / len(right)
    # the estimate is the weaker of the two slopes (signed so that > 0 is the U's side): the U is as clear as it
    return bp | {"statistic": min(ml, -mr), "p": max(p_left, p_right), "estimate": min(ml, -mr), "lo": math.nan,
                 "hi": math.nan, "left": ml, "right": mr, "p_left": p_left, "p_right": p_right,
                 "p_left_wrong": _one_sample(left, "less"),
                 "p_right_wrong": _one_sample(right, "greater"), "at_end": False}


def _breakpoint_bootstrap(units: Units, order: Sequence[int], n_boot: int, seed: int) -> list[int]:
    """Breakpoint index per two-stage bootstrap draw: units resampled, then each drawn unit's runs (training
    seeds, as many draws as the unit has runs; an arm with fewer runs wraps around its own)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n, k = len(units.runs), max(len(arm) for unit in units.runs for arm in unit)
    runs = np.array([[[arm[j % len(arm)] for j in range(k)] for arm in (unit[i] for i in order)]
                     for unit in units.runs])  # [unit, arm (x order), run]
    n_runs = np.array([len(unit[0]) for unit in units.runs])
    u = rng.integers(0, n, (n_boot, n))
    pick = np.floor(rng.random((n_boot, n, k)) * n_runs[u][..., None]).astype(int)  # [boot, draw, run draw]
    live = np.arange(k)[None, None, :] < n_runs[u][..., None]
    vals = runs[u[..., None], :, pick]  # [boot, draw, run draw, arm]
    unit_means = (vals * live[..., None]).sum(axis=2) / n_runs[u][..., None]
    sums = unit_means.sum(axis=1)  # [boot, arm]
    # ties go to the lowest index, as in _breakpoint_index
    return [int(i) for i in np.argmax(sums, axis=1)]


def _pair(units: Units) -> tuple[list[float], list[float]]:
    """Arm 0 and arm 1 per unit; with one arm, arm 1 is 0 (a one-sample test)."""
    return [r[0] for r in units.values], [r[1] if len(r) > 1 else 0.0 for r in units.values]


def equivalence_test(units: Units, margin: float, alpha: float = 0.05) -> dict[str, Any]:
    """TOST of arm 0 − arm 1 within ±margin, paired per unit; the interval is the (1 − 2α) one TOST implies."""
    from statsmodels.stats.weightstats import ttost_paired

    a, b = _pair(units)
    d = [p - q for p, q in zip(a, b)]
    est, lo, hi = _t_interval(d, 1 - 2 * alpha)
    _, lo1, hi1 = _t_interval(d, 1 - alpha)
    if max(d) == min(d):  # no spread: equivalent exactly when the constant difference is inside the margin
        p = 0.0 if abs(d[0]) < margin else 1.0
        stat = math.inf if p == 0.0 else -math.inf
    else:
        import numpy as np

        p, (stat, _, _), _ = ttost_paired(np.asarray(a), np.asarray(b), -margin, margin)
        p, stat = float(p), float(stat)
    return {"statistic": stat, "p": p, "estimate": est, "lo": lo, "hi": hi, "lo_1a": lo1, "hi_1a": hi1}


def difference_test(units: Units, alpha: float = 0.05) -> dict[str, Any]:
    """Paired t-test of arm 0 − arm 1 (scipy.stats.ttest_rel); the interval is (1 − 2α), for a margin check."""
    from scipy import stats

    a, b = _pair(units)
    d = [p - q for p, q in zip(a, b)]
    est, lo, hi = _t_interval(d, 1 - 2 * alpha)
    if max(d) == min(d):
        p, stat = (1.0, 0.0) if d[0] == 0 else (0.0, math.copysign(math.inf, d[0]))
    else:
        res = stats.ttest_rel(a, b)
        p, stat = float(res.pvalue), float(res.statistic)
    return {"statistic": stat, "p": p, "estimate": est, "lo": lo, "hi": hi}


def adjust(pvalues: Sequence[float]) -> tuple[list[float], list[float]]:
    """Holm and Benjamini–Hochberg adjusted p-values (statsmodels multipletests), in input order."""
    from statsmodels.stats.multitest import multipletests

    if not pvalues:
        return [], []
    holm = multipletests(list(pvalues), method="holm")[1]
    bh = multipletests(list(pvalues), method="fdr_bh")[1]
    return [float(p) for p in holm], [float(p) for p in bh]


def verdict(test: str, res: Mapping[str, Any], p_adj: float, alpha: float, margin: float | None) -> str:
    """The stated rule of the module docstring."""
    if p_adj < alpha:
        return "supported"
    inside = margin is not None and -margin < res["lo"] and res["hi"] < margin
    if test == "trend":
        return "not supported" if res["p_opposite"] < alpha or inside else "inconclusive"
    if test == "inverted_u":
        wrong = not res["at_end"] and (res["p_left_wrong"] < alpha or res["p_right_wrong"] < alpha)
        return "not supported" if res["at_end"] or wrong else "inconclusive"
    if test == "equivalence":
        outside = res["lo_1a"] > margin or res["hi_1a"] < -margin
        return "not supported" if outside else "inconclusive"
    return "not supported" if inside else "inconclusive"


def run_hypotheses(rows: Iterable[Mapping[str, Any]], specs: Sequence[HypothesisSpec], ranks: Mapping[str, int],
                   seed: int = 0, n_boot: int = 2000) -> list[dict[str, Any]]:
    """Each hypothesis on the same ``rows`` (results rows of one trait and one train/eval context: student,
    teacher_seed, training_seed, metric, value); see :func:`run_declared`."""
    rows = list(rows)
    return run_declared([(h, rows) for h in specs], ranks, seed, n_boot)


def run_declared(pairs: Sequence[tuple[HypothesisSpec, Iterable[Mapping[str, Any]]]], ranks: Mapping[str, int],
                 seed: int = 0, n_boot: int = 2000) -> list[dict[str, Any]]:
    """Each (hypothesis, its rows) tested, Holm / BH adjusted over all of them, with its verdict; one result
    dict per hypothesis (RESULT_COLUMNS). ``ranks``: each LoRA arm's rank (x = log2 rank)."""
    results = []
    for h, rows in pairs:
        units = unit_matrix([r for r in rows if r["metric"] == h.metric], h.arms)
        if h.test in ("trend", "inverted_u"):
            missing = [a for a in h.arms if a not in ranks]
            if missing:
                raise MechError(f"hypothesis {h.name!r}: arm(s) {', '.join(missing)} have no LoRA rank: a "
                                f"{h.test} test runs over LoRA ranks")
            x = [math.log2(ranks[a]) for a in h.arms]
            res = (trend_test(units, x, h.direction, h.alpha, h.margin) if h.test == "trend"
                   else two_lines_test(units, x, h.alpha, n_boot=n_boot, seed=seed))
        elif h.test == "equivalence":
            res = equivalence_test(units, h.margin, h.alpha)
        else:
            res = difference_test(units, h.alpha)
        results.append((h, units, res))
    holm, bh = adjust([res["p"] for _, _, res in results])
    return [_result_row(h, units, res, ph, pb) for (h, units, res), ph, pb in zip(results, holm, bh)]


def _result_row(h: HypothesisSpec, units: Units, res: Mapping[str, Any], ph: float, pb: float) -> dict[str, Any]:
    bp = {k: (2.0 ** res[k] if k in res else math.nan) for k in ("breakpoint", "breakpoint_lo", "breakpoint_hi")}
    if h.test == "trend":
        detail = f"slope per log2 rank; Page p, opposite direction {res['p_opposite']:.3g}"
    elif h.test == "inverted_u":
        detail = ("maximum at an end of the range" if res["at_end"] else
                  f"left slope {res['left']:+.4g} (p {res['p_left']:.3g}), right slope {res['right']:+.4g} "
                  f"(p {res['p_right']:.3g}) per log2 rank")
    elif h.test == "equivalence":
        arms = " - ".join(h.arms) if len(h.arms) > 1 else h.arms[0] + " vs 0"
        detail = f"{arms}; {100 * (1 - h.alpha):.0f} % CI [{res['lo_1a']:+.4g}, {res['hi_1a']:+.4g}]"
    else:
        detail = f"{' - '.join(h.arms) if len(h.arms) > 1 else h.arms[0] + ' vs 0'}, paired per unit"
    return {"name": h.name, "claim": h.claim, "test": h.test, "arms": " ".join(h.arms), "metric": h.metric,
            "units": units.kind, "n_units": len(units.values), "statistic": res["statistic"],
            "estimate": res["estimate"], "lo": res["lo"], "hi": res["hi"], "p": res["p"], "p_holm": ph, "p_bh": pb,
            "alpha": h.alpha, "margin": h.margin if h.margin is not None else math.nan, **bp,
            "verdict": verdict(h.test, res, ph, h.alpha, h.margin), "detail": detail, "paper": h.paper or "",
            "agrees_if": h.agrees_if or ""}
