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
  recovers: ``fraction = (m − m_base) / (m_student − m_base)``;
* ``noising``: run the STUDENT, patch in the BASE's activation → how much of the effect the site destroys:
  ``fraction = (m_student − m) / (m_student − m_base)``.

Both are ``(m − m_clean) / (m_source − m_clean)`` with *clean* the model that runs and *source* the model
the activation comes from; :class:`PatchResult` stores ``clean`` and ``source`` and derives the fraction.

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

from mech.errors import MechError
from mech.evaluation.inference import device_of, first_token_logp
from mech.models import surgery

Metric = Callable[[torch.Tensor], torch.Tensor]  # last-position logits [batch, vocab] -> [batch]

RESID, ATTN, MLP = "resid", "attn", "mlp"
SITES: tuple[str, ...] = (RESID, ATTN, MLP, "q", "k", "v")
# Order in which a decoder layer produces its sites: nnsight serves values in forward order only.
_FORWARD_ORDER: tuple[str, ...] = ("q", "k", "v", ATTN, MLP, RESID)
DENOISING, NOISING = "denoising", "noising"
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


def resolve_positions(positions: Any, seq_len: int) -> list[int]:
    """Sorted distinct positions: None/"all" (every position), ints (negative count from the end) or a bool
    vector of length ``seq_len`` (e.g. a resolved Mask's ``pos``). Out of range -> MechError."""
    if positions is None or (isinstance(positions, str) and positions == "all"):
        return list(range(seq_len))
    if isinstance(positions, str):
        raise MechError(f"invalid positions {positions!r}: pass 'all', a list of ints or a bool vector")
    if isinstance(positions, torch.Tensor) and positions.dtype == torch.bool:
        if positions.shape != (seq_len,):
            raise MechError(f"position mask has shape {tuple(positions.shape)} but the prompt has {seq_len} "
                            "tokens: resolve the mask against this prompt")
        return [int(i) for i in positions.nonzero().flatten().tolist()]
    items = positions.tolist() if isinstance(positions, torch.Tensor) else list(positions)
    out = set()
    for p in items:
        if isinstance(p, bool) or not isinstance(p, int):
            raise MechError(f"position {p!r} is not an int: pass token positions as ints")
        if not -seq_len <= p < seq_len:
            raise MechError(f"position {p} is outside the prompt: it has {seq_len} tokens (0..{seq_len - 1})")
        out.add(p % seq_len)
    return sorted(out)


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
    n = surgery.num_layers(model)
    for site, layer in ordered:
        check_sites(site)
        surgery.resolve_layer_spec(n, layer)
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
    (layer,) = surgery.resolve_layer_spec(surgery.num_layers(model), layer)
    if not rows:
        raise MechError("no rows to patch: pass at least one list of positions (an empty list = clean run)")
    rows = [resolve_positions(list(r), seq_len) for r in rows]
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


@dataclass
class PatchResult:
    """One site's sweep: the metric after patching each (layer, position) cell.

    ``metric[i, j]`` patches layer ``layers[i]`` at position ``positions[j]`` alone; ``metric_all[i]`` (when
    swept with ``include_all``) patches every position of ``positions`` at once. ``clean`` is the metric of
    the running model unpatched, ``source`` that of the model the activations come from.
    """

    site: str
    direction: str
    layers: list[int]
    positions: list[int]
    metric: torch.Tensor  # [n_layers, n_positions], float32, cpu
    clean: float
    source: float
    metric_all: torch.Tensor | None = None  # [n_layers]

    @property
    def effect(self) -> float:
        """``source − clean``: the whole effect the fractions are measured against."""
        return self.source - self.clean

    def _fraction(self, values: torch.Tensor) -> torch.Tensor:
        # a zero effect has no fraction to recover: NaN rather than a division blow-up
        if abs(self.effect) < 1e-12:
            return torch.full_like(values, float("nan"))
        return (values - self.clean) / self.effect

    @property
    def fraction(self) -> torch.Tensor:
        """Denoising: fraction of the student's effect recovered; noising: fraction destroyed."""
        return self._fraction(self.metric)

    @property
    def fraction_all(self) -> torch.Tensor | None:
        return None if self.metric_all is None else self._fraction(self.metric_all)

    def to_dict(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "direction": self.direction,
            "layers": list(self.layers),
            "positions": list(self.positions),
            "metric": self.metric.tolist(),
            "fraction": self.fraction.tolist(),
            "metric_all": None if self.metric_all is None else self.metric_all.tolist(),
            "fraction_all": None if self.metric_all is None else self.fraction_all.tolist(),
            "clean": self.clean,
            "source": self.source,
        }


def prepare(base: Any, student: Any, prompt: Any, sites: Any, layers: Any, direction: str
            ) -> tuple[tuple[str, ...], Any, Any, list[int], list[int]]:
    """The checked inputs every patching method starts from: (sites, the model run, the model the activations
    come from, prompt ids, layer indices)."""
    sites = check_sites(sites)
    run, src = run_and_source(base, student, direction)
    check_pair(base, student)
    return sites, run, src, as_input_ids(prompt), surgery.resolve_layers(run, layers)


def patching_sweep(
    base: Any,
    student: Any,
    prompt: Any,
    metric: Metric,
    sites: str | Iterable[str] = (RESID, ATTN, MLP),
    layers: Any = "all",
    positions: Any = None,
    direction: str = DENOISING,
    batch_size: int = 64,
    include_all: bool = True,
) -> dict[str, PatchResult]:
    """Exact activation patching over sites × layers × positions; ``{site: PatchResult}``.

    ``layers`` is any :func:`mech.models.surgery.resolve_layers` spec, ``positions`` anything
    :func:`resolve_positions` takes. Per (site, layer), the positions run as batches of at most
    ``batch_size`` copies of the prompt.
    """
    if batch_size < 1:
        raise MechError(f"batch_size must be >= 1, got {batch_size}")
    sites, run, src, ids, layer_list = prepare(base, student, prompt, sites, layers, direction)
    pos = resolve_positions(positions, len(ids))
    rows: list[list[int]] = [[p] for p in pos] + ([pos] if include_all else [])

    source_acts = cache_activations(src, ids, [(s, l) for s in sites for l in layer_list])
    clean = float(evaluate_metric(metric, last_logits(run, ids))[0])
    source = float(evaluate_metric(metric, last_logits(src, ids))[0])

    envoy = traceable(run)
    out: dict[str, PatchResult] = {}
    for site in sites:
        grid = torch.empty(len(layer_list), len(rows))
        for i, layer in enumerate(layer_list):
            for start in range(0, len(rows), batch_size):
                chunk = rows[start:start + batch_size]
                logits = patched_last_logits(run, ids, site, layer, source_acts[(site, layer)], chunk, envoy=envoy)
                grid[i, start:start + len(chunk)] = evaluate_metric(metric, logits).cpu()
        out[site] = PatchResult(
            site=site,
            direction=direction,
            layers=layer_list,
            positions=pos,
            metric=grid[:, : len(pos)].clone(),
            clean=clean,
            source=source,
            metric_all=grid[:, len(pos)].clone() if include_all else None,
        )
    return out
