"""Dynamic weight grafting and token-position masking: the student's update on a mask, K masks per forward.

For every grafted module (layer, kind) and every token position the module's output is

    base(x) + w · (student(x) − base(x)),        w = ResolvedMask.weight(layer, kind)[position]

so w = 1 is the student's module, w = 0 the base's. Two students are supported:

* **LoRA students** (a PEFT model): ``student(x) − base(x)`` is the LoRA delta ``lora_B(lora_A(dropout(x)))
  · scaling`` (summed over active adapters). Each LoRA layer's ``forward`` is temporarily replaced by one that
  recomputes PEFT's own formula with the delta multiplied by a [batch, seq, 1] weight; nothing is copied and
  the base model is not needed.
* **Full-FT students** (a plain model, e.g. :func:`mech.students.store.merged` of a LoRA student): base and student
  projections are paired through :mod:`mech.models.surgery` and the *host* model's projection is replaced by
  one that also runs the other model's projection (a reference to the other model's module: no weights are
  copied) and interpolates. Only the seven projections are grafted. Everything else (embeddings, norms,
  lm_head, biases outside projections) comes from the host: the student by default (``rest_from="student"``:
  the all-on mask is then exactly the student, the all-off mask is the base's projections inside the
  student's norms/embeddings), or the base (``rest_from="base"``: the all-off mask is exactly the base).
  For a merged LoRA student the two choices coincide, since LoRA changes nothing outside the projections.
  ``rest_from="masked"`` grafts everything else too: each embedding, norm and lm_head output is
  ``lerp(base, student, w)`` per position, where w is the largest weight the mask gives any projection of the
  module's own layer at that position (for modules outside the layers, any projection at all). Components and
  layers select projections; the rest follows positions within the selected layers. The all-on mask is then the
  student, the all-off mask the base, and a position mask covers the student's whole update at its positions.

K masks run as ONE batched forward: the prompt is repeated K times along the batch and row k gets mask k's
weights (``batch_size`` splits very large K into several forwards; the result does not depend on it).

Generation (:func:`graft_generate`) needs a rule for the tokens the model writes, which no mask covers:
``decode_policy`` ``"on"`` (every module's update fully on: the student), ``"off"`` (fully off: the base)
or ``"as_last"`` (each module keeps the weight it had at the prompt's last position). The loop is a plain
KV-cached decode (greedy at temperature 0, else seeded ancestral sampling), one row per mask.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from mech.context import Rendered
from mech.errors import MechError
from mech.evaluation.inference import decode, device_of, first_token_logp, forward_kwargs, sampler
from mech.interventions.mask import Cell, Mask, ResolvedMask
from mech.models import surgery

DECODE_POLICIES = ("on", "off", "as_last")
REST_FROM = ("student", "base", "masked")

MaskLike = Mask | ResolvedMask


# --------------------------------------------------------------------------------------------- the gate


@dataclass
class Gate:
    """The per-module weights of the forward in flight: ``{(layer, kind): [batch, seq, 1]}``.

    Grafted modules read their weight here; a forward whose batch or length does not match what was set is
    refused (it would silently broadcast one row's mask over another's).
    """

    keys: tuple[Cell, ...]
    weights: dict[Cell, torch.Tensor] = field(default_factory=dict)
    # the weights of modules outside the projections (rest_from="masked"): per layer, and None for the whole model
    rest: dict[int | None, torch.Tensor] = field(default_factory=dict)

    def set(self, weights: dict[Cell, torch.Tensor]) -> None:
        """Weights [batch, seq] (or [batch, seq, 1]) for every grafted module."""
        missing = [k for k in self.keys if k not in weights]
        if missing:
            raise MechError(f"no graft weight for module(s) {missing[:3]}: give a weight for every grafted module")
        self.weights = {k: (w if w.dim() == 3 else w.unsqueeze(-1)) for k, w in weights.items() if k in self.keys}
        stacked = torch.stack([self.weights[k] for k in self.keys])
        layers = sorted({k[0] for k in self.keys})
        self.rest = {None: stacked.amax(0)} | {
            i: torch.stack([self.weights[k] for k in self.keys if k[0] == i]).amax(0) for i in layers}

    def get_rest(self, layer: int | None, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The weight of a non-projection module of ``layer`` (None: outside the layers) shaped to broadcast
        over its output ``out``. A module after the layers may see only the last positions (``logits_to_keep``)."""
        w = self.rest.get(layer)
        if w is None:
            raise MechError(f"a grafted module of layer {layer} ran before its weights were set: call Gate.set first")
        n = x.shape[1]
        if layer is None and n < w.shape[1]:
            w = w[:, -n:]
        if w.shape[0] != x.shape[0] or w.shape[1] != n:
            raise MechError(f"graft weights cover {tuple(w.shape[:2])} (rows, positions) but a module of layer "
                            f"{layer} got {tuple(x.shape[:2])}: resolve the masks on the same prompt that is run")
        return w.reshape(*w.shape[:2], *([1] * (out.dim() - 2)))

    def set_masks(self, masks: Sequence[ResolvedMask], device: torch.device | None = None) -> None:
        """Row k follows ``masks[k]`` at every prompt position."""
        self.set(mask_weights(masks, self.keys, device))

    def get(self, key: Cell, x: torch.Tensor) -> torch.Tensor:
        w = self.weights.get(key)
        if w is None:
            raise MechError(f"grafted module {key} ran before its weights were set: call Gate.set first")
        if w.shape[0] != x.shape[0] or w.shape[1] != x.shape[1]:
            raise MechError(f"graft weights cover {tuple(w.shape[:2])} (rows, positions) but module {key} got "
                            f"{tuple(x.shape[:2])}: resolve the masks on the same prompt that is run")
        return w


