"""A sweep's status in a cache: which cells are done, running or missing, and which shard each is in.

Read-only and model-free: the cells' keys come from the base's record (mech.sweep.bases), never from loading
weights, and nothing is computed or written in the cache. A cell is
- ``done``: its evaluation is cached (a readable JSON object, what the runner takes as finished);
- ``running``: not done, and an artifact it needs (its dataset, its source dataset, its student, the LoRA student a
  matched one is defined against, the base's or its own evaluation) is being built now: that artifact's lock is held
  (mech.store.lock_held). Every stage writes only while holding its lock, so a held lock is the whole test; a
  leftover temporary directory of a killed writer holds none and is not counted;
- ``missing``: neither (not started, or its run was stopped).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mech.paths import cache_root
from mech.store import is_json_object, lock_held
from mech.sweep.bases import find_base
from mech.sweep.config import Cell, SweepConfig, cells
from mech.sweep.runner import SweepRunner

STATES = ("done", "running", "missing")


def _inputs(runner: SweepRunner, cell: Cell) -> list[tuple[str, str]]:
    """(stage, key) of every artifact the cell's evaluation needs, its own evaluation included."""
    out = [("evals", runner.eval_path(cell).stem), ("evals", runner.base_eval_path(cell.eval_context).stem),
           ("students", runner.student_key(cell))]
    if cell.student.reference_rank is not None:
        out.append(("students", runner.student_key(runner._anchor(cell))))
    out.append(("datasets", runner.dataset_key(cell.trait, cell.teacher_seed)))
    if cell.trait.control not in (None, "random", "banned"):  # shuffled / divergence controls: made from the arm's data
        out.append(("datasets", runner.dataset_key(dataclasses.replace(cell.trait, control=None), cell.teacher_seed)))
    return out


def cell_state(runner: SweepRunner, cell: Cell) -> str:
    if is_json_object(runner.eval_path(cell)):
        return "done"
    if any(lock_held(runner._lock(stage, key)) for stage, key in _inputs(runner, cell)):
        return "running"
    return "missing"


def _counts(rows: list[dict]) -> dict[str, int]:
    return {s: sum(r["state"] == s for r in rows) for s in STATES}


def sweep_status(cfg: SweepConfig, cache: Path | None = None, shards: int | None = None) -> dict:
    """Every cell of ``cfg`` in ``cache`` (default $MECH_CACHE/sweeps): its labels, student key, state and, with
    ``shards``, the shard of ``--shard i/shards`` that computes it; the counts, overall and per shard; and a note on
    the base record the keys came from. Without a record no key is known: every cell is missing, shards unknown."""
    cache = Path(cache) if cache is not None else cache_root() / "sweeps"
    grid = cells(cfg)
    record, note = find_base(cache, cfg.base_model, cfg.device, cfg.dtype)
    shard_of: dict[Cell, int | None] = dict.fromkeys(grid)
    if record is None:
        rows = [c.labels() | {"student_key": None, "state": "missing", "shard": None} for c in grid]
    else:
        runner = SweepRunner.keys_only(cfg, record["fingerprint"], cache)
        order = grid
        if shards:
            order = []
            for i in range(shards):
                mine = runner.shard(grid, i, shards)
                shard_of.update(dict.fromkeys(mine, i))
                order += mine
        rows = [c.labels() | {"student_key": runner.student_key(c), "state": cell_state(runner, c),
                              "shard": shard_of[c]} for c in order]
    per_shard = None
    if shards and record is not None:
        per_shard = [{"shard": i, "cells": sum(r["shard"] == i for r in rows)}
                     | _counts([r for r in rows if r["shard"] == i]) for i in range(shards)]
    return {"name": cfg.name, "cache": str(cache), "base": cfg.base_model, "base_record": record, "note": note,
            "cells": len(grid), "counts": _counts(rows), "shards": shards, "per_shard": per_shard, "rows": rows}

