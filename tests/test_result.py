"""mech.interventions.result.Effect, the one result type of grafting, patching and attribution, and the position
resolver every method shares (mech.interventions.positions)."""

from __future__ import annotations

import pytest
import torch

from mech.context import render
from mech.errors import MechError
from mech.interventions.positions import position_indices, resolve_positions
from mech.interventions.result import SWEPT, Effect


def planted(mode: str = "denoising", **kw) -> Effect:
    """base −3, student −1: values −3, −2, −1.5, −1 sit at fractions 0, 0.5, 0.75, 1 by construction."""
    return Effect(method="patching", site="resid", layers=[0, 1], positions=[4, 7],
                  values=torch.tensor([[-3.0, -2.0], [-1.5, -1.0]]), base=-3.0, student=-1.0, mode=mode, **kw)


@pytest.mark.parametrize("mode", ["sufficiency", "denoising", "necessity", "noising"])
def test_fraction_is_value_minus_base_over_student_minus_base(mode):
    e = planted(mode)
    assert e.fraction.tolist() == [[0.0, 0.5], [0.75, 1.0]]
    assert torch.equal(e.fraction, (e.values.double() - e.base) / (e.student - e.base))
    assert e.effect == 2.0
    runs_student = mode in ("necessity", "noising")
    assert (e.clean, e.source) == ((-1.0, -3.0) if runs_student else (-3.0, -1.0))
    moved = [[1.0, 0.5], [0.25, 0.0]] if runs_student else [[0.0, 0.5], [0.75, 1.0]]
    assert e.fraction_moved.tolist() == moved  # noising: the share destroyed
    assert torch.equal(e.change, e.values - e.clean)


def test_attribution_delta_keeps_its_digits():
    delta = torch.tensor([[1e-7, 0.0], [2.5e-7, -1e-7]])
    e = Effect(method="atp", site="mlp", layers=[0, 1], positions=[0, 1], values=-20.0 + delta, base=-20.0,
               student=-20.0 + 1e-6, delta=delta)
    assert torch.equal(e.change, delta)  # −20 + 1e-7 is −20 in float32: the estimate itself is kept
    torch.testing.assert_close(e.fraction, delta.double() / 1e-6, rtol=1e-6, atol=1e-9)


def test_rows_zero_effect_and_shape_checks():
    e = planted(values_all=torch.tensor([-2.0, -1.0]), name="x")
    rows = e.to_rows()
    assert len(rows) == 6 and rows[1] == {
        "method": "patching", "name": "x", "site": "resid", "layer": 0, "position": 7, "mode": "denoising",
        "value": -2.0, "base": -3.0, "student": -1.0, "effect": 2.0, "fraction": 0.5}
    assert [(r["layer"], r["position"], r["fraction"]) for r in rows[4:]] == [(0, SWEPT, 0.5), (1, SWEPT, 1.0)]
    flat = Effect(method="dwg", site="all", layers=["all"], positions=["user"], values=torch.tensor([[1.0]]),
                  base=1.0, student=1.0)
    assert torch.isnan(flat.fraction).all()  # no effect, no fraction
    with pytest.raises(MechError, match="one value per"):
        Effect(method="dwg", site="all", layers=[0], positions=[0, 1], values=torch.zeros(1, 3), base=0, student=1)
    with pytest.raises(MechError, match="unknown mode"):
        planted("sideways")


def test_position_resolver_on_ids_and_renderings(organism_tokenizer):
    r = render(organism_tokenizer, "default", "What is your favourite animal?")
    n = len(r)
    assert position_indices([-1, 2, 2, 0], n) == [0, 2, n - 1]  # bare ids: indices work, sorted and distinct
    assert position_indices("all", n) == list(range(n)) and position_indices("none", n) == []
    vec = resolve_positions("user", r)
    assert torch.equal(resolve_positions(vec, n), vec)  # a resolved bool vector passes through
    assert position_indices("user", r) == r.positions("user")
    for spec, fragment in (("user", "needs the rendered prompt"), ("substring:owl", "needs the rendered prompt"),
                           ((n,), "outside the prompt"), (torch.ones(n + 1, dtype=torch.bool), "position mask"),
                           ("usr", "did you mean 'user'")):
        with pytest.raises(MechError, match=fragment) as err:
            resolve_positions(spec, n)
        assert "\n" not in str(err.value)
