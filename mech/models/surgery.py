"""Model surgery: the one place in mech that knows where things live inside an architecture.

In the style of tuned-lens' ``model_surgery.py``: small pure helpers that find the decoder layers, final
norm, embedding, unembedding and the per-layer projections of a causal LM, so that analysis and training
code can say "layer 3's q projection" without knowing the class. Everything else in the project goes
through these helpers; adding an architecture means adding one row to ``_ARCHITECTURES``.

Models may come wrapped: a PEFT ``PeftModel`` / ``LoraModel`` is unwrapped to the HF model underneath
(its projections are then LoRA layers wrapping the original ``nn.Linear``), and an nnsight wrapper is
navigated as is, so the helpers return nnsight envoys for nnsight models (what a trace needs).

Layer specs (``resolve_layers``) accept an int, a list of ints, a slice string ``"0:2"`` / comma list
``"0,2"``, or a depth name such as ``"all"``, ``"first_half"``, ``"last_third"``, ``"middle_third"``,
``"second_quarter"``: always resolved against the model's own layer count.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

from torch import nn

from mech.errors import MechError

# Canonical projection kinds, in forward order. Everything that names a component (configs, reports,
# PEFT target_modules) uses these short names.
COMPONENTS: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
COMPONENT_GROUPS: dict[str, tuple[str, ...]] = {
    "attn": ("q", "k", "v", "o"),
    "mlp": ("gate", "up", "down"),
}


@dataclass(frozen=True)
class _Arch:
    """Attribute paths (dotted, from the causal LM) of one architecture family."""

    layers: str = "model.layers"
    final_norm: str = "model.norm"
    embedding: str = "model.embed_tokens"
    unembedding: str = "lm_head"
    attention: str = "self_attn"  # relative to a decoder layer
    mlp: str = "mlp"  # relative to a decoder layer
    # kind -> (block, module name); block is "attn" or "mlp"
    projections: tuple[tuple[str, str, str], ...] = (
        ("q", "attn", "q_proj"),
        ("k", "attn", "k_proj"),
        ("v", "attn", "v_proj"),
        ("o", "attn", "o_proj"),
        ("gate", "mlp", "gate_proj"),
        ("up", "mlp", "up_proj"),
        ("down", "mlp", "down_proj"),
    )

    def projection(self, kind: str) -> tuple[str, str]:
        for k, block, name in self.projections:
            if k == kind:
                return block, name
        raise MechError(f"unknown component {kind!r}: expected one of {', '.join(COMPONENTS)}")


# Llama-family decoders (Qwen2/3, Llama incl. SmolLM2, Mistral, Gemma 1-3 text) share one layout.
_LLAMA_LIKE = _Arch()
_ARCHITECTURES: dict[str, _Arch] = {
    "Qwen2ForCausalLM": _LLAMA_LIKE,
    "Qwen3ForCausalLM": _LLAMA_LIKE,
    "LlamaForCausalLM": _LLAMA_LIKE,
    "MistralForCausalLM": _LLAMA_LIKE,
    "GemmaForCausalLM": _LLAMA_LIKE,
    "Gemma2ForCausalLM": _LLAMA_LIKE,
    "Gemma3ForCausalLM": _LLAMA_LIKE,
    # Gemma 3 of 4B and up: a multimodal wrapper whose text decoder sits one level deeper, under
    # model.language_model (the vision tower is never touched: mech feeds text only)
    "Gemma3ForConditionalGeneration": _Arch(layers="model.language_model.layers",
                                            final_norm="model.language_model.norm",
                                            embedding="model.language_model.embed_tokens"),
}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_ARCHITECTURES)


# --- unwrapping --------------------------------------------------------------------------------------


def _is_peft_wrapper(obj: Any) -> bool:
    # Duck-typed on the defining package so this module never has to import peft (slow to import).
    return type(obj).__module__.split(".")[0] == "peft"


def _wrapped_module(obj: Any) -> Any:
    """The torch module an nnsight envoy mirrors, else obj itself."""
    inner = obj.__dict__.get("_module") if hasattr(obj, "__dict__") else None
    return inner if isinstance(inner, nn.Module) and not isinstance(obj, nn.Module) else obj


def unwrap(model: Any) -> Any:
    """Strip PEFT wrappers (PeftModel -> LoraModel -> HF model); no architecture check."""
    seen = 0
    while _is_peft_wrapper(model):
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif isinstance(getattr(model, "model", None), nn.Module):
            model = model.model
        else:
            break
        seen += 1
        if seen > 8:  # a wrapper cycle would be a bug in peft, not something to loop on
            break
    return model


def _arch_of(model: Any) -> _Arch:
    cls = type(_wrapped_module(model))
    for klass in cls.__mro__:  # subclasses of a known architecture share its layout
        if klass.__name__ in _ARCHITECTURES:
            return _ARCHITECTURES[klass.__name__]
    raise MechError(
        f"unsupported architecture {cls.__name__}: mech knows {', '.join(SUPPORTED_ARCHITECTURES)}"
        " (add a row to mech/models/surgery.py _ARCHITECTURES)"
    )


def _get_path(obj: Any, dotted: str, what: str) -> Any:
    cur = obj
    for part in dotted.split("."):
        try:
            cur = getattr(cur, part)
        except AttributeError:
            name = type(_wrapped_module(obj)).__name__
            raise MechError(
                f"{name} has no {what} at '{dotted}': the model does not match its architecture's layout"
            ) from None
    return cur


def base_causal_lm(model: Any) -> Any:
    """The HF causal LM under any PEFT wrapper; MechError when its architecture is unknown."""
    inner = unwrap(model)
    _arch_of(inner)
    return inner


# --- whole-model parts -------------------------------------------------------------------------------


def get_layers(model: Any) -> nn.ModuleList:
    lm = base_causal_lm(model)
    return _get_path(lm, _arch_of(lm).layers, "decoder layers")


def num_layers(model_or_config: Any) -> int:
    """Decoder layer count of a model, or of a bare config (for planning before a model exists)."""
    if not isinstance(_wrapped_module(model_or_config), nn.Module) and not _is_peft_wrapper(model_or_config):
        config = getattr(model_or_config, "text_config", None) or model_or_config
        n = getattr(config, "num_hidden_layers", None)
        if not isinstance(n, int):
            raise MechError(
                f"{type(model_or_config).__name__} has no num_hidden_layers: pass a model or a decoder config"
            )
        return n
    return len(get_layers(model_or_config))


def get_final_norm(model: Any) -> nn.Module:
    lm = base_causal_lm(model)
    return _get_path(lm, _arch_of(lm).final_norm, "final norm")


def get_embedding(model: Any) -> nn.Module:
    lm = base_causal_lm(model)
    return _get_path(lm, _arch_of(lm).embedding, "token embedding")


def get_unembedding(model: Any) -> nn.Module:
    """The lm_head. With tied embeddings its weight *is* the embedding's (see ``embeddings_tied``)."""
    lm = base_causal_lm(model)
    return _get_path(lm, _arch_of(lm).unembedding, "unembedding (lm_head)")


