"""Student directories: what a trained student is on disk, how to load, merge and measure one.

A student directory (written by :func:`mech.students.train.train_student`) holds either

* a PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``, stamped by
  :func:`mech.models.record_adapter_base` with its base's name and fingerprint), loadable by PEFT and vLLM; or
* a full model (``config.json`` + ``model.safetensors`` + tokenizer files), loadable by ``load_model``;

plus ``student.json`` (config, per-step losses, training context, base spec, update norms) and, when the
student was trained with ``save_every_epoch``, one such directory per epoch under ``epoch-<k>/``.

Update norms are keyed ``"<layer>.<kind>"`` (kinds as in :data:`mech.models.COMPONENTS`) plus ``"global"``.
For a LoRA student a module's norm is ``||B A · scaling||_F`` (PEFT's own delta weight, so rsLoRA scaling is
included); for a full model it is ``||W_student − W_base||_F`` of the projection's weight. ``"global"`` is the
Frobenius norm of the whole update: for LoRA the root sum of squares of its modules (LoRA changes nothing
else); for a full model over *every* parameter (embeddings, norms and biases included), so a full-FT student's
global norm also counts what LoRA cannot touch.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from mech.errors import MechError
from mech.store import read_json_object
from mech.models import loader, surgery

STUDENT_JSON = "student.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
EPOCH_PREFIX = "epoch-"
GLOBAL = "global"
LORA, FULL = "lora", "full"
_EPOCH_RE = re.compile(r"^epoch-(\d+)$")


# --------------------------------------------------------------------------------------------- keys


def module_key(layer: int, kind: str) -> str:
    """``"<layer>.<kind>"``: how update norms and matched-norm references name a projection."""
    return f"{int(layer)}.{kind}"


def parse_module_key(key: str) -> tuple[int, str]:
    """Inverse of :func:`module_key`; MechError for anything else (e.g. ``"global"``)."""
    layer, _, kind = key.partition(".")
    if not layer.isdigit() or kind not in surgery.COMPONENTS:
        raise MechError(f"bad module key {key!r}: expected '<layer>.<kind>' with kind one of "
                        f"{', '.join(surgery.COMPONENTS)}")
    return int(layer), kind


# --------------------------------------------------------------------------------------------- directories


def student_kind(student_dir: str | os.PathLike) -> str:
    """``"lora"`` for an adapter dir, ``"full"`` for a model dir; MechError for anything else."""
    path = Path(student_dir)
    if not path.is_dir():
        raise MechError(f"student dir {path} does not exist: train it with mech.students.train.train_student")
    if (path / loader.ADAPTER_CONFIG).is_file():
        return LORA
    if (path / "config.json").is_file():
        return FULL
    raise MechError(f"{path} is not a student dir (no adapter_config.json or config.json): pass the directory "
                    "train_student wrote")


def lora_reference(reference: str | os.PathLike | None, field: str, method: str) -> Path:
    """The LoRA student dir a matched-norm / matched-loss student is defined against; MechError if unset or full."""
    if not reference:
        raise MechError(f"method {method!r} needs {field}: set it to a LoRA student dir")
    path = Path(reference)
    if student_kind(path) != LORA:
        raise MechError(f"{field} {path} is a full model, not a LoRA student: point it at a LoRA student dir")
    return path


def read_student(student_dir: str | os.PathLike) -> dict:
    """The student's ``student.json``."""
    path = Path(student_dir) / STUDENT_JSON
    if not path.is_file():
        raise MechError(f"{Path(student_dir)} has no {STUDENT_JSON}: not a student dir written by train_student")
    return read_json_object(path, "retrain the student")


def epoch_dirs(student_dir: str | os.PathLike) -> dict[int, Path]:
    """Per-epoch checkpoints ``{k: <dir>/epoch-<k>}`` (empty unless trained with save_every_epoch)."""
    root = Path(student_dir)
    found = {}
    for p in root.iterdir() if root.is_dir() else ():
        m = _EPOCH_RE.match(p.name)
        if m and p.is_dir():
            found[int(m.group(1))] = p
    return dict(sorted(found.items()))


# --------------------------------------------------------------------------------------------- loading


def _base_parts(base: Any) -> tuple[Any | None, str | None]:
    """(model, spec) of a base given as a model, a LoadedModel or a spec string."""
    if isinstance(base, loader.LoadedModel):
        return base.model, base.spec
    if isinstance(base, (str, os.PathLike)):
        return None, str(base)
    return base, None


def _placement(model: Any | None, device, dtype) -> tuple[Any, Any]:
    if model is None:
        return device, dtype
    p = next(model.parameters())
    return device if device is not None else p.device, dtype if dtype is not None else p.dtype


