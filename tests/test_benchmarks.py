"""Known answers for the benchmarks' own analysis helpers (the benchmarks themselves run on demand)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_error_profile_finds_rank_errors_among_negligible_cells():
    """Planted: 5 large effects estimated almost exactly, 95 negligible ones estimated by noise larger than
    themselves. Spearman over all cells is poor; over the large ones it is perfect; the top 5 are recovered."""
    profile = _bench("bench_atp").error_profile
    gen = torch.Generator().manual_seed(0)
    effect = torch.cat([torch.tensor([1.0, -0.8, 0.6, 0.5, -0.4]), torch.randn(95, generator=gen) * 1e-4])
    estimate = effect + torch.cat([torch.full((5,), 1e-3), torch.randn(95, generator=gen) * 1e-2])
    got = profile(estimate, effect, k=5, share=0.1)
    assert got["n_large"] == 5 and got["spearman_large"] == pytest.approx(1.0)
    assert got["recall_at_k"] == 1.0
    assert got["below_floor"] == pytest.approx(0.95)  # every negligible cell is below the largest error
    assert 0.01 < got["error_floor"] < 0.05
    swapped = estimate.clone()
    swapped[[0, 1]] = estimate[[1, 0]]  # a rank error among the large cells is seen
    assert profile(swapped, effect, k=5)["spearman_large"] < 1.0
