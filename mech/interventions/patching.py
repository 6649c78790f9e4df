"""Activation patching between a base model and its student, with nnsight.

One *site* is one activation of one decoder layer, read at every token position:

* ``resid``: the decoder layer's output (the residual stream after the layer);
* ``attn``: the attention block's output (before it is added to the residual);
* ``mlp``: the MLP block's output (before it is added to the residual);
* ``q`` / ``k`` / ``v``: the query / key / value projection's output (all heads together). Under PEFT this is
  the LoRA layer's output, i.e. it includes the student's LoRA delta.

Modules are found with :mod:`mech.models.surgery` only, so every architecture it knows works here.

Two directions, both answered by "run one model, overwrite one site at some positions with the other
model's activation there, read the metric at the last position":

* ``denoising``: run the BASE, patch in the STUDENT's activation → how much of the student's effect the site
  recovers;
* ``noising``: run the STUDENT, patch in the BASE's activation → how much of the effect survives without it
  (``fraction_moved``: how much it destroys).

Both return :class:`mech.interventions.result.Effect` grids, whose fraction is ``(m − m_base) / (m_student −
m_base)`` in either direction. Positions and layers follow the contract of every intervention: any position
spec (indices, segment labels, shared / non-shared given ``train_rendered``, substrings; segment labels need
the prompt as a :class:`mech.context.Rendered`) and any layer spec, or a
:class:`mech.interventions.mask.Mask` whose positions × layers are swept and whose mode sets the direction.

A LoRA student (``PeftModel``) is patched as it is, with no merge: nnsight wraps the HF model under the PEFT
wrapper, whose projections are LoRA layers, so the student's forward (LoRA on) is what runs. A merged copy
(:func:`mech.students.store.merged`) gives the same numbers up to float rounding and can be passed instead.

The metric is any callable on the last position's logits ``[batch, vocab] -> [batch]``; the trait metric
is :func:`first_token_metric` (log P of the target's first-token variants). One sweep runs, per (site,
layer), all positions as one batch of copies of the prompt, each copy patching its own position (plus, with
``include_all``, one copy patching every swept position at once).

nnsight traces must be written in real source files (nnsight reads the ``with`` block's source), which is
why the traces live in this module; values are requested in forward order within a trace.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch

from mech.context import Rendered
from mech.errors import MechError
from mech.evaluation.inference import device_of, first_token_logp
from mech.interventions.mask import sweep_region
from mech.interventions.positions import position_indices
from mech.interventions.result import DENOISING, NOISING, SUFFICIENCY, Effect
from mech.models import surgery

Metric = Callable[[torch.Tensor], torch.Tensor]  # last-position logits [batch, vocab] -> [batch]

RESID, ATTN, MLP = "resid", "attn", "mlp"
SITES: tuple[str, ...] = (RESID, ATTN, MLP, "q", "k", "v")
# Order in which a decoder layer produces its sites: nnsight serves values in forward order only.
_FORWARD_ORDER: tuple[str, ...] = ("q", "k", "v", ATTN, MLP, RESID)
DIRECTIONS: tuple[str, ...] = (DENOISING, NOISING)


# --------------------------------------------------------------------------------------------- metric


def first_token_metric(token_ids: Sequence[int]) -> Metric:
    """The trait metric: ``logsumexp(log_softmax(logits)[ids])`` = log P(first token is a target variant)."""
    ids = [int(i) for i in token_ids]
    if not ids:
        raise MechError("empty target token ids: pass first_token_ids(tokenizer, target).ids")
    return lambda logits: first_token_logp(logits, ids)


def evaluate_metric(metric: Metric, logits_last: torch.Tensor) -> torch.Tensor:
    """``metric`` on ``[batch, vocab]`` logits as a float32 ``[batch]`` tensor; MechError for another shape."""
    out = metric(logits_last.float())
    if not isinstance(out, torch.Tensor) or out.shape != logits_last.shape[:1]:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise MechError(f"the metric returned {shape} for logits of shape {tuple(logits_last.shape)}: it must map "
                        "[batch, vocab] logits to a [batch] tensor")
    return out.float()


# --------------------------------------------------------------------------------------------- input checks


def as_input_ids(prompt: Any) -> list[int]:
    """Token ids of one prompt: a list of ints, a 1-d / ``[1, T]`` tensor, or a Rendered (its input_ids)."""
    ids = getattr(prompt, "input_ids", prompt)
    if isinstance(ids, torch.Tensor):
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1:
            raise MechError(f"prompt tensor has shape {tuple(ids.shape)}: pass one prompt as [T] or [1, T] ids")
        ids = ids.tolist()
    try:
        out = [int(i) for i in ids]
    except (TypeError, ValueError):
        raise MechError(f"cannot read token ids from {type(prompt).__name__}: pass a list of ints, a tensor or a "
                        "mech.context.Rendered") from None
    if not out:
        raise MechError("empty prompt: patching needs at least one token")
    return out


def check_sites(sites: str | Iterable[str]) -> tuple[str, ...]:
    """Site names in canonical order; unknown names -> MechError."""
    items = [sites] if isinstance(sites, str) else list(sites)
    for s in items:
        if s not in SITES:
            raise MechError(f"unknown site {s!r}: expected one of {', '.join(SITES)}")
    if not items:
        raise MechError(f"no site given: expected some of {', '.join(SITES)}")
    return tuple(s for s in SITES if s in items)


def check_direction(direction: str) -> str:
    if direction not in DIRECTIONS:
        raise MechError(f"unknown patching direction {direction!r}: expected one of {', '.join(DIRECTIONS)}")
    return direction


def resolve_direction(direction: str | None, mode: str | None) -> str:
    """The direction asked for, or the one a mask's mode implies (sufficiency: denoising, necessity: noising)."""
    implied = None if mode is None else (DENOISING if mode == SUFFICIENCY else NOISING)
    if direction is None:
        return implied or DENOISING
    if implied is not None and check_direction(direction) != implied:
        raise MechError(f"a {mode} mask means direction {implied!r}, not {direction!r}: drop direction= or pass "
                        "the mask in the other mode")
    return check_direction(direction)