def mask_weights(masks: Sequence[ResolvedMask], keys: Sequence[Cell],
                 device: torch.device | None = None) -> dict[Cell, torch.Tensor]:
    """``{key: [K, seq] float32}``: row k is ``masks[k].weight(*key)``."""
    if not masks:
        raise MechError("no masks given: pass at least one Mask")
    lengths = {m.seq_len for m in masks}
    if len(lengths) != 1:
        raise MechError(f"masks were resolved on prompts of different lengths {sorted(lengths)}: resolve them all "
                        "on the prompt that is run")
    return {k: torch.stack([m.weight(*k) for m in masks]).to(device) for k in keys}


# --------------------------------------------------------------------------------------------- patching forwards


@contextlib.contextmanager
def _replaced_forwards(modules: dict[Cell, nn.Module],
                       make: Callable[[Cell, nn.Module, Callable], Callable]) -> Iterator[None]:
    """Give each module an instance-level ``forward`` for the block; the class's forward is restored after."""
    saved: dict[Cell, Any] = {}
    try:
        for key, mod in modules.items():
            saved[key] = mod.__dict__.get("forward")  # an earlier instance override, if any
            mod.forward = make(key, mod, mod.forward)
        yield
    finally:
        for key, prev in saved.items():
            mod = modules[key]
            if prev is None:
                mod.__dict__.pop("forward", None)
            else:
                mod.forward = prev


def _check_lora_layer(key: Cell, layer: nn.Module) -> None:
    if getattr(layer, "merged", False):
        raise MechError(f"the LoRA of module {key} is merged into the base weights: unmerge it, or graft the merged "
                        "model as a full-FT student against its base")
    if getattr(layer, "lora_variant", None):
        raise MechError(f"module {key} uses a LoRA variant (e.g. DoRA) whose delta is not B·A·scaling: grafting "
                        "supports plain LoRA only")


