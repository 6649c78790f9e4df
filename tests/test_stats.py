"""Confidence intervals, t quantiles and the per-group summary of mech.analysis.stats."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from scipy.stats import t as student_t

from mech.analysis.stats import CI, bootstrap_ci, grouped_ci, mean_ci, paired_diff, summarise, t_ppf
from mech.errors import MechError


@pytest.mark.parametrize(
    "p, df, expected, tol",
    [
        (0.975, 2, 4.303, 5e-4),
        (0.975, 9, 2.262, 5e-4),
        (0.975, 29, 2.045, 5e-4),
        (0.975, 1, 12.7062047, 1e-6),
        (0.995, 4, 4.6040949, 1e-6),
        (0.95, 10, 1.8124611, 1e-6),
        (0.975, 1e6, 1.9599668, 1e-5),  # the normal limit
    ],
)
def test_t_quantiles_match_tables(p, df, expected, tol):
    assert t_ppf(p, df) == pytest.approx(expected, abs=tol)


def test_t_quantile_symmetry_and_inverse():
    assert t_ppf(0.5, 3) == 0.0
    assert t_ppf(0.025, 5) == pytest.approx(-t_ppf(0.975, 5), abs=1e-12)
    for p, df in [(0.9, 1), (0.975, 3.5), (0.999, 7), (0.6, 50)]:
        assert student_t.cdf(t_ppf(p, df), df) == pytest.approx(p, abs=1e-10)


def test_t_bad_arguments_are_mech_errors():
    with pytest.raises(MechError):
        t_ppf(1.0, 3)
    with pytest.raises(MechError):
        t_ppf(0.9, 0)


def test_mean_ci_of_1_2_3_by_hand():
    ci = mean_ci([1, 2, 3])
    half = 4.302652729911275 * 1.0 / math.sqrt(3)  # t(0.975, 2) * sd / sqrt(n), sd = 1
    assert (ci.mean, ci.n, ci.sd) == (2.0, 3, pytest.approx(1.0))
    assert ci.lo == pytest.approx(2 - half, abs=1e-9)
    assert ci.hi == pytest.approx(2 + half, abs=1e-9)
    assert ci.half_width == pytest.approx(half, abs=1e-9)
    assert mean_ci([1, 2, 3], level=0.9).half_width < ci.half_width


def test_mean_ci_edge_cases():
    one = mean_ci([0.7])
    assert one.mean == 0.7 and one.n == 1
    assert math.isnan(one.lo) and math.isnan(one.hi) and math.isnan(one.sd)
    flat = mean_ci([2.0, 2.0, 2.0])
    assert flat.lo == flat.hi == 2.0 and flat.sd == 0.0
    for bad in ([], [1.0, float("nan")], [1.0, float("inf")]):
        with pytest.raises(MechError):
            mean_ci(bad)
    with pytest.raises(MechError):
        mean_ci([1, 2], level=1.0)


def test_paired_diff_is_ci_of_differences_and_tighter_than_unpaired():
    treated = [1.0, 2.0, 3.0, 4.0]
    control = [0.5, 1.4, 2.6, 3.5]
    d = paired_diff(treated, control)
    ref = mean_ci([0.5, 0.6, 0.4, 0.5])
    assert d.mean == pytest.approx(0.5)
    assert (d.lo, d.hi, d.n) == (pytest.approx(ref.lo), pytest.approx(ref.hi), 4)
    # the seeds' shared variation cancels: far narrower than either arm's own interval
    assert d.half_width < mean_ci(treated).half_width / 10
    with pytest.raises(MechError, match="pair"):
        paired_diff([1.0, 2.0], [1.0])


def test_bootstrap_ci_is_seeded_and_brackets_the_mean():
    vals = [0.1, 0.4, 0.35, 0.8, 0.2, 0.55]
    a = bootstrap_ci(vals, n_resamples=2000, seed=3)
    assert a == bootstrap_ci(vals, n_resamples=2000, seed=3)
    assert a != bootstrap_ci(vals, n_resamples=2000, seed=4)
    assert a.lo < a.mean < a.hi and a.mean == pytest.approx(sum(vals) / len(vals))
    assert min(vals) <= a.lo and a.hi <= max(vals)
    assert math.isnan(bootstrap_ci([1.0]).lo)


def test_summarise_groups_with_missing_keys_and_drops_nan():
    df = pd.DataFrame(
        {
            "rank": [8, 8, 8, None, None, 8, 8],
            "metric": ["p_first"] * 5 + ["rate", "rate"],
            "seed": [0, 1, 2, 0, 1, 0, 1],
            "value": [1.0, 2.0, 3.0, 0.5, float("nan"), 0.2, 0.4],
        }
    )
    out = summarise(df, by=["rank", "metric"], value="value")
    assert list(out.columns) == ["rank", "metric", "mean", "lo", "hi", "n", "sd"]
    assert len(out) == 3
    lora = out[(out["rank"] == 8) & (out["metric"] == "p_first")].iloc[0]
    ref = mean_ci([1, 2, 3])
    assert (lora["mean"], lora["lo"], lora["hi"], lora["n"]) == (2.0, pytest.approx(ref.lo), pytest.approx(ref.hi), 3)
    full = out[out["rank"].isna()].iloc[0]  # the full-finetune group (rank None) is kept, its NaN dropped
    assert full["n"] == 1 and full["mean"] == 0.5 and math.isnan(full["lo"])
    rate = out[out["metric"] == "rate"].iloc[0]
    assert rate["mean"] == pytest.approx(0.3) and rate["n"] == 2


def test_summarise_whole_table_and_bad_columns():
    df = pd.DataFrame({"value": [1.0, 2.0, 3.0], "label": ["a", "b", "c"]})
    whole = summarise(df, by=[], value="value")
    assert len(whole) == 1 and whole.loc[0, "mean"] == 2.0 and whole.loc[0, "n"] == 3
    with pytest.raises(MechError, match="rnak"):
        summarise(df, by=["rnak"], value="value")
    with pytest.raises(MechError, match="non-numeric"):
        summarise(df, by=[], value="label")


def test_ci_to_dict():
    assert CI(1.0, 0.5, 1.5, 3, 0.2).to_dict() == {"mean": 1.0, "lo": 0.5, "hi": 1.5, "n": 3, "sd": 0.2,
                                                     "level": 0.95}


def test_grouped_ci_groups_in_order_and_carries_columns():
    rows = [{"g": "b", "x": 1, "v": 1.0}, {"g": "a", "x": 2, "v": 5.0}, {"g": "b", "x": 3, "v": 3.0},
            {"g": "a", "x": 4, "v": 7.0}]
    out = grouped_ci(rows, ["g"], "v", carry=["x"])
    assert [r["g"] for r in out] == ["b", "a"]
    assert [r["x"] for r in out] == [1, 2]  # the first row's carried value
    assert out[0]["mean"] == 2.0 and out[1]["mean"] == 6.0 and out[0]["n"] == 2
    assert out[1]["lo"] == pytest.approx(mean_ci([5.0, 7.0]).lo)
    with pytest.raises(MechError):
        grouped_ci([{"g": 1, "v": float("nan")}], ["g"], "v")


# --- paired share test (mech organism leak) -------------------------------------------------------------


def _planted_shares(rng, n: int, share_a: float, share_b: float, per_unit: int = 10, unit_sd: float = 0.0):
    """Units of ``per_unit`` items; a unit's hit probability varies around the condition's share (unit_sd) by the
    same offset under both conditions, as one prompt's answers are alike."""
    import numpy as np

    offset = rng.normal(0.0, unit_sd, n)
    pa = np.clip(share_a + offset, 0, 1)
    pb = np.clip(share_b + offset, 0, 1)
    tot = np.full(n, per_unit)
    return rng.binomial(tot, pa), tot, rng.binomial(tot, pb), tot


