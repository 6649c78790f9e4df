"""One mask for every localisation method: positions × components × layers, and what "inside" means.

A :class:`Mask` names a region of the cube (token position) × (projection kind) × (decoder layer) and a
*mode*:

* ``sufficiency``: the student's update is ON only inside the region (everything else is the base), which
  asks "is this region enough to carry the effect?";
* ``necessity``: the update is ON everywhere except inside the region, which asks "is the effect lost
  without it?".

Positions (:data:`PositionSpec`) are resolved against a :class:`mech.context.Rendered`, so they follow the
rendering's own segment labels and tokenizer offsets, never guesses about token boundaries:

* ``"all"`` / ``"none"``;
* a segment label (``default_system``, ``custom_system``, ``template``, ``user``, ``assistant``): a label the
  rendering does not carry is an error (e.g. ``default_system`` under a ``none`` context), not an empty mask;
* ``"shared"`` / ``"non_shared"``: the positions the prompt shares (or does not share) with the training
  context (:func:`mech.context.shared_positions`; needs the training rendering);
* a tuple of ints (negative indices count from the end, as in Python);
* ``"substring:<text>"``: every token overlapping any occurrence of ``<text>`` in the rendered text (located
  through the tokenizer's character offsets).

Components are anything :func:`mech.models.surgery.resolve_components` takes ("all", "attn", "mlp", "v",
"q,v", a tuple); layers anything :func:`mech.models.surgery.resolve_layers` takes (an int, a tuple,
"first_half", "0:2"). :meth:`Mask.resolve` turns a mask into a :class:`ResolvedMask`: a bool vector over
positions, the selected (layer, kind) cells, and :meth:`ResolvedMask.weight` — the per-position factor
(1.0 = the student's update is on) that grafting and patching apply to one module.

The complement of a product region ``positions × cells`` is not itself a product, so :func:`complement`
returns the mask of the same region in the other mode: the necessity mask of a region is exactly the
sufficiency mask of its complement, and a mask's weights plus its complement's sum to 1 in every cell.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Iterable, Union

import torch

from mech.context import SEGMENT_LABELS, Rendered, shared_positions
from mech.errors import MechError
from mech.models import surgery

SUFFICIENCY = "sufficiency"
NECESSITY = "necessity"
MODES = (SUFFICIENCY, NECESSITY)

ALL, NONE, SHARED, NON_SHARED = "all", "none", "shared", "non_shared"
SUBSTRING_PREFIX = "substring:"
POSITION_NAMES: tuple[str, ...] = (ALL, NONE, SHARED, NON_SHARED, *SEGMENT_LABELS)

PositionSpec = Union[str, tuple[int, ...]]
LayerSpec = Union[str, int, tuple[int, ...]]
Cell = tuple[int, str]  # (layer index, projection kind)


# --------------------------------------------------------------------------------------------- spec checks


def _normalise_positions(spec: Any) -> PositionSpec:
    """A hashable, syntactically valid position spec; the rendering-dependent checks happen in resolve."""
    if isinstance(spec, bool):
        raise MechError(f"invalid position spec {spec!r}: expected {', '.join(POSITION_NAMES)}, "
                        f"'{SUBSTRING_PREFIX}<text>' or a tuple of token indices")
    if isinstance(spec, int):
        return (spec,)
    if isinstance(spec, str):
        if spec.startswith(SUBSTRING_PREFIX):
            if not spec[len(SUBSTRING_PREFIX):]:
                raise MechError(f"empty substring in position spec {spec!r}: write '{SUBSTRING_PREFIX}<text>'")
            return spec
        if spec in POSITION_NAMES:
            return spec
        near = difflib.get_close_matches(spec, POSITION_NAMES, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise MechError(f"unknown position spec {spec!r}{hint}: expected one of {', '.join(POSITION_NAMES)}, "
                        f"'{SUBSTRING_PREFIX}<text>' or a tuple of token indices")
    try:
        items = tuple(spec)
    except TypeError:
        raise MechError(f"invalid position spec {spec!r}: expected a name, '{SUBSTRING_PREFIX}<text>' or a "
                        "tuple of token indices") from None
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
        raise MechError(f"invalid position list {spec!r}: expected token indices (ints)")
    return items


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
        object.__setattr__(self, "positions", _normalise_positions(self.positions))
        object.__setattr__(self, "components", _normalise_components(self.components))
        object.__setattr__(self, "layers", _normalise_layers(self.layers))

    @property
    def label(self) -> str:
        """``name`` when set, else a description such as ``sufficiency[default_system × v × all]``."""
        if self.name:
            return self.name
        pos = self.positions if isinstance(self.positions, str) else ",".join(map(str, self.positions))
        comp = self.components if isinstance(self.components, str) else ",".join(self.components)
        lay = self.layers if isinstance(self.layers, (str, int)) else ",".join(map(str, self.layers))
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
        layer_spec = list(self.layers) if isinstance(self.layers, tuple) else self.layers
        layers = surgery.resolve_layers(model, layer_spec)
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


def _substring_positions(rendered: Rendered, needle: str) -> list[int]:
    """Tokens overlapping any (non-overlapping, left to right) occurrence of ``needle`` in the text."""
    spans, at = [], rendered.text.find(needle)
    while at >= 0:
        spans.append((at, at + len(needle)))
        at = rendered.text.find(needle, at + len(needle))
    return [t for t, (s, e) in enumerate(rendered.offsets) if s < e and any(s < b and e > a for a, b in spans)]


def resolve_positions(spec: PositionSpec, rendered: Rendered, train_rendered: Rendered | None = None) -> torch.Tensor:
    """[len(rendered)] bool of the positions ``spec`` names; MechError for anything the rendering lacks."""
    spec = _normalise_positions(spec)
    n = len(rendered)
    out = torch.zeros(n, dtype=torch.bool)
    if isinstance(spec, tuple):
        for i in spec:
            if not -n <= i < n:
                raise MechError(f"position {i} is outside the prompt: it has {n} tokens (0..{n - 1}); pick an "
                                "index in range or a segment label")
            out[i] = True
        return out
    if spec == ALL:
        return ~out
    if spec == NONE:
        return out
    if spec in (SHARED, NON_SHARED):
        if train_rendered is None:
            raise MechError(f"position spec {spec!r} needs the training context's rendering: pass train_rendered "
                            "(mech.context.render of a training row)")
        for i in shared_positions(rendered, train_rendered):
            out[i] = True
        return out if spec == SHARED else ~out
    if spec.startswith(SUBSTRING_PREFIX):
        needle = spec[len(SUBSTRING_PREFIX):]
        found = _substring_positions(rendered, needle)
        if not found:
            raise MechError(f"substring {needle!r} not found in the rendered prompt: pick text that occurs in it "
                            f"(it starts {rendered.text[:60]!r})")
        out[found] = True
        return out
    hits = rendered.positions(spec)
    if not hits:
        present = ", ".join(dict.fromkeys(rendered.segments)) or "none"
        raise MechError(f"segment {spec!r} is absent from the rendered prompt (its segments: {present}): render it "
                        "with a context that has it or choose a present segment")
    out[hits] = True
    return out


def resolve_all(masks: Iterable[Mask], model: Any, rendered: Rendered,
                train_rendered: Rendered | None = None) -> list[ResolvedMask]:
    """:meth:`Mask.resolve` for each mask, in order."""
    return [m.resolve(model, rendered, train_rendered) for m in masks]


def single_position_masks(n_positions: int, components: tuple[str, ...] | str = ALL, layers: LayerSpec = ALL,
                          mode: str = SUFFICIENCY) -> list[Mask]:
    """One mask per token position (what per-token heatmaps sweep)."""
    return [Mask((i,), components, layers, mode, name=f"{mode}@{i}") for i in range(n_positions)]