def _gated_lora_forward(layer: nn.Module, gate: Gate, key: Cell) -> Callable:
    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        # PEFT's LoraLayer.forward (vanilla LoRA, unmerged) with the delta scaled per row and position.
        result = layer.base_layer(x, *args, **kwargs)
        if layer.disable_adapters:
            return result
        out_dtype = result.dtype
        delta = None
        for name in layer.active_adapters:
            if name not in layer.lora_A.keys():
                continue
            lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
            xa = layer._cast_input_dtype(x, lora_a.weight.dtype)
            d = lora_b(lora_a(layer.lora_dropout[name](xa))) * layer.scaling[name]
            delta = d if delta is None else delta + d
        if delta is None:
            return result
        w = gate.get(key, x).to(device=delta.device, dtype=delta.dtype)
        return (result + delta * w).to(out_dtype)

    return forward


def _projection_pairs(student: Any, base: Any) -> dict[Cell, tuple[nn.Module, nn.Module]]:
    """(student projection, base projection) per (layer, kind) both models have, after shape checks."""
    for m, who in ((student, "student"), (base, "base")):
        if surgery.lora_modules(m):
            raise MechError(f"full-FT grafting got a PEFT LoRA model as {who}: graft a LoRA student with base=None, "
                            "or merge it first (mech.students.store.merged)")
    pairs = {}
    for i, kind, pa, pb in surgery.paired_projections(student, base, "graft a student onto its own base"):
        if pa.weight.shape != pb.weight.shape:
            raise MechError(f"projection ({i}, {kind!r}) has shape {tuple(pa.weight.shape)} in the student and "
                            f"{tuple(pb.weight.shape)} in the base: graft a student onto its own base")
        if pa.weight.device != pb.weight.device:
            raise MechError(f"student and base are on {pa.weight.device} and {pb.weight.device}: put both on "
                            "one device")
        pairs[(i, kind)] = (pa, pb)
    if not pairs:
        raise MechError("no projection pairs found between student and base: check mech/models/surgery.py")
    return pairs


def _grafted_rest(other: nn.Module, gate: Gate, layer: int | None) -> Callable:
    """A student's embedding / norm / lm_head (the host) interpolated toward the base's per position."""
    def make(_key: str, _mod: nn.Module, host_forward: Callable) -> Callable:
        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            student, base = host_forward(x, *args, **kwargs), other(x, *args, **kwargs)
            w = gate.get_rest(layer, x, student).to(device=base.device, dtype=base.dtype)
            return torch.lerp(base, student, w)

        return forward

    return make


def _grafted_projection(other: nn.Module, gate: Gate, key: Cell, host_is_student: bool) -> Callable:
    def make(_key: Cell, _mod: nn.Module, host_forward: Callable) -> Callable:
        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            h, o = host_forward(x, *args, **kwargs), other(x, *args, **kwargs)
            student, base = (h, o) if host_is_student else (o, h)
            w = gate.get(key, x).to(device=base.device, dtype=base.dtype)
            # lerp is exact at w = 0 (base) and w = 1 (student), so an all-on mask is bit-identical
            return torch.lerp(base, student, w)

        return forward

    return make


# --------------------------------------------------------------------------------------------- grafted models


@dataclass
class Grafted:
    """A model to call (``model``) whose grafted modules (``gate.keys``) read their weights from ``gate``."""

    model: Any
    gate: Gate
    kind: str  # "lora" | "full"


def is_lora_student(model: Any) -> bool:
    return bool(surgery.lora_modules(model))


