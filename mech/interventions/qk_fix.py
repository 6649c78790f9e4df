"""AtP*'s QK fix (Kramár et al. 2024): the attention-pattern change of a patched query or key, computed exactly.

A query or key only acts through the attention pattern, where the linear approximation of the softmax fails
badly when attention saturates. So for the ``q`` and ``k`` sites the change of the attention pattern is
computed *exactly* and only what follows it is linearised: with ``A`` the running model's attention
probabilities and ``G = ∂m/∂A``,

* ``q`` at position t: row t is recomputed as ``softmax(q'_t · K)`` (all heads), and
  ``score = Σ_heads Σ_s (A'_{t,s} − A_{t,s}) G_{t,s}``;
* ``k`` at position s: for *every* query t the softmax of row t is recomputed with only the logit of key s
  replaced by ``q_t · k'_s``, and ``score = Σ_heads Σ_t Σ_j (A'^{(s)}_{t,j} − A_{t,j}) G_{t,j}``.

The fix needs the post-RoPE queries and keys and the attention mask, which no module outputs. They are
captured by swapping the model's attention implementation (transformers' ``AttentionInterface``) for an
eager-equivalent function, for the duration of the two forwards; it supports logit soft-capping (Gemma 2)
and refuses attention sinks. The source model's post-RoPE query/key at a position equals what the running
model would compute from the source's ``q_proj``/``k_proj`` output there only when every other attention
parameter (q/k norms) is shared, so :func:`check_qk_fix` checks that.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import einops
import torch

from mech.errors import MechError
from mech.models import surgery

QK_SITES: tuple[str, ...] = ("q", "k")
_CAPTURE_IMPL = "mech_attn_capture"
_CHUNK_ELEMENTS = 1 << 24  # bound on the [heads, chunk, T, T] tensor of the key fix (64 MiB in float32)


# --------------------------------------------------------------------------------------------- attention capture


@dataclass
class AttnRecord:
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
    records: dict[int, AttnRecord]


_ACTIVE: list[_Capture] = []


def _per_query_head(kv: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[..., kv_heads, T, d] -> [..., n_heads, T, d] as transformers' repeat_kv: head h reads kv head h // rep."""
    return einops.repeat(kv, "... kv t d -> ... (kv rep) t d", rep=n_heads // kv.shape[-3])


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
    k, v = _per_query_head(key, query.shape[1]), _per_query_head(value, query.shape[1])
    mask = None if attention_mask is None else attention_mask[:, :, :, : k.shape[-2]]
    scores = _scores(query, k, scaling, softcap, mask)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = einops.rearrange(torch.matmul(probs, v), "b h t d -> b t h d").contiguous()
    cap = _ACTIVE[-1] if _ACTIVE else None
    layer = cap.layer_of.get(id(module)) if cap is not None else None
    if layer is not None and layer in cap.wanted:
        cap.records[layer] = AttnRecord(
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
def capturing(model: Any, layers: Iterable[int]) -> Iterator[dict[int, AttnRecord]]:
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



# --------------------------------------------------------------------------------------------- QK fix


def _pattern(rec: AttnRecord) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(queries [H,T,d], keys repeated to [H,T,d], mask [T,T]) in float32 of a record (batch row 0)."""
    q = rec.query[0].detach().float()
    k = rec.key[0].detach().float()
    mask = None if rec.mask is None else rec.mask.detach().float()
    if mask is None:  # no mask handed over: plain causal attention
        t = q.shape[-2]
        mask = torch.full((t, t), torch.finfo(torch.float32).min, device=q.device).triu(1)
    return q, _per_query_head(k, q.shape[0]), mask


def qk_fix_scores(site: str, run: AttnRecord, source: AttnRecord, grad_probs: torch.Tensor) -> torch.Tensor:
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
        # chunk row c patches key start + c, for every query
        onehot = einops.rearrange(torch.nn.functional.one_hot(keys, t).bool(), "c key -> 1 c 1 key")
        logits = torch.where(onehot, new_logits[:, None], base_scores[:, None])  # [H, C, T, T]
        delta = torch.softmax(logits, dim=-1) - probs[:, None]
        out[start:start + len(keys)] = (delta * g[:, None]).sum(dim=(0, 2, 3))
    return out


def check_qk_fix(run: Any, source: Any, layers: list[int]) -> None:
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
