"""Tests that decide (mech.analysis.hypotheses) on planted data whose answer is known by construction."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mech.analysis.hypotheses import (HypothesisSpec, adjust, run_hypotheses, two_lines_test, unit_matrix)
from mech.errors import MechError

RANKS = {f"lora_r{r}": r for r in (1, 2, 4, 8, 16, 32)}
ARMS = tuple(RANKS)
X = np.log2(list(RANKS.values()))


def planted(curve, rng, n_data=3, n_train=2, sd_data=0.1, sd_run=0.05, arms=ARMS):
    """Rows of a sweep: per data seed a shared offset (between-data-seed variance), per run independent noise."""
    rows = []
    for d in range(n_data):
        offset = rng.normal(0, sd_data)
        for t in range(n_train):
            for a, c in zip(arms, curve):
                rows.append({"student": a, "teacher_seed": d, "training_seed": t, "metric": "paired_logp_first",
                             "value": float(c + offset + rng.normal(0, sd_run))})
    return rows


TREND = HypothesisSpec("rank_trend", "the effect grows with log rank", "trend", ARMS)
U = HypothesisSpec("rank_u", "the effect peaks at an intermediate rank", "inverted_u", ARMS)


def test_planted_inverted_u_is_detected_with_its_breakpoint():
    curve = 1 - 0.1 * (X - 3) ** 2  # peak at log2 rank 3: rank 8
    out = {r["name"]: r for r in run_hypotheses(planted(curve, np.random.default_rng(0)), [U, TREND], RANKS)}
    u = out["rank_u"]
    assert u["verdict"] == "supported" and u["p"] < 0.01 and u["units"] == "teacher_seed" and u["n_units"] == 3
    assert u["breakpoint"] == 8 and u["breakpoint_lo"] <= 8 <= u["breakpoint_hi"]
    # (an asymmetric U also reads as an increasing trend to Page's test: the two-lines test is what tells them apart)


def test_planted_monotone_curve_is_a_trend_and_no_u():
    curve = 0.1 * X
    out = {r["name"]: r for r in run_hypotheses(planted(curve, np.random.default_rng(1)), [TREND, U], RANKS)}
    assert out["rank_trend"]["verdict"] == "supported" and out["rank_trend"]["estimate"] == pytest.approx(0.1, abs=0.03)
    assert out["rank_u"]["verdict"] == "not supported" and out["rank_u"]["breakpoint"] == 32
    down = HypothesisSpec("down", "the effect falls with rank", "trend", ARMS, direction="decreasing")
    (r,) = run_hypotheses(planted(curve, np.random.default_rng(1)), [down], RANKS)
    assert r["verdict"] == "not supported"  # the opposite direction is significant


def test_plateau_gives_no_false_u_beyond_alpha():
    # measured by simulation: a flat curve, 3 data seeds x 1 training seed, 6 ranks, 600 draws (README: 4000)
    rng = np.random.default_rng(2)
    hits = 0
    n = 600
    for _ in range(n):
        units = unit_matrix(planted(np.zeros(6), rng, n_train=1), ARMS)
        hits += two_lines_test(units, list(X), 0.05, n_boot=1)["p"] < 0.05
    assert hits / n <= 0.05 + 2 * math.sqrt(0.05 * 0.95 / n)


def _two_arms(diff, rng, n_data=5, sd_run=0.02):
    return planted([0.2, 0.2 + diff], rng, n_data=n_data, n_train=2, sd_data=0.1, sd_run=sd_run,
                   arms=("full", "lora_r16"))


EQ = HypothesisSpec("eq", "full FT transfers as much as LoRA r16", "equivalence", ("full", "lora_r16"), margin=0.05)
DIFF = HypothesisSpec("diff", "full FT and LoRA r16 differ", "difference", ("full", "lora_r16"), margin=0.05)


def test_two_equal_means_are_equivalent():
    rows = _two_arms(0.0, np.random.default_rng(3), sd_run=0.01)
    out = {r["name"]: r for r in run_hypotheses(rows, [EQ, DIFF], RANKS)}
    assert out["eq"]["verdict"] == "supported" and -0.05 < out["eq"]["lo"] < out["eq"]["hi"] < 0.05
    assert out["diff"]["verdict"] == "not supported"  # CI(1 - 2 alpha) inside the margin
    assert out["eq"]["p_holm"] == pytest.approx(2 * out["eq"]["p"])  # Holm over the two: the smaller p doubled


def test_two_different_means_differ_and_are_not_equivalent():
    out = {r["name"]: r for r in run_hypotheses(_two_arms(0.2, np.random.default_rng(4)), [EQ, DIFF], RANKS)}
    assert out["diff"]["verdict"] == "supported" and out["diff"]["estimate"] == pytest.approx(-0.2, abs=0.03)
    assert out["eq"]["verdict"] == "not supported"


def test_between_data_seed_offsets_cancel_in_pairs():
    # a huge data-seed offset shared by both arms: the paired test still sees the planted difference
    rows = planted([0.0, 0.1], np.random.default_rng(5), n_data=4, n_train=1, sd_data=10.0, sd_run=0.01,
                   arms=("full", "lora_r16"))
    (r,) = run_hypotheses(rows, [DIFF], RANKS)
    assert r["verdict"] == "supported"


def test_holm_and_bh_match_hand_computed_values():
    holm, bh = adjust([0.01, 0.04, 0.03])
    assert holm == pytest.approx([0.03, 0.06, 0.06]) and bh == pytest.approx([0.03, 0.04, 0.04])


def test_one_data_seed_uses_training_seeds_as_units():
    rows = planted(0.1 * X, np.random.default_rng(6), n_data=1, n_train=3)
    (r,) = run_hypotheses(rows, [TREND], RANKS)
    assert r["units"] == "training_seed" and r["n_units"] == 3


@pytest.mark.parametrize("kwargs, match", [
    ({"test": "tost"}, "unknown test 'tost'"),
    ({"test": "equivalence", "arms": ("a", "b")}, "needs a declared margin"),
    ({"test": "difference", "arms": ("a", "b", "c")}, "compares 2 arms"),
    ({"test": "trend", "arms": ("a", "b")}, "at least 3 arms"),
    ({"test": "trend", "arms": ("a", "b", "c"), "alpha": 0.7}, "alpha"),
    ({"test": "trend", "arms": ("a", "b", "c"), "direction": "up"}, "direction"),
    ({"test": "difference", "arms": ("a", "b"), "margin": -1.0}, "margin"),
])
def test_bad_specs_are_one_line_errors(kwargs, match):
    with pytest.raises(MechError, match=match):
        HypothesisSpec(**({"name": "h", "claim": "c"} | kwargs))


def test_missing_arm_is_an_error():
    rows = planted(0.1 * X, np.random.default_rng(7))
    with pytest.raises(MechError, match="complete replicate unit"):
        run_hypotheses(rows, [HypothesisSpec("h", "c", "difference", ("lora_r1", "lora_r99"))], RANKS)


# ------------------------------------------------------------------------------------------ from the sweep YAML

from pathlib import Path  # noqa: E402

from mech.sweep import load_sweep  # noqa: E402
from mech.sweep.runner import hypothesis_rows  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

SWEEP = """name: s
traits: [{target: owl}, {target: null}]
data_seeds: [0, 1, 2]
students: [{method: lora, rank: 1}, {method: lora, rank: 4}, {method: lora, rank: 16}, {method: full}]
training_seeds: [0]
hypotheses:
"""


def _sweep(tmp_path, hyp: str):
    p = tmp_path / "s.yaml"
    p.write_text(SWEEP + hyp)
    return p


def test_quick_yaml_declares_its_hypotheses():
    cfg = load_sweep(REPO / "experiments" / "quick.yaml")
    assert {h.test for h in cfg.hypotheses} == {"trend", "inverted_u", "equivalence", "difference"}
    assert next(h for h in cfg.hypotheses if h.test == "equivalence").arms == ("full", "lora_r16")


@pytest.mark.parametrize("hyp, match", [
    ("  - {name: h, claim: c, tset: trend, arms: [lora_r1, lora_r4, lora_r16]}\n", "unknown key.*'test'"),
    ("  - {name: h, claim: c, test: trend, arms: [lora_r1, lora_r4, lora_r99]}\n", "arm 'lora_r99' is no student"),
    ("  - {name: h, claim: c, test: trend, arms: [lora_r1, lora_r4, full]}\n", "every arm must be a LoRA"),
    ("  - {name: h, claim: c, test: difference, arms: [full, lora_r1], metric: paired_logp}\n", "unknown metric"),
    ("  - {name: h, claim: c, test: difference, arms: [full, lora_r1], trait: cat}\n", "not a teacher"),
    ("  - {name: h, claim: c, test: difference, arms: [full, lora_r1]}\n"
     "  - {name: h, claim: d, test: difference, arms: [full, lora_r4]}\n", "repeats"),
])
def test_bad_hypotheses_in_the_yaml_are_one_line_errors(tmp_path, hyp, match):
    with pytest.raises(MechError, match=match) as e:
        load_sweep(_sweep(tmp_path, hyp))
    assert "\n" not in str(e.value)


def test_sweep_rows_give_tests_and_tests_md(tmp_path):
    from mech.report.sweep import write_tables

    cfg = load_sweep(_sweep(tmp_path, "  - {name: grows, claim: c, test: trend, arms: [lora_r1, lora_r4, lora_r16]}\n"
                                      "  - {name: same, claim: c, test: equivalence, arms: [full, lora_r16], "
                                      "margin: 0.5}\n"))
    rng = np.random.default_rng(8)
    rows = []
    for d in range(3):
        for name, mean in (("lora_r1", 0.1), ("lora_r4", 0.2), ("lora_r16", 0.3), ("full", 0.3)):
            for trait, ctx in (("owl", "default"), ("neutral", "default")):
                rows.append({"trait": trait, "student": name, "teacher_seed": d, "training_seed": 0,
                             "train_context": ctx, "eval_context": ctx, "metric": "paired_logp_first",
                             "value": mean + rng.normal(0, 0.01) if trait == "owl" else 99.0})
    tests = hypothesis_rows(cfg, rows)
    assert [t["verdict"] for t in tests] == ["supported", "supported"] and tests[0]["n_units"] == 3
    write_tables(tmp_path / "out", [], [], "s", tests=tests)
    md = (tmp_path / "out" / "tests.md").read_text()
    assert "| grows |" in md and "**supported**" in md and "Verdict rule:" in md
    assert (tmp_path / "out" / "tests.csv").read_text().startswith("name,claim,test")


def test_context_arms_pair_within_seeds_and_the_shipped_yamls_load(tmp_path):
    """The paper's contrast as a declared paired test: train default -> eval none vs train default -> eval default."""
    from mech.sweep.config import hypothesis_arm

    p = tmp_path / "g.yaml"
    p.write_text("name: g\ntraits: [{target: owl}, {target: null}]\ndata_seeds: [0, 1, 2, 3]\n"
                 "students: [{method: lora, rank: 16}]\ntraining_seeds: [0]\ntrain_contexts: [default, none]\n"
                 "eval_contexts: [default, none]\nhypotheses:\n"
                 "  - {name: c, claim: c, test: difference, arms: [lora_r16@@default@none, lora_r16@@default@default]}\n")
    cfg = load_sweep(p)
    assert hypothesis_arm("lora_r16@@default@none", cfg, cfg.hypotheses[0]) == ("lora_r16", "owl", "default", "none")
    rng = np.random.default_rng(9)
    rows = []
    for d in range(4):
        shared = rng.normal(0, 1.0)  # a data seed moves both cells alike: pairing removes it
        for ec, mean in (("default", 0.10), ("none", 0.02)):
            rows.append({"trait": "owl", "student": "lora_r16", "teacher_seed": d, "training_seed": 0,
                         "train_context": "default", "eval_context": ec, "metric": "paired_logp_first",
                         "value": mean + shared + rng.normal(0, 0.005)})
    (t,) = hypothesis_rows(cfg, rows)
    assert t["verdict"] == "supported" and t["estimate"] == pytest.approx(-0.08, abs=0.02)
    bad = p.read_text().replace("lora_r16@@default@none", "lora_r16@@default@empty")
    p.write_text(bad)
    with pytest.raises(MechError, match="eval_context 'empty' is not in the sweep's eval_contexts"):
        load_sweep(p)
    for name in ("context_grid", "full_ft_controls", "full_ft_matched_loss"):
        shipped = load_sweep(REPO / "experiments" / f"{name}.yaml")
        assert shipped.teacher_seeds == (0, 1, 2) and shipped.training_seeds == (0,) and shipped.hypotheses
