"""One mask for every localisation method: positions × components × layers, and what "inside" means.

A :class:`Mask` names a region of the cube (token position) × (projection kind) × (decoder layer) and a
*mode*:

* ``sufficiency``: the student's update is ON only inside the region (everything else is the base), which
  asks "is this region enough to carry the effect?";
* ``necessity``: the update is ON everywhere except inside the region, which asks "is the effect lost
  without it?".

Positions are any :data:`mech.interventions.positions.PositionSpec` (indices, segment labels, shared /
non-shared tokens given the training rendering, substrings through offsets), resolved by the one resolver
:func:`mech.interventions.positions.resolve_positions` that patching and attribution use too.

Components are anything :func:`mech.models.surgery.resolve_components` takes ("all", "attn", "mlp", "v",
"q,v", a tuple); layers anything :func:`mech.models.surgery.resolve_layers` takes (an int, a tuple,
"first_half", "0:2"). :meth:`Mask.resolve` turns a mask into a :class:`ResolvedMask`: a bool vector over
positions, the selected (layer, kind) cells, and :meth:`ResolvedMask.weight` — the per-position factor
(1.0 = the student's update is on) that grafting applies to one module.

The complement of a product region ``positions × cells`` is not itself a product, so :func:`complement`
returns the mask of the same region in the other mode: the necessity mask of a region is exactly the
sufficiency mask of its complement, and a mask's weights plus its complement's sum to 1 in every cell.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

import torch

from mech.context import Rendered
from mech.errors import MechError
from mech.interventions.positions import (
    ALL,
    PositionSpec,
    Prompt,
    normalise_positions,
    position_indices,
    resolve_positions,
    spec_label,
)
from mech.interventions.result import NECESSITY, SUFFICIENCY
from mech.models import surgery

MODES = (SUFFICIENCY, NECESSITY)

LayerSpec = Union[str, int, tuple[int, ...]]
Cell = tuple[int, str]  # (layer index, projection kind)


# --------------------------------------------------------------------------------------------- spec checks


def _normalise_layers(spec: Any) -> LayerSpec:
    if isinstance(spec, (str, int)):
        return spec
    try:
        return tuple(spec)
    except TypeError:
        raise MechError(f"invalid layer spec {spec!r}: expected an int, a tuple, 'a:b' or a depth name") from None


def _normalise_components(spec: Any) -> tuple[str, ...] | str:
    surgery.resolve_components(spec)  # fail at construction on a name no architecture has ("xyz")
    return spec if isinstance(spec, str) else tuple(str(c) for c in spec)


# --------------------------------------------------------------------------------------------- masks


@dataclass(frozen=True)
class Mask:
    """A region positions × components × layers and a mode; see the module doc for the spec grammar."""

    positions: PositionSpec
    components: tuple[str, ...] | str = "all"
    layers: LayerSpec = "all"
    mode: str = SUFFICIENCY
    name: str = ""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise MechError(f"unknown mask mode {self.mode!r}: expected one of {', '.join(MODES)}")
        object.__setattr__(self, "positions", normalise_positions(self.positions))
        object.__setattr__(self, "components", _normalise_components(self.components))
        object.__setattr__(self, "layers", _normalise_layers(self.layers))

    @property
    def label(self) -> str:
        """``name`` when set, else a description such as ``sufficiency[default_system × v × all]``."""
        if self.name:
            return self.name
        pos, comp, lay = (spec_label(s) for s in (self.positions, self.components, self.layers))
        return f"{self.mode}[{pos} × {comp} × {lay}]"

    def resolve(self, model: Any, rendered: Rendered, train_rendered: Rendered | None = None) -> "ResolvedMask":
        """This mask on one rendered prompt of ``model`` (plain, PEFT-wrapped or nnsight)."""
        universe = model_cells(model)
        kinds_present = {k for _, k in universe}
        kinds = surgery.resolve_components(self.components)
        missing = [k for k in kinds if k not in kinds_present]
        if missing and self.components != ALL:
            have = ", ".join(k for k in surgery.COMPONENTS if k in kinds_present)
            raise MechError(f"component(s) {', '.join(missing)} of mask {self.label!r} are not in this "
                            f"architecture: use some of {have}")
        layers = surgery.resolve_layers(model, self.layers)
        cells = frozenset((i, k) for i in layers for k in kinds if (i, k) in universe)
        pos = resolve_positions(self.positions, rendered, train_rendered)
        return ResolvedMask(mask=self, pos=pos, cells=cells, universe=universe)


def complement(mask: Mask) -> Mask:
    """The structural complement: the same region in the other mode (see the module doc).

    ``complement(M)`` switches the update on exactly where ``M`` switches it off, so the two partition the
    position × component × layer cube, and ``complement(complement(M)) == M`` (names aside).
    """
    other = NECESSITY if mask.mode == SUFFICIENCY else SUFFICIENCY
    name = "" if not mask.name else (mask.name[len("not "):] if mask.name.startswith("not ") else f"not {mask.name}")
    return Mask(mask.positions, mask.components, mask.layers, other, name)


@dataclass(frozen=True, eq=False)  # holds a tensor: compare masks, not resolutions
class ResolvedMask:
    """A mask on one prompt: ``pos`` [seq_len] bool, ``cells`` selected, ``universe`` every (layer, kind)."""

    mask: Mask
    pos: torch.Tensor
    cells: frozenset[Cell]
    universe: frozenset[Cell] = field(repr=False)

    @property
    def mode(self) -> str:
        return self.mask.mode

    @property
    def seq_len(self) -> int:
        return int(self.pos.shape[0])

    @property
    def label(self) -> str:
        return self.mask.label

    def inside(self, layer: int, kind: str) -> torch.Tensor:
        """[seq_len] bool: the positions of the region in module (layer, kind) (empty if the cell is out)."""
        self._check_cell(layer, kind)
        return self.pos.clone() if (layer, kind) in self.cells else torch.zeros_like(self.pos)

    def weight(self, layer: int, kind: str) -> torch.Tensor:
        """[seq_len] float32: 1.0 where the student's update of module (layer, kind) is on at that position."""
        w = self.inside(layer, kind).float()
        return w if self.mode == SUFFICIENCY else 1.0 - w

    def grid(self) -> torch.Tensor:
        """[n_layers, len(COMPONENTS), seq_len] float32 of every weight (0 for kinds the model lacks)."""
        n_layers = 1 + max(i for i, _ in self.universe)
        out = torch.zeros(n_layers, len(surgery.COMPONENTS), self.seq_len)
        for i, k in self.universe:
            out[i, surgery.COMPONENTS.index(k)] = self.weight(i, k)
        return out

    def _check_cell(self, layer: int, kind: str) -> None:
        if (layer, kind) not in self.universe:
            kinds = ", ".join(sorted({k for _, k in self.universe}, key=surgery.COMPONENTS.index))
            raise MechError(f"module ({layer}, {kind!r}) is not in this model: it has layers "
                            f"0..{max(i for i, _ in self.universe)} and kinds {kinds}")