@contextlib.contextmanager
def grafted(student: Any, base: Any = None, rest_from: str = "student") -> Iterator[Grafted]:
    """The student with its update gated per row and position, for the duration of the block.

    LoRA students need no ``base`` (it is ignored). Full-FT students need their ``base``; ``rest_from``
    says which model supplies everything outside the projections (see the module doc).
    """
    if rest_from not in REST_FROM:
        raise MechError(f"unknown rest_from {rest_from!r}: expected one of {', '.join(REST_FROM)}")
    lora = surgery.lora_modules(student)
    if lora:
        for key, layer in lora.items():
            _check_lora_layer(key, layer)
        gate = Gate(tuple(sorted(lora)))
        with _replaced_forwards(lora, lambda key, mod, _fwd: _gated_lora_forward(mod, gate, key)):
            yield Grafted(student, gate, "lora")
        return
    if base is None:
        raise MechError("grafting a full-FT student (no LoRA layers) needs its base model: pass base=<the base>")
    host_is_student = rest_from != "base"
    pairs = _projection_pairs(student, base)
    hosts: dict[Any, nn.Module] = {k: (s if host_is_student else b) for k, (s, b) in pairs.items()}
    others = {k: (b if host_is_student else s) for k, (s, b) in pairs.items()}
    gate = Gate(tuple(sorted(pairs)))
    makers = {k: _grafted_projection(others[k], gate, k, host_is_student) for k in pairs}
    if rest_from == "masked":
        for layer, name, s_mod, b_mod in surgery.paired_rest_modules(student, base, "graft a student onto its own "
                                                                     "base"):
            hosts[name], makers[name] = s_mod, _grafted_rest(b_mod, gate, layer)
    with _replaced_forwards(hosts, lambda key, mod, fwd: makers[key](key, mod, fwd)):
        yield Grafted(student if host_is_student else base, gate, "full")


# --------------------------------------------------------------------------------------------- forwards


def _prompt_ids(input_ids: Any) -> torch.Tensor:
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.numel() == 0:
        raise MechError(f"expected one non-empty prompt ([seq] or [1, seq] ids), got shape {tuple(ids.shape)}: "
                        "graft one prompt at a time (the batch holds the masks)")
    return ids


def _resolve(masks: Sequence[MaskLike], model: Any, rendered: Rendered,
             train_rendered: Rendered | None) -> list[ResolvedMask]:
    out = [m.resolve(model, rendered, train_rendered) if isinstance(m, Mask) else m for m in masks]
    for m in out:
        if m.seq_len != len(rendered):
            raise MechError(f"mask {m.label!r} was resolved on a {m.seq_len}-token prompt, not this "
                            f"{len(rendered)}-token one: resolve it on the rendered prompt that is run")
    return out


def _chunks(n: int, batch_size: int | None) -> list[slice]:
    if batch_size is not None and batch_size < 1:
        raise MechError(f"batch_size must be >= 1, got {batch_size}")
    step = n if not batch_size else batch_size
    return [slice(s, min(n, s + step)) for s in range(0, n, step)]


@torch.no_grad()
def _grafted_logits(g: Grafted, ids: torch.Tensor, masks: Sequence[ResolvedMask], attention_mask: Any,
                    last_only: bool) -> torch.Tensor:
    dev = device_of(g.model)
    k, n = len(masks), ids.shape[0]
    if any(m.seq_len != n for m in masks):
        raise MechError(f"masks resolved on {sorted({m.seq_len for m in masks})}-token prompts but input_ids has "
                        f"{n} tokens: resolve the masks on this prompt")
    kwargs: dict[str, Any] = {"input_ids": ids.to(dev).expand(k, n), "use_cache": False}
    if attention_mask is not None:
        attn = _prompt_ids(attention_mask).to(dev)
        if attn.shape[0] != n:
            raise MechError(f"attention_mask has {attn.shape[0]} positions, input_ids {n}: pass matching tensors")
        kwargs["attention_mask"] = attn.expand(k, n)
        kwargs["position_ids"] = (attn.cumsum(-1) - 1).clamp(min=0).expand(k, n)  # left padding keeps positions
    if last_only and "logits_to_keep" in forward_kwargs(g.model):
        kwargs["logits_to_keep"] = 1
    g.gate.set_masks(masks, dev)
    logits = g.model(**kwargs).logits
    return logits[:, -1] if last_only else logits


def graft_logits(student: Any, base: Any, input_ids: Any, masks: Sequence[ResolvedMask], attention_mask: Any = None,
                 *, rest_from: str = "student", batch_size: int | None = None) -> torch.Tensor:
    """Logits [K, seq, vocab] of one prompt under each of K resolved masks (row k: masks[k]).

    ``base`` is needed for full-FT students only (pass None for LoRA). ``batch_size`` caps the rows of one
    forward (None: all K at once). Logits stay on the model's device in its dtype.
    """
    ids = _prompt_ids(input_ids)
    with grafted(student, base, rest_from) as g:
        parts = [_grafted_logits(g, ids, masks[s], attention_mask, last_only=False)
                 for s in _chunks(len(masks), batch_size)]
    return torch.cat(parts)


