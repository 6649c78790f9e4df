"""Every experiment YAML in experiments/ parses and validates: a typo in a shipped design fails CI, not a user's run."""

from pathlib import Path

import pytest

from mech.sweep.config import cells, load_sweep

EXPERIMENTS = sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.yaml"))


def test_experiments_exist():
    assert {p.stem for p in EXPERIMENTS} >= {"quick", "quick_free", "cross_trait_animals", "context_grid"}


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_yaml_loads(path):
    cfg = load_sweep(path)
    assert cfg.name == path.stem and cells(cfg)
