"""Cross-trait transfer tables on planted evaluations whose answer is known by construction."""

from __future__ import annotations

import pytest

from mech.analysis.transfer import cross_trait_tables, paired_candidate_rows, specificity_rows
from mech.errors import MechError


def _labels(trait: str, seed: int) -> dict:
    return {"student": "lora_r4", "train_context": "default", "eval_context": "default", "teacher_seed": 0,
            "training_seed": seed, "trait": trait}


def _planted(own_shift: dict[str, float], noise: float = 0.01):
    """Teachers owl and cat over candidates owl, cat, dog: each student moves its own trait by own_shift[trait]
    and the others by 0.1 (plus a seed-dependent wobble), against a control with log P 0 everywhere."""
    control = {"candidate_logp": {"owl": 0.0, "cat": 0.0, "dog": 0.0}}
    for trait, shift in own_shift.items():
        for seed in range(3):
            wobble = noise * (seed - 1)
            logp = {c: (shift if c == trait else 0.1) + wobble for c in ("owl", "cat", "dog")}
            yield _labels(trait, seed), {"candidate_logp": logp}, control


def test_specific_and_unspecific_teachers_are_told_apart():
    rows = paired_candidate_rows(_planted({"owl": 0.5, "cat": 0.05}))
    assert len(rows) == 2 * 3 * 3
    spec = {r["teacher"]: r for r in cross_trait_tables(rows)["specificity"]}
    assert spec["owl"]["own_mean"] == pytest.approx(0.5) and spec["owl"]["specificity_mean"] == pytest.approx(0.4)
    assert spec["owl"]["transmits"] and spec["owl"]["specific"]
    assert spec["cat"]["specificity_mean"] == pytest.approx(-0.05) and not spec["cat"]["specific"]
    assert spec["cat"]["transmits"]  # it moves toward cat (by 0.05 > 0), just less than toward the others
    assert spec["owl"]["n"] == 3


def test_specificity_uses_each_replicates_own_rival():
    # seed 0's strongest other candidate is dog, seed 1's is cat: the margin is taken per seed, not of the means
    control = {"candidate_logp": {"owl": 0.0, "cat": 0.0, "dog": 0.0}}
    cells = [(_labels("owl", 0), {"candidate_logp": {"owl": 1.0, "cat": 0.0, "dog": 0.6}}, control),
             (_labels("owl", 1), {"candidate_logp": {"owl": 1.0, "cat": 0.6, "dog": 0.0}}, control)]
    spec = specificity_rows(paired_candidate_rows(cells))
    assert [r["specificity"] for r in spec] == [pytest.approx(0.4), pytest.approx(0.4)]
    assert {r["rival"] for r in spec} == {"dog", "cat"}


def test_matrix_means_are_the_planted_shifts():
    matrix = cross_trait_tables(paired_candidate_rows(_planted({"owl": 0.5, "cat": 0.3})))["matrix"]
    got = {(r["teacher"], r["candidate"]): r["mean"] for r in matrix}
    assert got[("owl", "owl")] == pytest.approx(0.5) and got[("cat", "cat")] == pytest.approx(0.3)
    assert got[("owl", "dog")] == pytest.approx(0.1)


def test_evaluations_without_candidate_logp_are_refused():
    with pytest.raises(MechError, match="per-candidate"):
        paired_candidate_rows([(_labels("owl", 0), {"candidate_logp": {}}, {"candidate_logp": {"owl": 0.0}})])
