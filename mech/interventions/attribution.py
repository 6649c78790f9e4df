"""Attribution patching: AtP (Nanda 2023; Kramár et al. 2024) and AtP* with the QK fix.

AtP estimates the whole activation-patching sweep of :mod:`mech.interventions.patching` from one forward of
the *source* model (cache its activations) and one forward + backward of the *running* model:

    score[layer, pos] = (a_source[layer, pos] − a_run[layer, pos]) · ∂m/∂a_run[layer, pos]

i.e. the first-order Taylor estimate of ``m(patched) − m(clean)``. Directions and sites are those of
patching.py: ``denoising`` runs the base and takes the student as source, ``noising`` the other way round;
sites ``resid``, ``attn``, ``mlp`` (block outputs) and ``q``, ``k``, ``v`` (projection outputs). Scores are
in metric units; :attr:`AttributionResult.fraction` normalises them like the patching fractions.

AtP* (``method="atp*"``) adds Kramár et al.'s QK fix. A query or key only acts through the attention
pattern, where the linear approximation of the softmax fails badly when attention saturates. So for the
``q`` and ``k`` sites the change of the attention pattern is computed *exactly* and only what follows it is
linearised: with ``A`` the running model's attention probabilities and ``G = ∂m/∂A``,

* ``q`` at position t: row t is recomputed as ``softmax(q'_t · K)`` (all heads), and
  ``score = Σ_heads Σ_s (A'_{t,s} − A_{t,s}) G_{t,s}``;
* ``k`` at position s: for *every* query t the softmax of row t is recomputed with only the logit of key s
  replaced by ``q_t · k'_s``, and ``score = Σ_heads Σ_t Σ_j (A'^{(s)}_{t,j} − A_{t,j}) G_{t,j}``.

``v``, ``resid``, ``attn`` and ``mlp`` keep the AtP estimate in AtP*: there is no softmax between such a
node and its own value (the attention block's *output* is patched as a whole, its pattern untouched; the
attention-pattern effects of the attention block are exactly its ``q``/``k`` nodes). The optional GradDrop
part of AtP* (for cancellation across layers) is not implemented.

The QK fix needs the post-RoPE queries and keys and the attention mask, which no module outputs. They are
captured by swapping the model's attention implementation (transformers' ``AttentionInterface``) for an
eager-equivalent function, for the duration of the two forwards; it supports logit soft-capping (Gemma 2)
and refuses attention sinks. The source model's post-RoPE query/key at a position equals what the running
model would compute from the source's ``q_proj``/``k_proj`` output there only when every other attention
parameter (q/k norms) is shared, so AtP* checks that.

Pure torch hooks, no nnsight: one plain forward/backward is all AtP needs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch

from mech.errors import MechError
from mech.evaluation.inference import device_of
from mech.interventions.patching import (
    ATTN,
    DENOISING,
    MLP,
    RESID,
    Metric,
    evaluate_metric,
    forward_order,
    prepare,
    site_module,
    site_tensor,
)
from mech.models import surgery

ATP, ATP_STAR = "atp", "atp*"
METHODS: tuple[str, ...] = (ATP, ATP_STAR)
QK_SITES: tuple[str, ...] = ("q", "k")
_CAPTURE_IMPL = "mech_attn_capture"
_CHUNK_ELEMENTS = 1 << 24  # bound on the [heads, chunk, T, T] tensor of the key fix (64 MiB in float32)


# --------------------------------------------------------------------------------------------- results


@dataclass
class AttributionResult:
    """One site's AtP / AtP* estimate of ``m(patched) − m(clean)`` for every (layer, position).

    ``scores[i, j]`` estimates patching layer ``layers[i]`` at position ``positions[j]`` alone; ``clean`` and
    ``source`` are the exact metrics of the running and source models (as in PatchResult).
    """

    site: str
    direction: str
    method: str
    layers: list[int]
    positions: list[int]
    scores: torch.Tensor  # [n_layers, seq_len], float32, cpu
    clean: float
    source: float

    @property
    def effect(self) -> float:
        return self.source - self.clean

    @property
    def estimated_metric(self) -> torch.Tensor:
        """The patched metric AtP predicts: ``clean + scores`` (comparable with PatchResult.metric)."""
        return self.clean + self.scores

    @property
    def fraction(self) -> torch.Tensor:
        """Estimated fraction of the effect recovered (denoising) or destroyed (noising)."""
        if abs(self.effect) < 1e-12:
            return torch.full_like(self.scores, float("nan"))
        return self.scores / self.effect

    def to_dict(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "direction": self.direction,
            "method": self.method,
            "layers": list(self.layers),
            "positions": list(self.positions),
            "scores": self.scores.tolist(),
            "fraction": self.fraction.tolist(),
            "clean": self.clean,
            "source": self.source,
        }


# --------------------------------------------------------------------------------------------- attention capture


@dataclass
class _AttnRecord:
    query: torch.Tensor  # [1, heads, T, d], post-RoPE
    key: torch.Tensor  # [1, kv_heads, T, d], post-RoPE, before GQA repetition
    probs: torch.Tensor  # [1, heads, T, T], the very tensor multiplied with the values (for ∂m/∂A)
    mask: torch.Tensor | None  # additive, [T, T]
    scaling: float
    softcap: float | None


@dataclass
class _Capture:
    layer_of: dict[int, int]  # id(attention module) -> layer index
    wanted: set[int]
    records: dict[int, _AttnRecord]


_ACTIVE: list[_Capture] = []


def _scores(q: torch.Tensor, k: torch.Tensor, scaling: float, softcap: float | None, mask: torch.Tensor | None):
    """Attention logits as eager attention computes them (k already repeated to the query heads)."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scaling
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    return s if mask is None else s + mask