def check_student_files(student_dir: str | os.PathLike) -> str:
    """:func:`student_kind` of a directory given by hand (e.g. a published adapter), after checking that it can be
    loaded without loading anything: an adapter's safetensors weights, a full model's config, weights and
    tokenizer. Returns the kind."""
    path = Path(student_dir)
    if not path.is_dir():
        raise MechError(f"student dir {path} is not a directory: pass a PEFT adapter dir or a full model dir")
    if not (path / loader.ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file():
        raise MechError(f"{path} holds neither {loader.ADAPTER_CONFIG} (a PEFT adapter) nor config.json (a full "
                        "model): pass the directory save_pretrained wrote")
    kind = student_kind(path)
    if kind == LORA:
        _require_safe_adapter(path)
    else:
        loader.resolve_spec(path)  # a full model dir is a model spec: the same checks as any --model dir
    return kind


def _check_architecture(path: Path, model: Any) -> None:
    """A full model dir that records no base (not written by train_student): at least its architecture must be the
    base's, or it cannot have been finetuned from it. Its weights moved, so nothing finer can be compared."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path)).to_dict()
    except (OSError, ValueError, KeyError):  # e.g. a config that needs remote code: loading it will say why
        return
    want, have = loader.architecture(config), loader.architecture(loader.config_dict(model))
    diff = [k for k in want if want[k] != have[k]]
    if diff:
        shown = ", ".join(f"{k} {want[k]} vs {have[k]}" for k in diff[:3])
        raise MechError(f"student {path} is not a finetune of this base (its architecture differs: {shown}): pass "
                        "the base it was finetuned from as --model")


def check_student_base(student_dir: str | os.PathLike, base: Any) -> None:
    """MechError when the student was trained on another base than ``base`` (model, LoadedModel or spec).

    Adapters are checked by :func:`mech.models.check_adapter_base`; full students by the base fingerprint
    (for a model) or base spec (for a spec string) recorded in student.json, and a full model dir without
    student.json (finetuned elsewhere) by its architecture against a model ``base``. Nothing recorded: passes.
    """
    path = Path(student_dir)
    if student_kind(path) == LORA:
        loader.check_adapter_base(path, base)
        return
    model, spec = _base_parts(base)
    if not (path / STUDENT_JSON).is_file():
        if model is not None:
            _check_architecture(path, model)
        return
    meta = read_student(path)
    if model is not None and meta.get("base_fingerprint"):
        fp = loader.model_fingerprint(model)
        if fp != meta["base_fingerprint"]:
            raise MechError(f"student {path} was trained on another base model (fingerprint "
                            f"{meta['base_fingerprint']}, this base {fp}): use the base it was trained on "
                            f"({meta.get('base_spec')})")
    elif spec is not None and meta.get("base_spec"):
        want, have = loader.canonical_base_name(meta["base_spec"]), loader.canonical_base_name(spec)
        if want != have:
            raise MechError(f"student {path} was trained on base {want!r}, not {have!r}: use {want} as the base")


def _require_safe_adapter(path: Path) -> None:
    """PEFT falls back to a pickled adapter_model.bin (which can run code when loaded) whenever the safetensors
    file is missing: refuse it before PEFT looks."""
    if (path / ADAPTER_WEIGHTS).is_file():
        return
    pickled = sorted(p.name for p in (*path.glob("*.bin"), *path.glob("*.pt"), *path.glob("*.pth")))
    if pickled:
        raise MechError(f"adapter {path} holds {', '.join(pickled)} and no {ADAPTER_WEIGHTS}: only safetensors "
                        "adapters are loaded (a pickle can run code); re-save it with save_pretrained(dir) "
                        "(PEFT's default safe_serialization=True)")
    raise MechError(f"adapter {path} has no {ADAPTER_WEIGHTS}: the student is incomplete; train it again")


def load_student(base_model_or_spec: Any, student_dir: str | os.PathLike, device=None, dtype=None,
                 trust_remote_code: bool = False, copy_base: bool = True) -> Any:
    """A student ready for evaluation (eval mode): a PeftModel for a LoRA student, a plain model otherwise.

    ``base_model_or_spec`` is the base as a model (never modified: a LoRA student is applied to a deep copy),
    a LoadedModel or a spec string (then loaded here). The student must have been trained on that base
    (:func:`check_student_base`). Device and dtype default to the base model's, else load_model's defaults.
    Only safetensors weights are read; ``trust_remote_code`` is load_model's. ``copy_base`` False puts the
    adapter on the given base itself (use :func:`student_on_base`, which takes it off again).
    """
    path = Path(student_dir)
    kind = student_kind(path)
    model, spec = _base_parts(base_model_or_spec)
    if model is not None and surgery.unwrap(model) is not model:
        raise MechError("the base model is PEFT-wrapped: pass the plain base model (merge it first with "
                        "mech.students.store.merged)")
    check_student_base(path, base_model_or_spec)
    device, dtype = _placement(model, device, dtype)
    if kind == FULL:
        return loader.load_model(path, device=device, dtype=dtype, trust_remote_code=trust_remote_code).model
    _require_safe_adapter(path)
    from peft import PeftModel

    base = (copy.deepcopy(model) if copy_base else model) if model is not None else loader.load_model(
        spec, device=device, dtype=dtype, trust_remote_code=trust_remote_code).model
    with warnings.catch_warnings():
        # PEFT warns ("upgrade PEFT") about the keys record_adapter_base adds; they are ours, not newer PEFT's
        warnings.filterwarnings("ignore", message=r"Unexpected keyword arguments \['mech_")
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated")  # peft 0.21
        student = PeftModel.from_pretrained(base, str(path), is_trainable=False)
    return student.eval()


def _take_off_lora(model: Any) -> None:
    """Replace every PEFT LoRA layer inside ``model`` by the layer it wraps (what PeftModel.unload does)."""
    wrapped = [(name, m) for name, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    for name, m in wrapped:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, m.get_base_layer())


@contextlib.contextmanager
def lent_base(base_model: Any):
    """Lend ``base_model`` to LoRA adapters for the block instead of deep-copying it (a 7B base is 15 GB more):
    adapters put on it in place (PEFT) are taken off on exit, even on error, and its requires_grad flags and
    train/eval mode are put back, so it leaves the block as it came in (PEFT never changes the base weights)."""
    flags = [(p, p.requires_grad) for p in base_model.parameters()]
    training, attributes = base_model.training, set(vars(base_model))
    try:
        yield base_model
    finally:
        _take_off_lora(base_model)
        for name in set(vars(base_model)) - attributes:  # e.g. PEFT's peft_config, which the next wrap would reuse
            delattr(base_model, name)
        for p, flag in flags:
            p.requires_grad_(flag)
        base_model.train(training)


@contextlib.contextmanager
def student_on_base(base_model: Any, student_dir: str | os.PathLike, trust_remote_code: bool = False):
    """:func:`load_student` for the block without the base's copy: a LoRA student's adapter is put on
    ``base_model`` itself and taken off on exit (the base is unusable as a base meanwhile); a full student is
    loaded as its own model. The same forwards as a copy's."""
    if student_kind(Path(student_dir)) == FULL:
        yield load_student(base_model, student_dir, trust_remote_code=trust_remote_code)
        return
    with lent_base(base_model):
        yield load_student(base_model, student_dir, trust_remote_code=trust_remote_code, copy_base=False)


def merged(model: Any) -> Any:
    """A plain (non-PEFT) copy of ``model`` with any LoRA folded into its weights; ``model`` is untouched."""
    out = copy.deepcopy(model)
    if surgery.unwrap(out) is not out:
        out = out.merge_and_unload()
    return out.eval()


def merge_student(base_model_or_spec: Any, student_dir: str | os.PathLike, device=None, dtype=None) -> Any:
    """The student as a plain model (LoRA merged into a copy of the base), e.g. for TransformerLens."""
    student = load_student(base_model_or_spec, student_dir, device=device, dtype=dtype)
    if surgery.unwrap(student) is not student:
        student = student.merge_and_unload()
    return student.eval()


# --------------------------------------------------------------------------------------------- update norms


def _lora_delta(layer: Any) -> torch.Tensor:
    deltas = [layer.get_delta_weight(name).float() for name in layer.lora_A.keys()]
    return torch.stack(deltas).sum(0) if len(deltas) > 1 else deltas[0]


def param_pairs(base_model: Any, student_model: Any) -> list[tuple[str, torch.nn.Parameter, torch.nn.Parameter]]:
    """(name, base parameter, student parameter) for every parameter of two plain models of one architecture."""
    base = dict(surgery.unwrap(base_model).named_parameters())
    student = dict(surgery.unwrap(student_model).named_parameters())
    if base.keys() != student.keys() or any(base[k].shape != student[k].shape for k in base):
        raise MechError("student and base have different parameters: compare a student with the base it was "
                        "trained on")
    return [(k, base[k], student[k]) for k in base]


def param_update(base_param: torch.Tensor, student_param: torch.Tensor) -> torch.Tensor:
    # float32 on the student's device: bf16 differences of nearby weights would round to zero
    return student_param.detach().float() - base_param.detach().to(student_param.device, torch.float32)


@torch.no_grad()
def update_norms(base_model: Any, student_model: Any) -> dict[str, float]:
    """``{"<layer>.<kind>": ||ΔW||_F, ..., "global": ||Δ||_F}`` of a LoRA or full student vs its base.

    LoRA students report the modules they adapt; full students report every projection (see module doc for
    what ``global`` covers).
    """
    lora = surgery.lora_modules(student_model)
    out: dict[str, float] = {}
    if lora:
        for (i, kind), layer in lora.items():
            out[module_key(i, kind)] = float(_lora_delta(layer).norm())
        out[GLOBAL] = math.sqrt(sum(v * v for v in out.values()))
        return out
    pairs = surgery.paired_projections(student_model, base_model, "compare a student with its own base")
    for i, kind, s, b in pairs:
        out[module_key(i, kind)] = float(param_update(b.weight, s.weight).norm())
    total = sum(float(param_update(b, s).pow(2).sum()) for _, b, s in param_pairs(base_model, student_model))
    out[GLOBAL] = math.sqrt(total)
    return out