# --------------------------------------------------------------------------------------------- resolution


def model_cells(model: Any) -> frozenset[Cell]:
    """Every (layer, kind) projection the model has."""
    cells = set()
    for i, layer in enumerate(surgery.get_layers(model)):
        for kind in surgery.COMPONENTS:
            try:
                surgery.get_projection(layer, kind)
            except MechError:
                continue
            cells.add((i, kind))
    if not cells:
        raise MechError("the model has no projections mech knows: check mech/models/surgery.py for its layout")
    return frozenset(cells)


def single_position_masks(n_positions: int, components: tuple[str, ...] | str = ALL, layers: LayerSpec = ALL,
                          mode: str = SUFFICIENCY) -> list[Mask]:
    """One mask per token position (what per-token heatmaps sweep)."""
    return [Mask((i,), components, layers, mode, name=f"{mode}@{i}") for i in range(n_positions)]


def sweep_region(positions: Any, layers: Any, model: Any, prompt: Prompt,
                 train_rendered: Rendered | None = None) -> tuple[list[int], list[int], str | None]:
    """(position indices, layer indices, mode or None) that a patching or attribution sweep covers.

    ``positions`` is a position spec, or a :class:`Mask` that brings its own layers and mode (leave ``layers``
    at "all"). Sweeps patch activations, not projection updates, so a mask's components must be "all"; sites
    are chosen separately (see :mod:`mech.interventions.result`).
    """
    mode = None
    if isinstance(positions, Mask):
        mask = positions
        if not (isinstance(layers, str) and layers == ALL):
            raise MechError(f"mask {mask.label!r} already names its layers ({spec_label(mask.layers)}): pass "
                            "layers='all' with a mask, or a position spec with layers=")
        if mask.components != ALL:
            raise MechError(f"mask {mask.label!r} selects components {spec_label(mask.components)}, but patching "
                            "and attribution patch activation sites: use components='all' and pass sites=")
        positions, layers, mode = mask.positions, mask.layers, mask.mode
    return position_indices(positions, prompt, train_rendered), surgery.resolve_layers(model, layers), mode