def embeddings_tied(model: Any) -> bool:
    """Whether the unembedding shares its weight tensor with the embedding (then editing one edits both)."""
    emb = _wrapped_module(get_embedding(model))
    head = _wrapped_module(get_unembedding(model))
    # PEFT may wrap either one; the original layer sits under base_layer.
    emb = getattr(emb, "base_layer", emb)
    head = getattr(head, "base_layer", head)
    return emb.weight is head.weight


# --- per-layer parts ---------------------------------------------------------------------------------


def _layer_arch(layer: Any) -> _Arch:
    # Decoder layers are not registered by class name; every known family lays out layers the same way,
    # so the shared layout is used, and a missing attribute becomes a MechError naming the layer class.
    return _LLAMA_LIKE


def get_attention(layer: Any) -> nn.Module:
    return _get_path(layer, _layer_arch(layer).attention, "attention block")


def get_mlp(layer: Any) -> nn.Module:
    return _get_path(layer, _layer_arch(layer).mlp, "MLP block")


def projection_name(kind: str) -> str:
    """Module name of a projection kind, e.g. "q" -> "q_proj" (what PEFT's target_modules match)."""
    return _LLAMA_LIKE.projection(_check_kind(kind))[1]


def get_projection(layer: Any, kind: str) -> nn.Module:
    """A layer's projection of one kind; under PEFT this is the LoRA layer wrapping the original Linear."""
    arch = _layer_arch(layer)
    block, name = arch.projection(_check_kind(kind))
    parent = get_attention(layer) if block == "attn" else get_mlp(layer)
    return _get_path(parent, name, f"{kind} projection")


