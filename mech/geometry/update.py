"""A student's weight update ΔW per module, its spectrum, and students rebuilt from a transformed update.

* **LoRA** (a PEFT model): ΔW = Σ scaling · B A over the layer's adapters. Its SVD goes through the r × r core
  (:func:`mech.geometry.linalg.low_rank_svd`); A's row space (what the update reads) and B's column space (what it
  writes) are kept separately as orthonormal bases.
* **Full finetuning** (a plain model): ΔW = W_student − W_base for every projection, and for the token embedding
  (and an untied unembedding), which LoRA cannot touch. One-dimensional parameters (norms, biases) are not
  matrices and are left out of the geometry; :func:`rebuild` keeps the student's.

Modules are keyed ``"<layer>.<kind>"`` (:func:`mech.students.store.module_key`) or ``"embedding"`` /
``"unembedding"``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from mech.errors import MechError
from mech.geometry import linalg
from mech.models import surgery
from mech.students.store import module_key, param_pairs, param_update

EMBEDDING, UNEMBEDDING = "embedding", "unembedding"
TRUNCATE, REMOVE = "truncate", "remove"


@dataclass(frozen=True)
class ModuleUpdate:
    """One module's update: its spectrum and, for LoRA, the bases of A's row space and B's column space."""

    name: str
    layer: int | None
    kind: str
    spectrum: linalg.Spectrum
    lora_rank: int | None = None  # the adapter's nominal rank r (sum over adapters)
    read_space: torch.Tensor | None = None  # LoRA: orthonormal basis of A's row space [in, r]
    write_space: torch.Tensor | None = None  # LoRA: orthonormal basis of B's column space [out, r]

    @property
    def shape(self) -> tuple[int, int]:
        return self.spectrum.shape

    def row(self) -> dict[str, Any]:
        out, inp = self.shape
        width = min(out, inp)
        stats = linalg.spectrum_stats(self.spectrum.S)
        row = {"module": self.name, "layer": self.layer, "kind": self.kind, "out_dim": out, "in_dim": inp,
               "width": width, "lora_rank": self.lora_rank, **stats}
        for r in ("numerical_rank", "effective_rank", "participation_ratio", "stable_rank"):
            row[f"{r}_frac"] = stats[r] / width  # a rank-64 LoRA on a 64-wide projection is full rank
        if self.lora_rank is not None:
            row["lora_rank_frac"] = self.lora_rank / width
        return row


def _lora_update(layer: int, kind: str, module: Any) -> ModuleUpdate:
    factors = surgery.lora_factors(module)
    A = torch.cat([a for a, _, _ in factors], 0)
    B = torch.cat([b * s for _, b, s in factors], 1)  # scaling folded into B: Σ s·B·A = [s₁B₁ | s₂B₂] [A₁; A₂]
    spec = linalg.low_rank_svd(A.cpu(), B.cpu())
    return ModuleUpdate(module_key(layer, kind), layer, kind, spec, lora_rank=int(A.shape[0]),
                        read_space=linalg.orthonormal(A.cpu().T), write_space=linalg.orthonormal(B.cpu()))


def lora_updates(student: Any) -> dict[str, ModuleUpdate]:
    """The update of every LoRA-adapted projection of a PEFT student; MechError when it has none."""
    mods = surgery.lora_modules(student)
    if not mods:
        raise MechError("the student has no LoRA layers: pass a PEFT LoRA student, or use full_updates for a full "
                        "model")
    return {module_key(i, k): _lora_update(i, k, m) for (i, k), m in mods.items()}


