"""The one position contract of every intervention: which token positions of a prompt a spec names.

A position spec (:data:`PositionSpec`) is resolved against the prompt that is run, so it follows the
rendering's own segment labels and tokenizer offsets, never guesses about token boundaries:

* ``"all"`` / ``"none"``;
* a segment label (``default_system``, ``custom_system``, ``template``, ``user``, ``assistant``): a label the
  rendering does not carry is an error (e.g. ``default_system`` under a ``none`` context), not an empty set;
* ``"shared"`` / ``"non_shared"``: the positions the prompt shares (or does not share) with the training
  context (:func:`mech.context.shared_positions`; needs the training rendering);
* ``"readout"``: the last prompt token, where the first answer token's metric is read; ``"shared_minus_readout"``:
  the shared positions without it (the readout is always shared, so "shared" alone confounds the two);
* ints, or a tuple / list of ints (negative indices count from the end, as in Python);
* ``"substring:<text>"``: every token overlapping any occurrence of ``<text>`` in the rendered text (located
  through the tokenizer's character offsets);
* at resolution only, a bool vector over the prompt (e.g. a resolved Mask's ``pos``), checked for length.

The prompt is a :class:`mech.context.Rendered`, or just its length when the caller has bare token ids: then
only the specs that need no rendering (``all``, ``none``, indices, a bool vector) resolve. Grafting
(:class:`mech.interventions.mask.Mask`), activation patching and attribution all resolve positions here.
"""

from __future__ import annotations

import difflib
from typing import Any, Union

import torch

from mech.context import SEGMENT_LABELS, Rendered, shared_positions
from mech.errors import MechError

ALL, NONE, SHARED, NON_SHARED = "all", "none", "shared", "non_shared"
READOUT, SHARED_MINUS_READOUT = "readout", "shared_minus_readout"
SUBSTRING_PREFIX = "substring:"
POSITION_NAMES: tuple[str, ...] = (ALL, NONE, SHARED, NON_SHARED, READOUT, SHARED_MINUS_READOUT, *SEGMENT_LABELS)

PositionSpec = Union[str, int, tuple[int, ...]]
Prompt = Union[Rendered, int]  # a rendering, or the length of a prompt given as bare ids

_EXPECTED = f"one of {', '.join(POSITION_NAMES)}, '{SUBSTRING_PREFIX}<text>' or a tuple of token indices"


def normalise_positions(spec: Any) -> str | tuple[int, ...]:
    """A hashable, syntactically valid position spec; the prompt-dependent checks happen in resolution."""
    if isinstance(spec, bool) or isinstance(spec, torch.Tensor):
        raise MechError(f"invalid position spec {spec!r}: expected {_EXPECTED}")
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
        raise MechError(f"unknown position spec {spec!r}{hint}: expected {_EXPECTED}")
    try:
        items = tuple(spec)
    except TypeError:
        raise MechError(f"invalid position spec {spec!r}: expected {_EXPECTED}") from None
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
        raise MechError(f"invalid position list {spec!r}: expected token indices (ints)")
    return items


def spec_label(spec: Any) -> str:
    """A short text form of a (normalised) position, layer or component spec, for labels and table cells."""
    return str(spec) if isinstance(spec, (str, int)) else ",".join(map(str, spec))


def _substring_positions(rendered: Rendered, needle: str) -> list[int]:
    """Tokens overlapping any (non-overlapping, left to right) occurrence of ``needle`` in the text."""
    spans, at = [], rendered.text.find(needle)
    while at >= 0:
        spans.append((at, at + len(needle)))
        at = rendered.text.find(needle, at + len(needle))
    return [t for t, (s, e) in enumerate(rendered.offsets) if s < e and any(s < b and e > a for a, b in spans)]


def _prompt_length(prompt: Prompt) -> int:
    if isinstance(prompt, Rendered):
        return len(prompt)
    if isinstance(prompt, bool) or not isinstance(prompt, int) or prompt < 1:
        raise MechError(f"cannot resolve positions on {type(prompt).__name__}: pass a mech.context.Rendered or "
                        "the prompt's length")
    return prompt


def _bool_vector(spec: torch.Tensor, n: int) -> torch.Tensor:
    if spec.dtype != torch.bool or spec.shape != (n,):
        raise MechError(f"position mask has shape {tuple(spec.shape)} ({spec.dtype}) but the prompt has {n} tokens: "
                        "resolve the mask against this prompt")
    return spec.detach().cpu().clone()


def _needs_rendering(spec: str, prompt: Prompt) -> Rendered:
    if not isinstance(prompt, Rendered):
        raise MechError(f"position spec {spec!r} needs the rendered prompt: pass a mech.context.Rendered "
                        "(mech.context.render) instead of bare token ids, or give token indices")
    return prompt


def _named_positions(spec: str, prompt: Prompt, train_rendered: Rendered | None, out: torch.Tensor) -> torch.Tensor:
    """``out`` (all False) filled for a named, shared or substring spec."""
    rendered = _needs_rendering(spec, prompt)
    if spec in (SHARED, NON_SHARED):
        if train_rendered is None:
            raise MechError(f"position spec {spec!r} needs the training context's rendering: pass train_rendered "
                            "(mech.context.render of a training row)")
        out[shared_positions(rendered, train_rendered)] = True
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


def resolve_positions(spec: Any, prompt: Prompt, train_rendered: Rendered | None = None) -> torch.Tensor:
    """[len(prompt)] bool of the positions ``spec`` names; MechError for anything the prompt lacks.

    ``prompt`` is the Rendered prompt that is run, or its length when only bare ids are at hand.
    """
    n = _prompt_length(prompt)
    if isinstance(spec, torch.Tensor) and spec.dtype == torch.bool:
        return _bool_vector(spec, n)
    spec = normalise_positions(spec)
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
    if spec == READOUT:
        out[-1] = True
        return out
    if spec == SHARED_MINUS_READOUT:
        out = _named_positions(SHARED, prompt, train_rendered, out)
        out[-1] = False
        return out
    return _named_positions(spec, prompt, train_rendered, out)


def position_indices(spec: Any, prompt: Prompt, train_rendered: Rendered | None = None) -> list[int]:
    """:func:`resolve_positions` as sorted distinct indices (what a sweep iterates over)."""
    return resolve_positions(spec, prompt, train_rendered).nonzero().flatten().tolist()