def check_pair(base: Any, student: Any) -> None:
    """Base and student must be two distinct models of one architecture; the base must carry no LoRA."""
    if surgery.lora_modules(base):
        raise MechError("the base model carries LoRA layers (with_lora wraps in place): pass a plain base "
                        "model and the student separately (load_student copies the base)")
    if surgery.num_layers(base) != surgery.num_layers(student):
        raise MechError(f"base has {surgery.num_layers(base)} layers, student {surgery.num_layers(student)}: "
                        "patch a student against the base it was trained from")


def run_and_source(base: Any, student: Any, direction: str) -> tuple[Any, Any]:
    """(model that runs, model whose activations are patched in) for a direction."""
    return (base, student) if check_direction(direction) == DENOISING else (student, base)


# --------------------------------------------------------------------------------------------- sites


def site_module(layer: Any, site: str) -> Any:
    """The module (or nnsight envoy) whose output is ``site`` of a decoder layer."""
    if site == RESID:
        return layer
    if site == ATTN:
        return surgery.get_attention(layer)
    if site == MLP:
        return surgery.get_mlp(layer)
    if site in ("q", "k", "v"):
        return surgery.get_projection(layer, site)
    raise MechError(f"unknown site {site!r}: expected one of {', '.join(SITES)}")


def site_tensor(output: Any) -> Any:
    """The activation in a module's output: attention blocks (and older decoder layers) return tuples."""
    return output[0] if isinstance(output, tuple) else output