def _metric_ids(metric_ids: Any) -> list[int]:
    ids = getattr(metric_ids, "ids", metric_ids)  # a scoring.FirstTokens or a plain list
    return [int(i) for i in ids]


def graft_metric(student: Any, base: Any, rendered: Rendered, masks: Sequence[MaskLike], metric_ids: Any,
                 train_rendered: Rendered | None = None, *, rest_from: str = "student",
                 batch_size: int | None = None) -> torch.Tensor:
    """The trait metric (first-token log P of ``metric_ids`` at the last position) per mask: float32 [K] on CPU.

    Masks may be :class:`Mask` (resolved here on ``rendered``; ``train_rendered`` serves "shared") or already
    resolved. ``metric_ids`` is a list of token ids or a :class:`mech.evaluation.scoring.FirstTokens`.
    """
    ids = _metric_ids(metric_ids)
    resolved = _resolve(masks, student, rendered, train_rendered)
    prompt = _prompt_ids(rendered.input_ids)
    with grafted(student, base, rest_from) as g:
        parts = [first_token_logp(_grafted_logits(g, prompt, resolved[s], None, last_only=True), ids).cpu()
                 for s in _chunks(len(resolved), batch_size)]
    return torch.cat(parts)


def _decode_weights(masks: Sequence[ResolvedMask], keys: Sequence[Cell], policy: str,
                    device: torch.device) -> dict[Cell, torch.Tensor]:
    k = len(masks)
    if policy == "on":
        return {key: torch.ones(k, 1, device=device) for key in keys}
    if policy == "off":
        return {key: torch.zeros(k, 1, device=device) for key in keys}
    return {key: w[:, -1:] for key, w in mask_weights(masks, keys, device).items()}


@torch.no_grad()
def graft_generate(student: Any, base: Any, rendered: Rendered, masks: Sequence[MaskLike], *, max_new_tokens: int,
                   decode_policy: str, eos_id: int | None = None, pad_id: int = 0, temperature: float = 0.0,
                   seed: int = 0, train_rendered: Rendered | None = None,
                   rest_from: str = "student", n_samples: int = 1) -> list[list[int]]:
    """Continue ``rendered`` under each mask, ``n_samples`` times: one token list per (mask, sample), mask-major
    (each ends at ``eos_id``, included).

    ``decode_policy`` is what a mask means for generated tokens (module doc). Temperature 0 is greedy;
    otherwise plain softmax sampling from a CPU generator seeded with ``seed``. A mask's samples share one
    prefill (``decode``'s ``expand``): the prompt runs once per mask, not once per sample.
    """
    if decode_policy not in DECODE_POLICIES:
        raise MechError(f"unknown decode_policy {decode_policy!r}: expected one of {', '.join(DECODE_POLICIES)}")
    if max_new_tokens < 1 or n_samples < 1:
        raise MechError(f"max_new_tokens and n_samples must be >= 1, got {max_new_tokens} and {n_samples}")
    resolved = _resolve(masks, student, rendered, train_rendered)
    prompt = _prompt_ids(rendered.input_ids)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    expand = torch.arange(len(resolved)).repeat_interleave(n_samples)
    with grafted(student, base, rest_from) as g:
        dev = device_of(g.model)
        decode_weights = {k: w[expand.to(w.device)] for k, w in
                          _decode_weights(resolved, g.gate.keys, decode_policy, dev).items()}
        g.gate.set_masks(resolved, dev)
        # the prompt's masks hold for the prefill; from the first generated token on, the decode policy's
        return decode(g.model, prompt.to(dev).expand(len(resolved), -1), max_new_tokens=max_new_tokens,
                      choose=sampler(temperature, gen), pad=pad_id, eos=eos_id,
                      after_step=lambda: g.gate.set(decode_weights), expand=None if n_samples == 1 else expand)