def test_paired_share_test_finds_a_planted_raise():
    import numpy as np

    from mech.analysis.stats import paired_share_test

    ha, ta, hb, tb = _planted_shares(np.random.default_rng(0), 400, 0.03, 0.01)
    res = paired_share_test(ha, ta, hb, tb, n_resamples=4000, seed=1)
    assert res["share_a"] == pytest.approx(ha.sum() / ta.sum()) and res["diff"] == pytest.approx(
        res["share_a"] - res["share_b"])
    assert 0 < res["lo"] < 0.02 < res["hi"] < 0.04  # the planted +0.02 inside, 0 outside
    assert res["p_greater"] < 0.001 and res["p_greater"] >= 1 / 4001  # never 0
    assert res == paired_share_test(ha, ta, hb, tb, n_resamples=4000, seed=1)  # seeded
    flipped = paired_share_test(hb, tb, ha, ta, n_resamples=4000, seed=1)
    assert flipped["diff"] == pytest.approx(-res["diff"]) and flipped["p_greater"] > 0.99  # one-sided


def test_paired_share_test_holds_its_level_under_the_null():
    """No raise, units that differ a lot (clustered items): the test rejects at about its level, where an items-as-
    independent test would not (the clustering is why units, never items, are resampled)."""
    import numpy as np

    from mech.analysis.stats import paired_share_test

    rng = np.random.default_rng(7)
    ps = [paired_share_test(*_planted_shares(rng, 60, 0.05, 0.05, unit_sd=0.04), n_resamples=400, seed=s)["p_greater"]
          for s in range(300)]
    rate = sum(p <= 0.05 for p in ps) / len(ps)
    assert 0.01 <= rate <= 0.10  # 0.05 expected; 300 draws: sd 0.013


def test_paired_share_test_identical_conditions_and_bad_input():
    from mech.analysis.stats import paired_share_test

    res = paired_share_test([1, 0, 2], [10, 10, 10], [1, 0, 2], [10, 10, 10], n_resamples=200)
    assert res["diff"] == 0 and res["p_greater"] == 1.0  # every swap ties the observed 0
    for bad, match in [(([1], [10], [0], [10]), ">= 2 units"), (([1, 2], [10, 10], [0], [10]), ">= 2 units"),
                       (([11, 0], [10, 10], [0, 0], [10, 10]), "0 <= hits <= total"),
                       (([0, 0], [0, 0], [0, 0], [10, 10]), "no items at all")]:
        with pytest.raises(MechError, match=match):
            paired_share_test(*bad)