def _capture_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None,
                       **kwargs):
    """Eager attention that also records what the QK fix needs (registered as an AttentionInterface)."""
    if kwargs.get("s_aux") is not None:
        raise MechError("attention sinks are not supported by the AtP* QK fix: use method='atp'")
    scaling = float(query.shape[-1] ** -0.5 if scaling is None else scaling)
    n_rep = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(n_rep, dim=1)  # = transformers' repeat_kv: head h reads kv head h // n_rep
    v = value.repeat_interleave(n_rep, dim=1)
    mask = None if attention_mask is None else attention_mask[:, :, :, : k.shape[-2]]
    scores = _scores(query, k, scaling, softcap, mask)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs, v).transpose(1, 2).contiguous()
    cap = _ACTIVE[-1] if _ACTIVE else None
    layer = cap.layer_of.get(id(module)) if cap is not None else None
    if layer is not None and layer in cap.wanted:
        cap.records[layer] = _AttnRecord(
            query=query,
            key=key,
            probs=probs,
            mask=None if mask is None else mask[0, 0],
            scaling=scaling,
            softcap=None if softcap is None else float(softcap),
        )
    return out, probs


def _register_capture() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(_CAPTURE_IMPL, _capture_attention)
    AttentionMaskInterface.register(_CAPTURE_IMPL, eager_mask)  # an explicit additive mask, as eager gets


@contextlib.contextmanager
def _capturing(model: Any, layers: Iterable[int]) -> Iterator[dict[int, _AttnRecord]]:
    """Run ``model``'s attention through the capturing function; yields ``{layer: record}``."""
    _register_capture()
    config = surgery.base_causal_lm(model).config
    layer_of = {id(surgery.get_attention(layer)): i for i, layer in enumerate(surgery.get_layers(model))}
    cap = _Capture(layer_of=layer_of, wanted=set(layers), records={})
    previous = config._attn_implementation
    config._attn_implementation = _CAPTURE_IMPL  # read by every attention module at call time
    _ACTIVE.append(cap)
    try:
        yield cap.records
    finally:
        _ACTIVE.pop()
        config._attn_implementation = previous


# --------------------------------------------------------------------------------------------- forwards


@dataclass
class _Pass:
    acts: dict[tuple[str, int], torch.Tensor]  # [1, T, d], live graph tensors on the grad pass
    attn: dict[int, _AttnRecord]
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
        capture = _capturing(model, capture_layers) if capture_layers else contextlib.nullcontext({})
        with torch.set_grad_enabled(grad), capture as records:
            logits = surgery.base_causal_lm(model)(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1]
            m = evaluate_metric(metric, logits)[0]
    finally:
        for h in handles:
            h.remove()
    return _Pass(acts=acts, attn=dict(records), metric=m)


# --------------------------------------------------------------------------------------------- QK fix