@torch.no_grad()
def full_updates(base: Any, student: Any, embeddings: bool = True) -> dict[str, ModuleUpdate]:
    """W_student − W_base of every projection (and the embeddings), SVDs batched over matrices of one shape."""
    names, meta, mats = [], [], []
    for i, kind, s, b in surgery.paired_projections(student, base, "compare a student with its own base"):
        w_s, w_b = surgery.projection_weight(s), surgery.projection_weight(b)
        if w_s.shape != w_b.shape:
            raise MechError(f"layer {i} {kind} has shape {tuple(w_s.shape)} in the student and {tuple(w_b.shape)} "
                            "in the base: compare students of one base model")
        names.append(module_key(i, kind))
        meta.append((i, kind))
        mats.append(param_update(w_b, w_s).cpu())
    if embeddings:
        parts = [(EMBEDDING, surgery.get_embedding)]
        if not surgery.embeddings_tied(student):
            parts.append((UNEMBEDDING, surgery.get_unembedding))
        for name, getter in parts:
            w_s, w_b = surgery.projection_weight(getter(student)), surgery.projection_weight(getter(base))
            if w_s.shape != w_b.shape:
                raise MechError(f"the {name} has shape {tuple(w_s.shape)} in the student and {tuple(w_b.shape)} "
                                "in the base: compare students of one base model")
            names.append(name)
            meta.append((None, name))
            mats.append(param_update(w_b, w_s).cpu())
    specs = linalg.svd_stack(mats)
    return {n: ModuleUpdate(n, i, k, s) for n, (i, k), s in zip(names, meta, specs)}


def student_updates(base: Any, student: Any) -> dict[str, ModuleUpdate]:
    """LoRA or full updates, whichever the student is."""
    return lora_updates(student) if surgery.lora_modules(student) else full_updates(base, student)


def geometry_rows(updates: dict[str, ModuleUpdate]) -> list[dict[str, Any]]:
    return [u.row() for u in updates.values()]


# --------------------------------------------------------------------------------------------- rebuilt students


def transformed(update: ModuleUpdate, mode: str, k: int) -> torch.Tensor:
    """ΔW with its top-k singular directions kept (``truncate``) or removed (``remove``); k is capped at the
    module's width so one k can be applied to modules of different ranks (a rank-1 LoRA at k = 4 is whole)."""
    k = min(k, int(update.spectrum.S.numel()))
    if mode == TRUNCATE:
        return linalg.truncated(update.spectrum, k)
    if mode == REMOVE:
        return linalg.top_removed(update.spectrum, k)
    raise MechError(f"unknown truncation mode {mode!r}: expected {TRUNCATE} or {REMOVE}")


def max_rank(updates: dict[str, ModuleUpdate]) -> int:
    return max(u.spectrum.rank() for u in updates.values())


@torch.no_grad()
def rebuild(base: Any, updates: dict[str, ModuleUpdate], mode: str, k: int, student: Any = None) -> Any:
    """A plain copy of ``base`` with every module's ΔW replaced by its transformed version (see
    :func:`transformed`). ``student``: a full-FT student whose one-dimensional parameters (norms, biases) are
    copied over unchanged (they have no spectrum). ``k`` must not exceed the largest numerical rank."""
    if surgery.unwrap(base) is not base:
        raise MechError("the base model is PEFT-wrapped: pass the plain base model")
    linalg.check_k(k, max(u.spectrum.S.numel() for u in updates.values()))
    model = copy.deepcopy(base).eval()
    if student is not None and surgery.unwrap(student) is student:
        own = dict(model.named_parameters())
        for name, _b, s in param_pairs(base, student):
            if s.ndim < 2:
                own[name].copy_(s.detach().to(own[name].dtype))
    layers = surgery.get_layers(model)
    for u in updates.values():
        if u.layer is None:
            getter = surgery.get_embedding if u.kind == EMBEDDING else surgery.get_unembedding
            w = surgery.projection_weight(getter(model))
        else:
            w = surgery.projection_weight(surgery.get_projection(layers[u.layer], u.kind))
        delta = transformed(u, mode, k)
        if tuple(delta.shape) != tuple(w.shape):
            raise MechError(f"update {u.name} has shape {tuple(delta.shape)}, the base's weight {tuple(w.shape)}: "
                            "rebuild on the base the student was trained on")
        w.add_(delta.to(w.device, w.dtype))
    return model
