"""One result type for every localisation method: dynamic weight grafting, activation patching, AtP / AtP*.

An :class:`Effect` is a grid ``values[layer, position]`` of the trait metric after an intervention on one
*site*, with the two reference metrics it is read against: ``base`` (the base model, no update anywhere) and
``student`` (the whole student). Its fraction is one formula for every method and mode:

    fraction = (value − base) / (student − base)

1 is the student, 0 the base. Sufficiency (DWG) and denoising (patching: run the base, patch the student in)
ask how much of the effect a region *recovers*; necessity (DWG) and noising (run the student, patch the base
in) how much *survives* without the region. :attr:`Effect.fraction_moved` is the share of the gap between
the model that runs and the model the intervention draws from that was closed: the fraction recovered for
sufficiency / denoising, the fraction destroyed (``1 − fraction``) for necessity / noising.
:meth:`Effect.to_rows` gives one table row per (layer, position) cell.

Every method resolves positions with :func:`mech.interventions.positions.resolve_positions` and layers with
:func:`mech.models.surgery.resolve_layers`, and patching and attribution take a :class:`Mask` for their
positions × layers. What does not share the contract, and why:

* **Components vs sites.** Grafting switches *weight updates* of the seven projections (a Mask's components:
  q, k, v, o, gate, up, down); patching and AtP overwrite *activations* (sites resid, attn, mlp, q, k, v).
  There is no activation to patch for a ``gate`` or ``up`` update alone, and the residual stream has no
  projection to graft, so a Mask given to patching or attribution must have ``components="all"`` and the
  sites are passed separately; ``Effect.site`` is the activation site there and the mask's components in DWG.
* **Cells vs regions.** A Mask's mode maps onto a patching direction (sufficiency → denoising, necessity →
  noising), and a Mask passed to patching or attribution sets it. But patching and AtP sweep the region one
  (layer, position) cell at a time (patching adds, with ``include_all``, each layer's swept positions at once:
  ``values_all``), while DWG switches a mask's whole region, every layer at once, in one forward.
* **Labels.** One prompt's grids carry token indices and layer indices. The battery's DWG rows average over
  questions whose segments fall on different tokens, so their ``positions`` / ``layers`` are the specs
  themselves (``["shared"]``, ``["first_half"]``), one cell per mask.
* **References.** Patching and AtP read ``base`` and ``student`` from the two unpatched models on the same
  prompt. The battery reads them from unpatched forwards averaged over its questions (ratios of means, as a
  single question's effect can be ~0). For a full-FT student grafted with ``rest_from="student"``, the all-off
  mask keeps the student's embeddings and norms, so its value is not exactly ``base``.
* **AtP** estimates the *change* ``m(patched) − m(clean)`` to first order; it is kept in ``delta`` (exactly
  as computed; ``values = clean + delta``) and the fraction is computed from it.
* **TransformerLens cross-check** (:mod:`mech.interventions.tl_bridge`) returns bare ``[layers, positions]``
  grids: it exists to be compared element-wise with the nnsight grid, over residual sites nnsight lacks
  (``resid_pre``), and takes token indices only (a bridge has no rendering).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mech.errors import MechError

SUFFICIENCY, NECESSITY = "sufficiency", "necessity"
DENOISING, NOISING = "denoising", "noising"
RUN_BASE, RUN_STUDENT = (SUFFICIENCY, DENOISING), (NECESSITY, NOISING)
SWEPT = "swept"  # the position label of values_all: every swept position of the layer at once


def _check_mode(mode: str) -> str:
    if mode not in RUN_BASE + RUN_STUDENT:
        raise MechError(f"unknown mode {mode!r}: expected one of {', '.join(RUN_BASE + RUN_STUDENT)}")
    return mode


@dataclass
class Effect:
    """The metric after intervening on ``site`` at each (layer, position) cell; see the module doc."""

    method: str  # "dwg" | "patching" | "atp" | "atp*"
    site: str  # the activation site (patching, AtP) or the mask's components (DWG)
    layers: list[Any]  # row labels of values
    positions: list[Any]  # column labels of values
    values: torch.Tensor  # [len(layers), len(positions)] float32 on the CPU
    base: float
    student: float
    mode: str = SUFFICIENCY  # sufficiency | denoising run the base; necessity | noising run the student
    name: str = ""
    values_all: torch.Tensor | None = None  # [len(layers)]: each row's positions patched at once
    delta: torch.Tensor | None = None  # values − clean as computed directly (AtP)

    def __post_init__(self) -> None:
        _check_mode(self.mode)
        shape = (len(self.layers), len(self.positions))
        if tuple(self.values.shape) != shape:
            raise MechError(f"values of shape {tuple(self.values.shape)} for {shape[0]} layers × {shape[1]} "
                            "positions: give one value per (layer, position) cell")

    @property
    def runs_student(self) -> bool:
        """Whether the student is the model that runs (necessity / noising), else the base does."""
        return self.mode in RUN_STUDENT

    @property
    def clean(self) -> float:
        """The metric of the model that runs, unpatched."""
        return self.student if self.runs_student else self.base

    @property
    def source(self) -> float:
        """The metric of the model the intervention draws from."""
        return self.base if self.runs_student else self.student

    @property
    def effect(self) -> float:
        """``student − base``: the whole effect fractions are measured against."""
        return self.student - self.base

    @property
    def change(self) -> torch.Tensor:
        """``values − clean``: the metric change each cell's intervention causes (AtP: its estimate)."""
        return self.delta if self.delta is not None else self.values - self.clean

    def _fraction(self, values: torch.Tensor, delta: torch.Tensor | None = None) -> torch.Tensor:
        # float64, so a small effect keeps its digits; a zero effect has no fraction: NaN, not a blow-up
        if abs(self.effect) < 1e-12:
            return torch.full(values.shape, float("nan"), dtype=torch.float64)
        shifted = values.double() - self.base if delta is None else delta.double() + (self.clean - self.base)
        return shifted / self.effect

    @property
    def fraction(self) -> torch.Tensor:
        """``(values − base) / (student − base)`` per cell, float64."""
        return self._fraction(self.values, self.delta)

    @property
    def fraction_all(self) -> torch.Tensor | None:
        return None if self.values_all is None else self._fraction(self.values_all)

    def _moved(self, fraction: torch.Tensor) -> torch.Tensor:
        return 1.0 - fraction if self.runs_student else fraction

    @property
    def fraction_moved(self) -> torch.Tensor:
        """Share of the gap from the running model to the source closed: recovered, or destroyed (noising)."""
        return self._moved(self.fraction)

    @property
    def fraction_moved_all(self) -> torch.Tensor | None:
        frac = self.fraction_all
        return None if frac is None else self._moved(frac)

    def _row(self, layer: Any, position: Any, value: float, fraction: float) -> dict[str, Any]:
        return {"method": self.method, "name": self.name, "site": self.site, "layer": layer, "position": position,
                "mode": self.mode, "value": value, "base": self.base, "student": self.student,
                "effect": self.effect, "fraction": fraction}

    def to_rows(self) -> list[dict[str, Any]]:
        """One row per (layer, position) cell, then one per layer for ``values_all`` (position "swept")."""
        frac = self.fraction
        rows = [self._row(layer, pos, float(self.values[i, j]), float(frac[i, j]))
                for i, layer in enumerate(self.layers) for j, pos in enumerate(self.positions)]
        if self.values_all is not None:
            frac_all = self.fraction_all
            rows += [self._row(layer, SWEPT, float(self.values_all[i]), float(frac_all[i]))
                     for i, layer in enumerate(self.layers)]
        return rows