def forward_order(requests: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
    """(site, layer) requests sorted in the order the forward pass produces them."""
    return sorted(set(requests), key=lambda r: (r[1], _FORWARD_ORDER.index(r[0])))


def traceable(model: Any) -> Any:
    """An nnsight wrapper of the HF model under any PEFT wrapper (LoRA layers stay in its forward)."""
    from nnsight import NNsight

    return NNsight(surgery.base_causal_lm(model))


# --------------------------------------------------------------------------------------------- traces


def cache_activations(
    model: Any, prompt: Any, requests: Iterable[tuple[str, int]], envoy: Any = None
) -> dict[tuple[str, int], torch.Tensor]:
    """``{(site, layer): activation [T, d]}`` of one clean forward of ``model`` on ``prompt`` (no grad)."""
    ids = torch.tensor([as_input_ids(prompt)], device=device_of(model))
    ordered = forward_order(requests)
    for site, layer in ordered:
        check_sites(site)
        surgery.resolve_layers(model, layer)
    nn_model = envoy if envoy is not None else traceable(model)
    layers = surgery.get_layers(nn_model)
    saved: dict[tuple[str, int], Any] = {}
    with torch.no_grad(), nn_model.trace(ids, logits_to_keep=1):  # only activations are wanted
        for site, layer in ordered:
            saved[(site, layer)] = site_tensor(site_module(layers[layer], site).output)[0].save()
    return {k: v.detach() for k, v in saved.items()}


def patched_last_logits(
    model: Any,
    prompt: Any,
    site: str,
    layer: int,
    source: torch.Tensor,
    rows: Sequence[Sequence[int]],
    envoy: Any = None,
) -> torch.Tensor:
    """Last-position logits ``[len(rows), vocab]`` of ``model`` on copies of ``prompt``, where copy ``r`` has
    ``site`` of ``layer`` overwritten by ``source`` (``[T, d]``, e.g. the other model's activation) at the
    positions ``rows[r]`` (an empty row is the clean run)."""
    ids_list = as_input_ids(prompt)
    seq_len = len(ids_list)
    (site,) = check_sites(site)
    (layer,) = surgery.resolve_layers(model, layer)
    if not rows:
        raise MechError("no rows to patch: pass at least one list of positions (an empty list = clean run)")
    rows = [position_indices(tuple(r), seq_len) for r in rows]
    if source.dim() != 2 or source.shape[0] != seq_len:
        raise MechError(f"source activation has shape {tuple(source.shape)}: expected [{seq_len}, d] for this "
                        "prompt (cache it with cache_activations on the same prompt)")
    device = device_of(model)
    ids = torch.tensor([ids_list], device=device).repeat(len(rows), 1)
    row_idx = torch.tensor([r for r, ps in enumerate(rows) for _ in ps], dtype=torch.long, device=device)
    pos_idx = torch.tensor([p for ps in rows for p in ps], dtype=torch.long, device=device)
    values = source.to(device)[pos_idx]
    nn_model = envoy if envoy is not None else traceable(model)
    target = site_module(surgery.get_layers(nn_model)[layer], site)
    with torch.no_grad(), nn_model.trace(ids, logits_to_keep=1):
        act = site_tensor(target.output)
        if row_idx.numel():
            act[row_idx, pos_idx] = values.to(act.dtype)  # in place: the forward continues on the patched tensor
        logits = nn_model.output.logits[:, -1].save()
    return logits.detach()


def last_logits(model: Any, prompt: Any) -> torch.Tensor:
    """Last-position logits ``[1, vocab]`` of a clean forward (no nnsight)."""
    ids = torch.tensor([as_input_ids(prompt)], device=device_of(model))
    with torch.no_grad():
        return surgery.base_causal_lm(model)(input_ids=ids, logits_to_keep=1).logits[:, -1].detach()


# --------------------------------------------------------------------------------------------- sweeps


@dataclass(frozen=True)
class Setup:
    """The checked inputs every patching method starts from."""

    sites: tuple[str, ...]
    run: Any  # the model that runs
    src: Any  # the model whose activations are patched in
    ids: list[int]  # the prompt
    positions: list[int]  # the swept positions, sorted
    layers: list[int]  # the swept layers, sorted
    direction: str

    @property
    def requests(self) -> list[tuple[str, int]]:
        """Every swept (site, layer) in forward order."""
        return forward_order((s, l) for s in self.sites for l in self.layers)

    def effect(self, site: str, values: torch.Tensor, clean: float, source: float, method: str,
               **extra: Any) -> Effect:
        """One site's grid as an :class:`Effect`, with the references put the way round the direction says."""
        base, student = (clean, source) if self.direction == DENOISING else (source, clean)
        return Effect(method=method, site=site, layers=list(self.layers), positions=list(self.positions),
                      values=values, base=base, student=student, mode=self.direction, **extra)


def prepare(base: Any, student: Any, prompt: Any, sites: Any, positions: Any, layers: Any, direction: str | None,
            train_rendered: Rendered | None = None) -> Setup:
    """Check the inputs and resolve the swept region (a position spec and layers, or a Mask) on ``prompt``."""
    sites = check_sites(sites)
    check_pair(base, student)
    ids = as_input_ids(prompt)
    where = prompt if isinstance(prompt, Rendered) else len(ids)
    pos, layer_list, mode = sweep_region(positions, layers, base, where, train_rendered)
    if not pos:
        raise MechError(f"positions {positions!r} select no token of the prompt: choose a non-empty set")
    direction = resolve_direction(direction, mode)
    run, src = run_and_source(base, student, direction)
    return Setup(sites, run, src, ids, pos, layer_list, direction)


def patching_sweep(
    base: Any,
    student: Any,
    prompt: Any,
    metric: Metric,
    sites: str | Iterable[str] = (RESID, ATTN, MLP),
    layers: Any = "all",
    positions: Any = "all",
    direction: str | None = None,
    batch_size: int = 64,
    include_all: bool = True,
    train_rendered: Rendered | None = None,
) -> dict[str, Effect]:
    """Exact activation patching over sites × layers × positions; ``{site: Effect}`` (method "patching").

    ``positions`` is a position spec or a Mask (see the module doc), ``layers`` a layer spec; ``direction``
    defaults to denoising, or to the mask's. Per (site, layer), the positions run as batches of at most
    ``batch_size`` copies of the prompt; ``include_all`` adds each layer's swept positions at once.
    """
    if batch_size < 1:
        raise MechError(f"batch_size must be >= 1, got {batch_size}")
    setup = prepare(base, student, prompt, sites, positions, layers, direction, train_rendered)
    run, src, ids, pos = setup.run, setup.src, setup.ids, setup.positions
    rows: list[list[int]] = [[p] for p in pos] + ([pos] if include_all else [])

    source_acts = cache_activations(src, ids, setup.requests)
    clean = float(evaluate_metric(metric, last_logits(run, ids))[0])
    source = float(evaluate_metric(metric, last_logits(src, ids))[0])

    envoy = traceable(run)
    out: dict[str, Effect] = {}
    for site in setup.sites:
        grid = torch.empty(len(setup.layers), len(rows))
        for i, layer in enumerate(setup.layers):
            for start in range(0, len(rows), batch_size):
                chunk = rows[start:start + batch_size]
                logits = patched_last_logits(run, ids, site, layer, source_acts[(site, layer)], chunk, envoy=envoy)
                grid[i, start:start + len(chunk)] = evaluate_metric(metric, logits).cpu()
        out[site] = setup.effect(site, grid[:, : len(pos)].clone(), clean, source, "patching",
                                 values_all=grid[:, len(pos)].clone() if include_all else None)
    return out