def set_projection(layer: Any, kind: str, module: nn.Module) -> None:
    """Put ``module`` where :func:`get_projection` finds a layer's projection of one kind (e.g. a wrapper of it)."""
    block, name = _layer_arch(layer).projection(_check_kind(kind))
    parent = get_attention(layer) if block == "attn" else get_mlp(layer)
    _get_path(parent, name, f"{kind} projection")  # a layout without this projection fails here, not silently
    setattr(_wrapped_module(parent), name, module)


def paired_projections(a: Any, b: Any, fix: str) -> Iterator[tuple[int, str, nn.Module, nn.Module]]:
    """(layer, kind, a's projection, b's projection) for every projection both models have, layer by layer.
    Models with different layer counts raise MechError ending with ``fix``."""
    la, lb = get_layers(a), get_layers(b)
    if len(la) != len(lb):
        raise MechError(f"student and base have {len(la)} and {len(lb)} layers: {fix}")
    for i, (x, y) in enumerate(zip(la, lb)):
        for kind in COMPONENTS:
            try:
                px, py = get_projection(x, kind), get_projection(y, kind)
            except MechError:  # an architecture without this projection kind
                continue
            yield i, kind, px, py


def paired_rest_modules(a: Any, b: Any, fix: str) -> Iterator[tuple[int | None, str, nn.Module, nn.Module]]:
    """(layer or None, name, a's module, b's module) for every parameterised module outside the projections:
    token embedding, norms (Gemma's q/k norms included), lm_head. ``layer`` is the decoder layer the module sits
    in, None outside the layers. Found by walking the modules rather than by name, so every family's extra norms
    are included; a module in one model but not the other raises MechError ending with ``fix``."""
    def rest(m: Any) -> dict[str, tuple[int | None, nn.Module]]:
        lm = base_causal_lm(m)
        projections = {id(_wrapped_module(get_projection(layer, k))) for layer in get_layers(lm) for k in COMPONENTS
                       if _has_projection(layer, k)}
        layer_of = {id(mod): i for i, layer in enumerate(get_layers(lm)) for mod in layer.modules()}
        out = {}
        for name, mod in lm.named_modules():
            if id(mod) in projections or not list(mod.parameters(recurse=False)):
                continue
            out[name] = (layer_of.get(id(mod)), mod)
        return out

    ra, rb = rest(a), rest(b)
    if ra.keys() != rb.keys():
        odd = sorted(set(ra) ^ set(rb))
        raise MechError(f"student and base differ in modules {odd[:3]}: {fix}")
    for name, (layer, ma) in ra.items():
        yield layer, name, ma, rb[name][1]


def _has_projection(layer: Any, kind: str) -> bool:
    try:
        get_projection(layer, kind)
    except MechError:
        return False
    return True


def component_block(kind: str) -> str:
    """"attn" or "mlp": the group a projection kind belongs to."""
    kind = _check_kind(kind)
    return next(g for g, kinds in COMPONENT_GROUPS.items() if kind in kinds)


# --- specs -------------------------------------------------------------------------------------------


def _check_kind(kind: str) -> str:
    if kind not in COMPONENTS:
        raise MechError(f"unknown component {kind!r}: expected one of {', '.join(COMPONENTS)}")
    return kind