def _pattern(rec: _AttnRecord) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(queries [H,T,d], keys repeated to [H,T,d], mask [T,T]) in float32 of a record (batch row 0)."""
    q = rec.query[0].detach().float()
    k = rec.key[0].detach().float()
    mask = None if rec.mask is None else rec.mask.detach().float()
    if mask is None:  # no mask handed over: plain causal attention
        t = q.shape[-2]
        mask = torch.full((t, t), torch.finfo(torch.float32).min, device=q.device).triu(1)
    return q, k.repeat_interleave(q.shape[0] // k.shape[0], dim=0), mask


def qk_fix_scores(site: str, run: _AttnRecord, source: _AttnRecord, grad_probs: torch.Tensor) -> torch.Tensor:
    """AtP* score ``[T]`` of patching the query (``site="q"``) or key (``"k"``) at each position of one layer.

    ``grad_probs`` is ``∂m/∂A`` of the running model (``[1, H, T, T]``). The attention pattern after the patch
    is recomputed exactly (per query, with the patched query or just the patched key's logit replaced) and
    only its effect on the metric is linear.
    """
    q, k, mask = _pattern(run)
    g = grad_probs[0].float()
    base_scores = _scores(q, k, run.scaling, run.softcap, mask)  # [H, T, T]
    probs = torch.softmax(base_scores, dim=-1)
    if site == "q":
        q_new, _, _ = _pattern(source)
        patched = torch.softmax(_scores(q_new, k, run.scaling, run.softcap, mask), dim=-1)
        return ((patched - probs) * g).sum(dim=(0, 2))  # row t changes only with the query at t
    if site != "k":
        raise MechError(f"the QK fix applies to sites q and k, not {site!r}")
    _, k_new, _ = _pattern(source)
    new_logits = _scores(q, k_new, run.scaling, run.softcap, mask)  # [H, T(query), T(key)] if key s is patched
    heads, t, _ = base_scores.shape
    out = torch.empty(t, device=q.device)
    chunk = max(1, _CHUNK_ELEMENTS // (heads * t * t))
    for start in range(0, t, chunk):
        keys = torch.arange(start, min(t, start + chunk), device=q.device)
        onehot = torch.nn.functional.one_hot(keys, t).bool()[None, :, None, :]  # [1, C, 1, T]
        logits = torch.where(onehot, new_logits[:, None], base_scores[:, None])  # [H, C, T, T]
        delta = torch.softmax(logits, dim=-1) - probs[:, None]
        out[start:start + len(keys)] = (delta * g[:, None]).sum(dim=(0, 2, 3))
    return out


def _check_qk_fix(run: Any, source: Any, layers: list[int]) -> None:
    """MechError unless all non-projection attention parameters (q/k norms) are equal in both models."""
    projections = {surgery.projection_name(k) for k in surgery.COMPONENT_GROUPS["attn"]}
    run_layers, src_layers = surgery.get_layers(run), surgery.get_layers(source)
    for i in layers:
        a = {n: p for n, p in surgery.get_attention(run_layers[i]).named_parameters()
             if n.split(".")[0] not in projections}
        b = {n: p for n, p in surgery.get_attention(src_layers[i]).named_parameters()
             if n.split(".")[0] not in projections}
        if a.keys() != b.keys() or any(not torch.equal(a[n], b[n].to(a[n].device, a[n].dtype)) for n in a):
            raise MechError(f"layer {i}'s attention norms differ between base and student, so a patched "
                            "query/key is not the student's post-RoPE one: use method='atp' for sites q, k")


# --------------------------------------------------------------------------------------------- AtP / AtP*


def attribution_patching(
    base: Any,
    student: Any,
    prompt: Any,
    metric: Metric,
    sites: str | Iterable[str] = (RESID, ATTN, MLP),
    layers: Any = "all",
    direction: str = DENOISING,
    method: str = ATP,
) -> dict[str, AttributionResult]:
    """AtP (or AtP*) estimates of every (layer, position) patch of each site; ``{site: AttributionResult}``.

    Two forwards and one backward whatever the number of sites, layers and positions. Arguments as in
    :func:`mech.interventions.patching.patching_sweep`; ``method`` is ``"atp"`` or ``"atp*"``.
    """
    if method not in METHODS:
        raise MechError(f"unknown attribution method {method!r}: expected one of {', '.join(METHODS)}")
    sites, run, src, ids_list, layer_list = prepare(base, student, prompt, sites, layers, direction)
    fix_sites = [s for s in sites if s in QK_SITES] if method == ATP_STAR else []
    capture = layer_list if fix_sites else []
    if fix_sites:
        _check_qk_fix(run, src, layer_list)
    requests = forward_order((s, l) for s in sites for l in layer_list)

    with torch.no_grad():
        src_pass = _forward(src, torch.tensor([ids_list], device=device_of(src)), requests, metric,
                            capture, grad=False)
    run_pass = _forward(run, torch.tensor([ids_list], device=device_of(run)), requests, metric, capture,
                        grad=True)
    inputs = [run_pass.acts[r] for r in requests] + [run_pass.attn[l].probs for l in capture]
    grads = torch.autograd.grad(run_pass.metric, inputs, allow_unused=True)
    grad_of = dict(zip(requests, grads[: len(requests)]))
    grad_probs = dict(zip(capture, grads[len(requests):]))

    out: dict[str, AttributionResult] = {}
    for site in sites:
        rows = []
        for layer in layer_list:
            a_run = run_pass.acts[(site, layer)].detach()[0].float()
            if site in fix_sites:
                g = grad_probs[layer]
                g = torch.zeros_like(run_pass.attn[layer].probs) if g is None else g
                row = qk_fix_scores(site, run_pass.attn[layer], src_pass.attn[layer], g)
            else:
                g = grad_of[(site, layer)]
                a_src = src_pass.acts[(site, layer)][0].float().to(a_run.device)
                row = torch.zeros(a_run.shape[0], device=a_run.device) if g is None else \
                    ((a_src - a_run) * g[0].float()).sum(-1)
            rows.append(row.detach().cpu())
        out[site] = AttributionResult(
            site=site,
            direction=direction,
            method=method,
            layers=layer_list,
            positions=list(range(len(ids_list))),
            scores=torch.stack(rows),
            clean=float(run_pass.metric.detach()),
            source=float(src_pass.metric),
        )
    return out


def atp(base: Any, student: Any, prompt: Any, metric: Metric, **kwargs: Any) -> dict[str, AttributionResult]:
    """:func:`attribution_patching` with ``method="atp"``."""
    return attribution_patching(base, student, prompt, metric, method=ATP, **kwargs)


def atp_star(base: Any, student: Any, prompt: Any, metric: Metric, **kwargs: Any) -> dict[str, AttributionResult]:
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
