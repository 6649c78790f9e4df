"""Control datasets, in the teacher-data format (mech.teacher.dataset), made without a model.

* :func:`random_numbers`: the teacher's prompts (same ``prompt_seed``) answered with uniformly drawn numbers
  (``answer_count`` ints in 0..``max_value``, banned numbers excluded), in the format each prompt asks for.
  Students trained on it separate "learning number data at all" from "learning this teacher's numbers".
* :func:`shuffled`: a trait dataset with its numbers permuted, either ``within`` each answer (the answer's
  numbers in a new order) or ``across`` answers (all numbers pooled and dealt out again, each answer keeping
  how many it had). Every answer keeps its exact text around the numbers (brackets, separators, trailing
  period), so only which number stands where changes: a trait signal in number order (within) or in
  number co-occurrence (across) is destroyed while the number marginals are kept.

Each random draw comes from ``random.Random`` seeded with a string (hashed with SHA-512 by Python, so no
dependence on PYTHONHASHSEED); the same inputs give the same bytes.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

from mech.teacher.dataset import (
    assistant_text,
    check_free,
    load_dataset,
    make_row,
    user_text,
    write_dataset,
)
from mech.teacher.filter import check_answer, filter_rows
from mech.teacher.prompts import format_numbers
from mech.teacher.generate import TeacherConfig
from mech.errors import MechError

KIND_RANDOM = "control_random"
SHUFFLE_MODES = ("within", "across")
KIND_SHUFFLED = {m: f"control_shuffled_{m}" for m in SHUFFLE_MODES}

_NUMBER = re.compile(r"[0-9]+")  # what the filter parses as a number (mech.teacher.filter)


def _filter_and_write(rows: list[dict], cfg_filter: tuple[int, int, frozenset[int]], out_dir, meta: dict,
                      overwrite: bool) -> Path:
    answer_count, max_value, banned = cfg_filter
    raw = []
    for r in rows:
        result = check_answer(assistant_text(r), answer_count, max_value, banned)
        raw.append({**r, "ok": result.ok, "reason": result.reason})
    kept, audit = filter_rows([{"answer": assistant_text(r), "row": r} for r in rows], "answer", answer_count,
                              max_value, banned)
    return write_dataset(out_dir, raw, [k["row"] for k in kept], audit, meta, overwrite=overwrite)


def random_numbers(cfg: TeacherConfig, out_dir: str | os.PathLike, seed: int, overwrite: bool = False) -> Path:
    """The prompts of ``cfg`` answered with uniform random numbers; returns ``out_dir``.

    Only the prompt and filter fields of ``cfg`` matter (n_prompts, prompt_seed, answer_count, max_value,
    banned); row ``i`` draws from its own generator seeded by (seed, prompt_seed, i).
    """
    check_free(out_dir, overwrite)
    banned = set(cfg.banned)
    pool = [v for v in range(cfg.max_value + 1) if v not in banned]
    if not pool:
        raise MechError(f"every number 0..{cfg.max_value} is banned: nothing to draw; ban fewer numbers")
    rows = []
    for i, p in enumerate(cfg.prompts()):
        rng = random.Random(f"mech.control-random:{int(seed)}:{cfg.prompt_seed}:{i}")
        nums = [rng.choice(pool) for _ in range(cfg.answer_count)]
        rows.append(make_row(p.text, format_numbers(nums, p.format_suffix_index), cfg.prompt_seed, i))
    meta = {
        "kind": KIND_RANDOM,
        "config": cfg.to_dict(),
        "seed": int(seed),
        "source": {"generator": "uniform", "low": 0, "high": cfg.max_value, "count": cfg.answer_count,
                   "banned": list(cfg.banned)},
        "rendered_context": None,  # no teacher
    }
    return _filter_and_write(rows, (cfg.answer_count, cfg.max_value, frozenset(cfg.banned)), out_dir, meta,
                             overwrite)


def _numbers(text: str) -> list[int]:
    return [int(m.group()) for m in _NUMBER.finditer(text)]


def _put_numbers(text: str, numbers: list[int]) -> str:
    """``text`` with its digit runs replaced, in order, by ``numbers`` (everything between them kept)."""
    it = iter(numbers)
    return _NUMBER.sub(lambda _: str(next(it)), text)


def _source_filter(meta: dict[str, Any]) -> tuple[int, int, frozenset[int]]:
    """The filter settings the source was made with (its config's), else the defaults."""
    c = meta.get("config") or {}
    defaults = TeacherConfig()
    return (int(c.get("answer_count", defaults.answer_count)), int(c.get("max_value", defaults.max_value)),
            frozenset(int(b) for b in c.get("banned", ())))


def shuffled(src_dir: str | os.PathLike, out_dir: str | os.PathLike, mode: str, seed: int,
             overwrite: bool = False) -> Path:
    """The training rows of ``src_dir`` with their numbers permuted ``within`` or ``across`` answers."""
    if mode not in SHUFFLE_MODES:
        raise MechError(f"unknown shuffle mode {mode!r}: expected 'within' or 'across'")
    check_free(out_dir, overwrite)
    src = load_dataset(src_dir)
    answers = src.answers()
    numbers = [_numbers(a) for a in answers]
    if mode == "within":
        dealt = []
        for i, nums in enumerate(numbers):
            nums = list(nums)
            random.Random(f"mech.control-shuffle-within:{int(seed)}:{i}").shuffle(nums)
            dealt.append(nums)
    else:
        pool = [n for nums in numbers for n in nums]
        random.Random(f"mech.control-shuffle-across:{int(seed)}").shuffle(pool)
        dealt, at = [], 0
        for nums in numbers:
            dealt.append(pool[at : at + len(nums)])
            at += len(nums)
    rows = [
        make_row(user_text(r), _put_numbers(a, d), r["prompt_seed"], r["index"])
        for r, a, d in zip(src.rows, answers, dealt)
    ]
    meta = {
        "kind": KIND_SHUFFLED[mode],
        "config": {"mode": mode, "seed": int(seed)},
        "seed": int(seed),
        "source": {
            "path": str(Path(src_dir)),
            "kind": src.kind,
            "rows_sha256": src.meta.get("rows_sha256"),
            "config": src.meta.get("config"),
        },
        "rendered_context": src.meta.get("rendered_context"),  # the teacher whose numbers these are
    }
    return _filter_and_write(rows, _source_filter(src.meta), out_dir, meta, overwrite)
