"""Sampled-rate power on known answers: Cohen's table and a simulated two-proportion test."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mech.analysis.power import power_rows, rate_se, samples_needed
from mech.errors import MechError


def test_samples_needed_matches_cohens_table():
    # Cohen (1988): h = 0.2, alpha 0.05 two-sided, power 0.8 -> 392 per group; h(0.6, 0.5) = 0.2014
    h = 2 * math.asin(math.sqrt(0.6)) - 2 * math.asin(math.sqrt(0.5))
    n = samples_needed(0.5, 0.6)
    assert n == pytest.approx(2 * (1.959964 + 0.841621) ** 2 / h ** 2, rel=1e-4)
    assert n == pytest.approx(392 * (0.2 / h) ** 2, rel=0.01)
    assert samples_needed(0.3, 0.3) == math.inf


def test_simulated_power_at_the_computed_size_is_nominal():
    p0, p1 = 0.02, 0.04
    n = math.ceil(samples_needed(p0, p1))
    rng = np.random.default_rng(0)
    a, b = rng.binomial(n, p0, 4000) / n, rng.binomial(n, p1, 4000) / n
    h = 2 * np.arcsin(np.sqrt(b)) - 2 * np.arcsin(np.sqrt(a))
    rejected = np.abs(h) / math.sqrt(2 / n) > 1.959964
    assert 0.77 <= rejected.mean() <= 0.83


def test_rate_se_and_rows():
    assert rate_se(0.5, 100) == pytest.approx(0.05)
    with pytest.raises(MechError):
        rate_se(1.5, 10)
    summary = [{"trait": "neutral", "student": "s", "train_context": "d", "eval_context": "d", "metric": "p_first",
                "mean": 0.02},
               {"trait": "owl", "student": "s", "train_context": "d", "eval_context": "d", "metric": "paired_p_first",
                "mean": 0.02}]
    (r,) = power_rows(summary, samples_per_arm=1000)
    assert r["p1"] == pytest.approx(0.04) and r["samples_needed"] == pytest.approx(samples_needed(0.02, 0.04))
    assert r["enough"] is (1000 >= r["samples_needed"])


def test_power_markdown(tmp_path):
    from mech.report.sweep import write_tables

    rows = [{"trait": "owl", "student": "s", "train_context": "d", "eval_context": "d", "p0": 0.02, "p1": 0.03,
             "samples_per_arm": 1000, "rate_se": rate_se(0.02, 1000), "samples_needed": samples_needed(0.02, 0.03),
             "enough": False}]
    write_tables(tmp_path, [], [], "x", power=rows)
    md = (tmp_path / "power.md").read_text()
    assert "| owl | s | d | d | 0.0200 | 0.0300 | 1000 |" in md and md.rstrip().endswith("| no |")
