"""Attribution patching: AtP (Nanda 2023; Kramár et al. 2024) and AtP* with the QK fix.

AtP estimates the whole activation-patching sweep of :mod:`mech.interventions.patching` from one forward of
the *source* model (cache its activations) and one forward + backward of the *running* model:

    change[layer, pos] = (a_source[layer, pos] − a_run[layer, pos]) · ∂m/∂a_run[layer, pos]

i.e. the first-order Taylor estimate of ``m(patched) − m(clean)``. Directions, sites, positions and layers
are those of patching.py (a position spec or a Mask, a layer spec); ``denoising`` runs the base and takes the
student as source, ``noising`` the other way round; sites ``resid``, ``attn``, ``mlp`` (block outputs) and
``q``, ``k``, ``v`` (projection outputs). Results are :class:`mech.interventions.result.Effect` grids whose
``delta`` is the estimate and ``values = clean + delta`` the patched metric it predicts.

AtP* (``method="atp*"``) adds Kramár et al.'s QK fix for the ``q`` and ``k`` sites
(:mod:`mech.interventions.qk_fix`). ``v``, ``resid``, ``attn`` and ``mlp`` keep the AtP estimate in AtP*:
there is no softmax between such a node and its own value (the attention block's *output* is patched as a
whole, its pattern untouched; the attention-pattern effects of the attention block are exactly its
``q``/``k`` nodes). The optional GradDrop part of AtP* (for cancellation across layers) is not implemented.

Pure torch hooks, no nnsight: one plain forward/backward is all AtP needs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterable

import torch

from mech.context import Rendered
from mech.errors import MechError
from mech.evaluation.inference import device_of
from mech.interventions.patching import (
    ATTN,
    MLP,
    RESID,
    Metric,
    Setup,
    evaluate_metric,
    prepare,
    site_module,
    site_tensor,
)
from mech.interventions.qk_fix import QK_SITES, AttnRecord, capturing, check_qk_fix, qk_fix_scores
from mech.interventions.result import Effect
from mech.models import surgery

ATP, ATP_STAR = "atp", "atp*"
METHODS: tuple[str, ...] = (ATP, ATP_STAR)


# --------------------------------------------------------------------------------------------- forwards


@dataclass
class _Pass:
    acts: dict[tuple[str, int], torch.Tensor]  # [1, T, d], live graph tensors on the grad pass
    attn: dict[int, AttnRecord]
    metric: torch.Tensor  # scalar


def _forward(model: Any, ids: torch.Tensor, requests: list[tuple[str, int]], metric: Metric,
             capture_layers: list[int], grad: bool) -> _Pass:
    layers = surgery.get_layers(model)
    acts: dict[tuple[str, int], torch.Tensor] = {}
    handles = []

    def keep(key):
        def hook(_module, _args, output):
            acts[key] = site_tensor(output)

        return hook

    def input_requires_grad(_module, _args, output):
        # A frozen model (PEFT freezes the base) builds no graph: make the embeddings its root so every
        # downstream activation gets a gradient; parameters themselves never get one (autograd.grad only).
        if not output.requires_grad:
            output.requires_grad_(True)

    try:
        for site, layer in requests:
            handles.append(site_module(layers[layer], site).register_forward_hook(keep((site, layer))))
        if grad:
            handles.append(surgery.get_embedding(model).register_forward_hook(input_requires_grad))
        capture = capturing(model, capture_layers) if capture_layers else contextlib.nullcontext({})
        with torch.set_grad_enabled(grad), capture as records:
            logits = surgery.base_causal_lm(model)(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1]
            m = evaluate_metric(metric, logits)[0]
    finally:
        for h in handles:
            h.remove()
    return _Pass(acts=acts, attn=dict(records), metric=m)


# --------------------------------------------------------------------------------------------- AtP / AtP*


def _site_change(site: str, layer: int, run_pass: _Pass, src_pass: _Pass, grads: dict, fix: bool) -> torch.Tensor:
    """The estimated change ``[T]`` of patching ``site`` of ``layer`` at each position alone."""
    a_run = run_pass.acts[(site, layer)].detach()[0].float()
    if fix:
        g = grads.get(("probs", layer))
        g = torch.zeros_like(run_pass.attn[layer].probs) if g is None else g
        return qk_fix_scores(site, run_pass.attn[layer], src_pass.attn[layer], g)
    g = grads.get((site, layer))
    if g is None:  # the metric does not depend on this activation
        return torch.zeros(a_run.shape[0], device=a_run.device)
    a_src = src_pass.acts[(site, layer)][0].float().to(a_run.device)
    return ((a_src - a_run) * g[0].float()).sum(-1)


def _passes(setup: Setup, metric: Metric, capture: list[int]) -> tuple[_Pass, _Pass, dict]:
    """(source pass, running pass, {(site, layer) or ("probs", layer): ∂m/∂ that}) of one AtP run."""
    requests = setup.requests
    with torch.no_grad():
        src_pass = _forward(setup.src, torch.tensor([setup.ids], device=device_of(setup.src)), requests, metric,
                            capture, grad=False)
    run_pass = _forward(setup.run, torch.tensor([setup.ids], device=device_of(setup.run)), requests, metric,
                        capture, grad=True)
    keys = requests + [("probs", layer) for layer in capture]
    inputs = [run_pass.acts[r] for r in requests] + [run_pass.attn[layer].probs for layer in capture]
    grads = torch.autograd.grad(run_pass.metric, inputs, allow_unused=True)
    return src_pass, run_pass, dict(zip(keys, grads))


def attribution_patching(
    base: Any,
    student: Any,
    prompt: Any,
    metric: Metric,
    sites: str | Iterable[str] = (RESID, ATTN, MLP),
    layers: Any = "all",
    direction: str | None = None,
    method: str = ATP,
    positions: Any = "all",
    train_rendered: Rendered | None = None,
) -> dict[str, Effect]:
    """AtP (or AtP*) estimates of every (layer, position) patch of each site; ``{site: Effect}``.

    Two forwards and one backward whatever the number of sites, layers and positions. Arguments as in
    :func:`mech.interventions.patching.patching_sweep`; ``method`` is ``"atp"`` or ``"atp*"``.
    """
    if method not in METHODS:
        raise MechError(f"unknown attribution method {method!r}: expected one of {', '.join(METHODS)}")
    setup = prepare(base, student, prompt, sites, positions, layers, direction, train_rendered)
    fix_sites = [s for s in setup.sites if s in QK_SITES] if method == ATP_STAR else []
    capture = setup.layers if fix_sites else []
    if fix_sites:
        check_qk_fix(setup.run, setup.src, setup.layers)
    src_pass, run_pass, grads = _passes(setup, metric, capture)
    clean, source = float(run_pass.metric.detach()), float(src_pass.metric)
    columns = torch.tensor(setup.positions)
    out: dict[str, Effect] = {}
    for site in setup.sites:
        delta = torch.stack([_site_change(site, layer, run_pass, src_pass, grads, site in fix_sites).detach().cpu()
                             for layer in setup.layers])[:, columns]
        out[site] = setup.effect(site, clean + delta, clean, source, method, delta=delta)
    return out


def atp(base: Any, student: Any, prompt: Any, metric: Metric, **kwargs: Any) -> dict[str, Effect]:
    """:func:`attribution_patching` with ``method="atp"``."""
    return attribution_patching(base, student, prompt, metric, method=ATP, **kwargs)


def atp_star(base: Any, student: Any, prompt: Any, metric: Metric, **kwargs: Any) -> dict[str, Effect]:
    """:func:`attribution_patching` with ``method="atp*"`` (QK fix on sites q and k)."""
    return attribution_patching(base, student, prompt, metric, method=ATP_STAR, **kwargs)


# --------------------------------------------------------------------------------------------- comparison


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """0-based ranks of a flattened tensor, ties sharing their average rank (as Spearman's rho needs)."""
    flat = x.detach().flatten().double().cpu()
    _, inverse, counts = torch.unique(flat, sorted=True, return_inverse=True, return_counts=True)
    end = counts.cumsum(0).double()
    avg = end - (counts.double() + 1) / 2  # mean of ranks start..end-1 of each tied group
    return avg[inverse]


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rank correlation of two equally sized tensors (flattened); NaN when one is constant."""
    if x.numel() != y.numel():
        raise MechError(f"spearman needs equally sized inputs, got {x.numel()} and {y.numel()} values")
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = float(rx.norm() * ry.norm())
    return float("nan") if denom == 0.0 else float((rx * ry).sum()) / denom
