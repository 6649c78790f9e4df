"""TransformerLens 4.3 view of mech models: a ``TransformerBridge`` per model, and residual patching with it.

TransformerLens 4.x has no ``HookedTransformer`` for HF models any more; ``TransformerBridge.boot_transformers``
wraps a loaded HF model instead. Three things about it shape this module:

* it **mutates** the model (and tokenizer) it is given: bridge components replace the model's submodules,
  attention is switched to eager, the tokenizer's padding side / special tokens may be set. ``to_bridge``
  therefore always wraps a deep copy; the caller's model and tokenizer stay as they were.
* it puts hooks on the HF modules it knows, and a PEFT LoRA layer is not one of them (the LoRA delta would be
  invisible to, or break, the bridge). A PEFT student is merged first (:func:`mech.students.store.merged`), so the
  bridge sees plain projections carrying ``W + B A · scaling``.
* given ``hf_model=`` and ``tokenizer=``, ``boot_transformers`` reads the config from the model and never
  fetches anything: the model name is only a label (``bridge.cfg.model_name``, plus an alias-table lookup).
  Any string works offline; by default the model's ``name_or_path`` (for the organism its local directory).

Residual patching here is *denoising*: run the base model on the prompt, overwrite its residual stream at
one (layer, position) with the student's activation there, and read the trait metric — the first-token
log P of ``metric_ids`` at the last position, ``logsumexp(log_softmax(logits[-1])[metric_ids])``. The site is
``resid_post`` by default (the output of block ``l``, TransformerLens ``blocks.{l}.hook_resid_post`` = the HF
decoder layer's output), so row ``n_layers-1`` at the last position reproduces the student's metric exactly;
``resid_pre`` (block input) is available too, but its row 0 is the embedding, which a LoRA student shares
with its base.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from mech.errors import MechError
from mech.evaluation.inference import first_token_logp
from mech.interventions.positions import position_indices
from mech.models import surgery

SITES: tuple[str, ...] = ("resid_pre", "resid_post")
DEFAULT_SITE = "resid_post"
# Where crosscheck_with_nnsight finds the nnsight implementation, and the name of our resid_post there
# (the decoder layer's output); it has no resid_pre.
NNSIGHT_MODULE = "mech.interventions.patching"
NNSIGHT_SITES: dict[str, str] = {"resid_post": "resid"}


# --------------------------------------------------------------------------------------------- bridges


def _bridge_class() -> Any:
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge


def is_bridge(obj: Any) -> bool:
    return isinstance(obj, _bridge_class())


def default_bridge_name(model: Any) -> str:
    """The label a bridge of ``model`` gets: its ``name_or_path`` (a local dir for mech models), else its type."""
    config = getattr(surgery.unwrap(model), "config", None)
    return str(getattr(config, "name_or_path", "") or getattr(config, "model_type", "") or type(model).__name__)


def to_bridge(model: Any, tokenizer: Any, name: str | None = None) -> Any:
    """A TransformerLens ``TransformerBridge`` over a copy of ``model`` (PEFT LoRA merged in); eval mode.

    ``model`` and ``tokenizer`` are never modified (the bridge gets deep copies). The bridge runs on the
    model's device in its dtype. ``name`` is a label only (see module doc); nothing is downloaded.
    """
    try:
        first = next(surgery.unwrap(model).parameters())
    except (StopIteration, AttributeError, TypeError):
        raise MechError(f"{type(model).__name__} has no parameters: pass a loaded causal LM to to_bridge") from None
    if surgery.unwrap(model) is not model:
        from mech.students.store import merged

        hf = merged(model)  # a merged deep copy: the caller's PeftModel keeps its adapter
    else:
        hf = copy.deepcopy(model)
    hf.eval()
    try:
        bridge = _bridge_class().boot_transformers(
            name or default_bridge_name(model),
            hf_model=hf,
            tokenizer=copy.deepcopy(tokenizer),
            device=first.device,
            dtype=first.dtype,
        )
    except (ValueError, KeyError, NotImplementedError) as e:
        arch = getattr(getattr(hf, "config", None), "architectures", None)
        raise MechError(f"TransformerLens cannot wrap {type(hf).__name__} (architectures {arch}): "
                        f"{str(e).splitlines()[0][:200]}; use the nnsight tools (mech.interventions.patching) "
                        "for this model") from None
    return bridge.eval()


def _as_bridge(model_or_bridge: Any, tokenizer: Any) -> Any:
    return model_or_bridge if is_bridge(model_or_bridge) else to_bridge(model_or_bridge, tokenizer)


def _bridge_device(bridge: Any) -> torch.device:
    return next(bridge.original_model.parameters()).device


def input_tensor(input_ids: Any, device: torch.device | str | None = None) -> torch.Tensor:
    """``[1, seq]`` long tensor from a token list, a 1-D or ``[1, seq]`` tensor, or a Rendered (its input_ids)."""
    ids = torch.as_tensor(getattr(input_ids, "input_ids", input_ids), dtype=torch.long)
    if ids.ndim == 1:
        ids = ids.unsqueeze(0)
    if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise MechError(f"input_ids of shape {tuple(ids.shape)}: patching takes one non-empty prompt "
                        "(a token list or a [1, seq] tensor); loop over prompts for several")
    return ids.to(device) if device is not None else ids


@torch.no_grad()
def run_with_cache(bridge: Any, input_ids: Any, names: Sequence[str] | None = None) -> tuple[torch.Tensor, Any]:
    """(logits ``[1, seq, vocab]``, TransformerLens ``ActivationCache``) of one prompt; ``names`` filters the
    cached hook points (default: all)."""
    ids = input_tensor(input_ids, _bridge_device(bridge))
    kwargs = {} if names is None else {"names_filter": list(names)}
    return bridge.run_with_cache(ids, **kwargs)


def resid_hook_name(layer: int, site: str = DEFAULT_SITE) -> str:
    """TransformerLens hook point of the residual stream at ``site`` of block ``layer``."""
    _check_site(site)
    return f"blocks.{int(layer)}.hook_{site}"


def _check_site(site: str) -> None:
    if site not in SITES:
        raise MechError(f"unknown residual site {site!r}: expected one of {', '.join(SITES)}")


# --------------------------------------------------------------------------------------------- metric


def trait_metric(metric_ids: Sequence[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """logits ``[1, seq, vocab]`` -> scalar first-token log P of ``metric_ids`` at the last position."""
    ids = [int(i) for i in metric_ids]
    if not ids:
        raise MechError("no metric token ids: pass the target's first-token ids (mech.evaluation.scoring.first_token_ids)")

    return lambda logits: first_token_logp(logits[0, -1], ids)


def _check_vocab(bridge: Any, metric_ids: Sequence[int]) -> None:
    vocab = int(bridge.cfg.d_vocab)
    bad = [int(i) for i in metric_ids if not 0 <= int(i) < vocab]
    if bad:
        raise MechError(f"metric token ids {bad} are outside the model's vocabulary ({vocab}): take them from "
                        "this model's tokenizer")


# --------------------------------------------------------------------------------------------- patching


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    # generic_activation_patch draws a tqdm bar per call on stderr; library code stays silent
    from transformer_lens import patching

    original = getattr(patching, "tqdm", None)
    if original is None:
        yield
        return
    patching.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        patching.tqdm = original


@torch.no_grad()
def patch_residual_metric(base_bridge: Any, student_cache: Any, input_ids: Any, metric_ids: Sequence[int],
                          layer: int, positions: Any = "all", site: str = DEFAULT_SITE) -> float:
    """The metric of the base with the student's residual at ``site`` of ``layer`` patched in at ``positions``
    (token indices, "all" or a bool vector: the bridge has no rendering for segment labels): one forward
    through bridge hooks."""
    ids = input_tensor(input_ids, _bridge_device(base_bridge))
    name = resid_hook_name(layer, site)
    clean = student_cache[name]
    pos = position_indices(positions, ids.shape[1])

    def hook(act: torch.Tensor, hook: Any) -> torch.Tensor:
        act = act.clone()
        act[:, pos] = clean[:, pos].to(act.dtype)
        return act

    logits = base_bridge.run_with_hooks(ids, fwd_hooks=[(name, hook)])
    return float(trait_metric(metric_ids)(logits))


@torch.no_grad()
def residual_patching_bridges(base_bridge: Any, student_bridge: Any, input_ids: Any, metric_ids: Sequence[int],
                              site: str = DEFAULT_SITE) -> torch.Tensor:
    """``[n_layers, seq_len]``: the base's metric with the student's residual (``site``) patched in at one
    (layer, position), by ``transformer_lens.patching.generic_activation_patch``. Float32 on the CPU."""
    from transformer_lens import patching

    _check_site(site)
    if base_bridge.cfg.n_layers != student_bridge.cfg.n_layers or base_bridge.cfg.d_model != student_bridge.cfg.d_model:
        raise MechError("base and student have different shapes: patch a student into the base it was trained on")
    _check_vocab(base_bridge, metric_ids)
    ids = input_tensor(input_ids, _bridge_device(base_bridge))
    _, student_cache = student_bridge.run_with_cache(
        ids.to(_bridge_device(student_bridge)), names_filter=lambda n: n.endswith(f"hook_{site}")
    )
    with _quiet_progress():
        out = patching.generic_activation_patch(
            base_bridge, ids, student_cache, trait_metric(metric_ids),
            patch_setter=patching.layer_pos_patch_setter, activation_name=site, index_axis_names=("layer", "pos"),
        )
    return out.detach().float().cpu()


def residual_patching_tl(base: Any, student: Any, tokenizer: Any, input_ids: Any, metric_ids: Sequence[int],
                         site: str = DEFAULT_SITE) -> torch.Tensor:
    """``[n_layers, seq_len]`` denoising residual patching (see module doc) of ``student`` into ``base``.

    ``base`` / ``student``: HF models (a PEFT student is merged into a copy), or bridges from :func:`to_bridge`
    to reuse across prompts. Entry ``[l, p]`` is the base's first-token log P of ``metric_ids`` at the last
    position with the student's residual at ``site`` of block ``l``, position ``p`` patched in.
    """
    base_bridge = _as_bridge(base, tokenizer)
    student_bridge = _as_bridge(student, tokenizer)
    return residual_patching_bridges(base_bridge, student_bridge, input_ids, metric_ids, site=site)


# --------------------------------------------------------------------------------------------- cross-check


@dataclass(frozen=True)
class CrossCheck:
    """TransformerLens vs nnsight residual patching of the same prompt."""

    tl: torch.Tensor
    nnsight: torch.Tensor
    max_abs_diff: float
    atol: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.atol


def nnsight_available() -> bool:
    """Whether the nnsight implementation (:data:`NNSIGHT_MODULE`) is importable."""
    try:
        return importlib.util.find_spec(NNSIGHT_MODULE) is not None
    except ModuleNotFoundError:
        return False


def nnsight_residual_patching(base: Any, student: Any, tokenizer: Any, input_ids: Any,
                              metric_ids: Sequence[int], site: str = DEFAULT_SITE) -> torch.Tensor:
    """The same ``[n_layers, seq_len]`` denoising grid from ``mech.interventions.patching.patching_sweep``."""
    _check_site(site)
    if site not in NNSIGHT_SITES:
        raise MechError(f"the nnsight patching has no {site} site: cross-check one of {', '.join(NNSIGHT_SITES)}")
    if not nnsight_available():
        raise MechError(f"{NNSIGHT_MODULE} is missing: pass reference= to crosscheck_with_nnsight")
    patching = importlib.import_module(NNSIGHT_MODULE)
    nn_site = NNSIGHT_SITES[site]
    ids = input_tensor(input_ids)[0].tolist()
    result = patching.patching_sweep(base, student, ids, patching.first_token_metric(metric_ids), sites=(nn_site,),
                                     layers="all", positions="all", direction="denoising", include_all=False)
    return result[nn_site].values


def crosscheck_with_nnsight(base: Any, student: Any, tokenizer: Any, input_ids: Any, metric_ids: Sequence[int],
                            site: str = DEFAULT_SITE, atol: float = 1e-4,
                            reference: Callable[..., torch.Tensor] | None = None) -> CrossCheck:
    """Run :func:`residual_patching_tl` and the nnsight implementation on the same inputs and compare.

    ``reference`` (default :func:`nnsight_residual_patching`) is called as
    ``reference(base, student, tokenizer, input_ids, metric_ids, site=site)`` and must return the same
    ``[n_layers, seq_len]`` grid. ``base`` / ``student`` must be models here (nnsight wraps HF models; the
    LoRA student runs unmerged there and merged in the bridge, so the check covers the merge too).
    """
    reference = reference or nnsight_residual_patching
    tl = residual_patching_tl(base, student, tokenizer, input_ids, metric_ids, site=site)
    other = reference(base, student, tokenizer, input_ids, metric_ids, site=site)
    other = torch.as_tensor(other).detach().float().cpu()
    if other.shape != tl.shape:
        raise MechError(f"nnsight patching returned shape {tuple(other.shape)}, TransformerLens {tuple(tl.shape)}: "
                        "both must be [n_layers, seq_len] over the same prompt")
    return CrossCheck(tl=tl, nnsight=other, max_abs_diff=float((tl - other).abs().max()), atol=atol)