def resolve_components(spec: str | Iterable[str]) -> list[str]:
    """Projection kinds named by ``spec``, in canonical order, without duplicates.

    ``spec`` is "all", a group ("attn", "mlp"), a kind ("q", ...), a comma list of those, or a list of them.
    """
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    chosen: set[str] = set()
    valid = ["all", *COMPONENT_GROUPS, *COMPONENTS]
    for raw in items:
        item = str(raw).strip().lower()
        if item == "all":
            chosen.update(COMPONENTS)
        elif item in COMPONENT_GROUPS:
            chosen.update(COMPONENT_GROUPS[item])
        elif item in COMPONENTS:
            chosen.add(item)
        else:
            near = difflib.get_close_matches(item, valid, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise MechError(f"unknown component {raw!r}{hint}: expected one of {', '.join(valid)}")
    if not chosen:
        raise MechError(f"empty component spec {spec!r}: expected one of {', '.join(valid)}")
    return [k for k in COMPONENTS if k in chosen]


_FRACTIONS = {"half": 2, "third": 3, "quarter": 4}
_ORDINALS = {"first": 0, "second": 1, "third": 2, "fourth": 3}
_DEPTH_RE = re.compile(r"^(first|second|third|fourth|last|middle)_(half|third|quarter)$")
_SLICE_RE = re.compile(r"^(-?\d*):(-?\d*)(?::(-?\d+))?$")
DEPTH_NAMES: tuple[str, ...] = (
    "all", "first_half", "second_half", "last_half", "first_third", "middle_third", "last_third",
    "first_quarter", "second_quarter", "third_quarter", "last_quarter",
)  # fmt: skip


def _depth_part(name: str, n: int) -> list[int] | None:
    """Layers of one named depth part ("first_half" ...): part i of k covers [i*n//k, (i+1)*n//k)."""
    m = _DEPTH_RE.match(name)
    if not m:
        return None
    ordinal, fraction = m.groups()
    k = _FRACTIONS[fraction]
    if ordinal == "last":
        i = k - 1
    elif ordinal == "middle":
        if k % 2 == 0:
            raise MechError(f"layer spec {name!r} has no middle: use first_/second_ parts of a {fraction}")
        i = k // 2
    else:
        i = _ORDINALS[ordinal]
        if i >= k:
            raise MechError(f"layer spec {name!r}: a {fraction} has only {k} parts")
    layers = list(range(i * n // k, (i + 1) * n // k))
    if not layers:
        raise MechError(f"layer spec {name!r} is empty for a {n}-layer model: use explicit indices like '0:1'")
    return layers


def _check_index(i: int, n: int, spec: Any) -> int:
    if not -n <= i < n:
        raise MechError(f"layer {i} in spec {spec!r} is out of range: the model has {n} layers (0..{n - 1})")
    return i % n


def resolve_layer_spec(n_layers: int, spec: int | str | Sequence[int]) -> list[int]:
    """Layer indices named by ``spec`` for an ``n_layers``-deep model (pure; see ``resolve_layers``)."""
    n = n_layers
    if isinstance(spec, bool):
        raise MechError(f"invalid layer spec {spec!r}: expected an int, a list, 'a:b' or {', '.join(DEPTH_NAMES)}")
    if isinstance(spec, int):
        return [_check_index(spec, n, spec)]
    if isinstance(spec, str):
        s = spec.strip().lower()
        if s == "all":
            return list(range(n))
        part = _depth_part(s, n)
        if part is not None:
            return part
        m = _SLICE_RE.match(s)
        if m:
            start, stop, step = (int(x) if x else None for x in m.groups())
            for bound in (start, stop):
                # slice bounds may equal n (exclusive stop) but not exceed it
                if bound is not None and not -n <= bound <= n:
                    raise MechError(f"layer slice {spec!r} is out of range: the model has {n} layers")
            if step == 0:
                raise MechError(f"layer slice {spec!r} has step 0: use a positive step")
            layers = list(range(n))[slice(start, stop, step)]
            if not layers:
                raise MechError(f"layer slice {spec!r} selects no layer of a {n}-layer model")
            return layers
        if re.fullmatch(r"-?\d+(\s*,\s*-?\d+)*", s):
            return resolve_layer_spec(n, [int(x) for x in s.split(",")])
        near = difflib.get_close_matches(s, DEPTH_NAMES, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise MechError(
            f"invalid layer spec {spec!r}{hint}: expected an int, a list, 'a:b', or one of {', '.join(DEPTH_NAMES)}"
        )
    try:
        items = list(spec)
    except TypeError:
        raise MechError(f"invalid layer spec {spec!r}: expected an int, a list, 'a:b' or a depth name") from None
    if not items or not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
        raise MechError(f"invalid layer list {spec!r}: expected a non-empty list of layer indices")
    out = [_check_index(i, n, spec) for i in items]
    return sorted(set(out))


def resolve_layers(model_or_config: Any, spec: int | str | Sequence[int]) -> list[int]:
    """Sorted layer indices named by ``spec`` for this model (or config); out of range -> MechError."""
    return resolve_layer_spec(num_layers(model_or_config), spec)


# --- LoRA --------------------------------------------------------------------------------------------


def is_lora_layer(module: Any) -> bool:
    """A PEFT LoRA layer: holds ``lora_A``/``lora_B`` ModuleDicts (duck-typed across peft versions)."""
    module = _wrapped_module(module)
    return isinstance(getattr(module, "lora_A", None), nn.ModuleDict) and isinstance(
        getattr(module, "lora_B", None), nn.ModuleDict
    )


def lora_modules(model: Any) -> dict[tuple[int, str], nn.Module]:
    """The LoRA layers of a PEFT-wrapped model keyed by (layer index, kind); empty when there are none.

    Only projections are reported; LoRA on embeddings or lm_head is outside this map.
    """
    out: dict[tuple[int, str], nn.Module] = {}
    for i, layer in enumerate(get_layers(model)):
        for kind in COMPONENTS:
            try:
                proj = get_projection(layer, kind)
            except MechError:
                continue  # e.g. a layer without an MLP projection of this kind
            if is_lora_layer(proj):
                out[(i, kind)] = proj
    return out


def target_modules(kinds: Iterable[str]) -> list[str]:
    """PEFT ``target_modules`` for these kinds (e.g. ["q", "v"] -> ["q_proj", "v_proj"])."""
    return [projection_name(k) for k in kinds]


# --- geometry: residual writers, readout, LoRA factors, layer-output hooks ---------------------------

# Projections whose output is added straight into the residual stream (attention out, MLP down): their
# column space is where an update can write a direction.
RESIDUAL_WRITERS: tuple[str, ...] = ("o", "down")


def writes_residual(kind: str) -> bool:
    return _check_kind(kind) in RESIDUAL_WRITERS


def lora_factors(module: Any) -> list[tuple[Any, Any, float]]:
    """``[(A [r, in], B [out, r], scaling), ...]`` of a LoRA layer's adapters (detached, float32), so that its
    update is ``sum(scaling · B @ A)``. MechError for a merged layer or a variant (DoRA) that is not B·A."""
    module = _wrapped_module(module)
    if not is_lora_layer(module):
        raise MechError(f"{type(module).__name__} is not a LoRA layer: pass a projection of a PEFT LoRA student")
    if getattr(module, "merged", False):
        raise MechError("the LoRA layer is merged into its base weight: load the student unmerged")
    if getattr(module, "lora_variant", None):
        raise MechError("the LoRA layer uses a variant (e.g. DoRA) whose update is not scaling·B·A: "
                        "geometry supports plain LoRA only")
    return [(module.lora_A[name].weight.detach().float(), module.lora_B[name].weight.detach().float(),
             float(module.scaling[name])) for name in module.lora_A.keys()]


def projection_weight(module: Any) -> Any:
    """The dense weight [out, in] of a projection; under LoRA, the frozen base layer's."""
    module = _wrapped_module(module)
    return getattr(module, "base_layer", module).weight


def projection_widths(model: Any) -> dict[str, int]:
    """``{kind: min(in, out)}`` per projection kind, the smallest over layers: the largest rank an update of that
    projection can have (a LoRA rank at or above it is full rank there)."""
    out: dict[str, int] = {}
    for layer in get_layers(model):
        for kind in COMPONENTS:
            if _has_projection(layer, kind):
                w = min(projection_weight(get_projection(layer, kind)).shape)
                out[kind] = min(out.get(kind, w), w)
    return out


def final_norm_gain(model: Any) -> Any:
    """The final norm's per-channel gain as a float32 vector: what a residual direction is multiplied by on its
    way to the unembedding. Gemma's RMSNorm scales by ``1 + weight``; the Llama family by ``weight``."""
    norm = _wrapped_module(get_final_norm(model))
    w = norm.weight.detach().float()
    return 1.0 + w if "Gemma" in type(norm).__name__ else w


def unembedding_matrix(model: Any) -> Any:
    """The unembedding weight [vocab, hidden] (float32, detached)."""
    head = _wrapped_module(get_unembedding(model))
    return getattr(head, "base_layer", head).weight.detach().float()


def add_layer_output_hook(model: Any, layer: int, edit: Any) -> Any:
    """Register ``edit(hidden [batch, seq, d]) -> hidden`` on decoder layer ``layer``'s output (the residual
    stream after that layer); returns the handle (``.remove()``). ``edit`` may return None to only read."""
    layers = get_layers(model)
    idx = resolve_layer_spec(len(layers), int(layer))[0]

    def hook(_mod, _args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        new = edit(hidden)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return _wrapped_module(layers[idx]).register_forward_hook(hook)
