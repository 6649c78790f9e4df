"""The matched-update-norm control: full finetuning rescaled to the update norms of a reference LoRA student.

Train plain full finetuning, then :func:`match_update_norms` against :func:`reference_norms` of the reference
(mech.students.train does both when ``StudentConfig.method`` is ``matched_norm``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mech.errors import MechError
from mech.models import surgery
from mech.students import store
from mech.students.config import MATCHED_NORM_SCOPES, StudentConfig, _choice


@torch.no_grad()
def match_update_norms(base_model, model, reference: dict[str, float], scope: str = "module") -> dict[str, float]:
    """Rescale the full-FT update ΔW = W_model − W_base of ``model`` in place to ``reference`` norms.

    ``reference`` is :func:`mech.students.store.update_norms` of a LoRA student. "module": each referenced
    projection's weight gets W_base + c·ΔW with ||c·ΔW||_F = the reference's norm, and every other parameter
    (other projections, biases, norms, embeddings) is reset to the base — the two students then change the
    same weight matrices. "global": every parameter's update is scaled by one factor so the global update
    norm equals the reference's. Returns the factors (per module key, or {"global": c}). The match is exact up
    to the parameters' dtype: in bf16, W_base + c·ΔW is rounded on storage (about 1e-3 relative on the norms
    of a tiny model, seen on an H200), so train and rescale matched-norm students on a float32 base.
    """
    _choice(scope, MATCHED_NORM_SCOPES, "matched_norm_scope")
    pairs = store.param_pairs(base_model, model)
    if scope == "global":
        now = store.update_norms(base_model, model)[store.GLOBAL]
        if now == 0:
            raise MechError("the full finetune left every weight unchanged: nothing to rescale; check lr and rows")
        c = reference[store.GLOBAL] / now
        for _, b, p in pairs:
            _set_update(b, p, c)
        return {store.GLOBAL: c}
    chosen = _reference_weights(model, reference)
    scales: dict[str, float] = {}
    for _, b, p in pairs:
        key = chosen.get(id(p))
        if key is None:
            p.copy_(b.detach().to(p.device, p.dtype))  # the LoRA reference leaves this parameter at the base
            continue
        now = float(store.param_update(b, p).norm())
        if now == 0:
            raise MechError(f"the full finetune left module {key} unchanged: its norm cannot be matched; check lr")
        scales[key] = reference[key] / now
        _set_update(b, p, scales[key])
    return scales


def _set_update(b: torch.Tensor, p: torch.Tensor, c: float) -> None:
    """p = b + c·(p − b), computed in float32."""
    p.copy_((b.detach().to(p.device, torch.float32) + c * store.param_update(b, p)).to(p.dtype))


def _reference_weights(model, reference: dict[str, float]) -> dict[int, str]:
    """id(weight) -> module key, for each projection of ``model`` that the reference names."""
    layers = surgery.get_layers(model)
    chosen: dict[int, str] = {}
    for key in reference:
        if key == store.GLOBAL:
            continue
        i, kind = store.parse_module_key(key)
        if i >= len(layers):
            raise MechError(f"reference module {key} does not exist in this {len(layers)}-layer model: use a "
                            "reference trained on the same base")
        chosen[id(surgery.get_projection(layers[i], kind).weight)] = key
    return chosen


def reference_norms(base_model, cfg: StudentConfig) -> dict[Any, dict[str, float]]:
    """Update norms of the matched-norm reference: {"final": ..., k: ... for each epoch when needed}."""
    ref = store.lora_reference(cfg.matched_norm_reference, "matched_norm_reference", "matched_norm")
    dirs: dict[Any, Path] = {"final": ref}
    if cfg.save_every_epoch:
        have = store.epoch_dirs(ref)
        missing = [k for k in range(1, cfg.epochs + 1) if k not in have]
        if missing:
            raise MechError(f"matched_norm_reference {ref} has no epoch-{missing[0]} checkpoint: train the reference "
                            "with save_every_epoch and as many epochs, or set save_every_epoch false")
        dirs.update({k: have[k] for k in range(1, cfg.epochs + 1)})
    return {k: store.update_norms(base_model, store.load_student(base_model, d)) for k, d in dirs.items()}
