"""Number datasets on disk: one directory per dataset, written atomically, loaded with validation.

Layout (shared by teacher data and controls):

* ``rows.jsonl``: the filtered training rows, one JSON object a line, keys sorted::

      {"index": 3, "messages": [{"content": PROMPT, "role": "user"},
                                {"content": ANSWER, "role": "assistant"}], "prompt_seed": 0}

  chat ``messages`` form (loadable by ``datasets`` / TRL). The system prompt is never in a row: the trait
  prompt is absent from training by construction, and the training context is applied at training time.
  ``(prompt_seed, index)`` regenerates the prompt (``mech.teacher.prompts.row_seed``).
* ``raw.jsonl``: every sampled row, the same fields plus ``ok`` and ``reason`` (the filter's verdict);
* ``audit.json``: the filter's :class:`~mech.teacher.filter.Audit`;
* ``dataset.json``: what made it (``kind``, ``config``, ...), plus ``counts``, ``pass_rate`` and ``rows_sha256``
  that :func:`write_dataset` fills in from the rows themselves, so they cannot disagree with the data.

Every file is a pure function of its inputs (sorted keys, fixed separators, no timestamps), so the same
inputs give the same bytes and a content hash of ``rows.jsonl`` identifies the training data.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from mech.teacher.filter import Audit, require_rows
from mech.errors import MechError
from mech.store import atomic_dir, atomic_write_json, file_sha256, read_json_object

ROWS_FILE = "rows.jsonl"
RAW_FILE = "raw.jsonl"
AUDIT_FILE = "audit.json"
META_FILE = "dataset.json"
REQUIRED_FILES = (ROWS_FILE, RAW_FILE, AUDIT_FILE, META_FILE)

ROW_FIELDS = ("messages", "prompt_seed", "index")
OPTIONAL_ROW_FIELDS = ("loss_mask",)  # the divergence controls' per-token loss (mech.students.encoding.encode_row)
_ROW_HELP = (
    'expected {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}], '
    '"prompt_seed": int, "index": int} with no system message'
)


@dataclass(frozen=True)
class Dataset:
    """A loaded dataset directory: its training rows, ``dataset.json`` and ``audit.json``."""

    path: Path
    rows: list[dict]
    meta: dict
    audit: dict

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def kind(self) -> str:
        return str(self.meta.get("kind", ""))

    def prompts(self) -> list[str]:
        return [user_text(r) for r in self.rows]

    def answers(self) -> list[str]:
        return [assistant_text(r) for r in self.rows]


# --------------------------------------------------------------------------------------------- rows


def make_row(prompt: str, answer: str, prompt_seed: int, index: int, **extra: Any) -> dict:
    """A row in the shared format; ``extra`` adds raw-only fields (``ok``, ``reason``, ...)."""
    return {
        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
        "prompt_seed": int(prompt_seed),
        "index": int(index),
        **extra,
    }


def _turn(row: Mapping[str, Any], role: str) -> str:
    return next(m["content"] for m in row["messages"] if m["role"] == role)


def user_text(row: Mapping[str, Any]) -> str:
    return _turn(row, "user")


def assistant_text(row: Mapping[str, Any]) -> str:
    return _turn(row, "assistant")


def row_problem(row: Any) -> str | None:
    """Why ``row`` is not a valid row (a short phrase), or None when it is."""
    if not isinstance(row, dict):
        return f"is a {type(row).__name__}, not an object"
    missing = [f for f in ROW_FIELDS if f not in row]
    if missing:
        return f"lacks {', '.join(missing)}"
    msgs = row["messages"]
    if not isinstance(msgs, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs
    ):
        return "has messages that are not a list of {role, content} string objects"
    roles = [m["role"] for m in msgs]
    if "system" in roles:
        return "has a system message (the system prompt never goes in a row; contexts apply at training time)"
    if roles != ["user", "assistant"]:
        return f"has message roles {roles}, not one user then one assistant turn"
    for f in ("prompt_seed", "index"):
        if not isinstance(row[f], int) or isinstance(row[f], bool):
            return f"has a non-integer {f} ({row[f]!r})"
    return None


def check_rows(rows: Iterable[Any], where: str) -> list[dict]:
    rows = list(rows)
    for i, row in enumerate(rows):
        problem = row_problem(row)
        if problem is not None:
            raise MechError(f"row {i} of {where} {problem}: {_ROW_HELP}")
    return rows


# --------------------------------------------------------------------------------------------- files


def _jsonl(rows: Iterable[Mapping[str, Any]]) -> str:
    # sorted keys and fixed separators: the bytes depend on the rows only
    return "".join(json.dumps(r, sort_keys=True, ensure_ascii=False, separators=(", ", ": ")) + "\n" for r in rows)


def _read_jsonl(path: Path) -> list[Any]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise MechError(
                    f"{path} line {line_no} is not JSON ({e.msg}): the dataset is corrupt; delete {path.parent} "
                    "and generate it again"
                ) from None
    return rows


def _read_json(path: Path) -> dict:
    return read_json_object(path, f"delete {path.parent} and generate it again")


def _check_dir(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise MechError(f"{path} is a file, not a dataset directory: pass the directory `mech teacher --out` wrote")
    if not path.is_dir():
        raise MechError(
            f"dataset directory {path} does not exist: generate it first (teacher or control data) or check the path"
        )
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    if missing:
        raise MechError(
            f"{path} is not a complete dataset directory (missing {', '.join(missing)}): delete it and generate "
            "it again"
        )


def load_dataset(path: str | os.PathLike) -> Dataset:
    """Load and validate a dataset directory (training rows, ``dataset.json``, ``audit.json``)."""
    p = Path(path)
    _check_dir(p)
    rows = check_rows(_read_jsonl(p / ROWS_FILE), str(p / ROWS_FILE))
    return Dataset(path=p, rows=rows, meta=_read_json(p / META_FILE), audit=_read_json(p / AUDIT_FILE))


def load_raw(path: str | os.PathLike) -> list[dict]:
    """Every sampled row of a dataset directory, with the filter's ``ok`` and ``reason``."""
    p = Path(path)
    _check_dir(p)
    return check_rows(_read_jsonl(p / RAW_FILE), str(p / RAW_FILE))


def check_free(out_dir: str | os.PathLike, overwrite: bool) -> None:
    """Refuse early (before any sampling) to replace an existing dataset unless ``overwrite``."""
    if Path(out_dir).exists() and not overwrite:
        raise MechError(f"{out_dir} already exists: delete it, choose another directory or pass overwrite=True")


def write_dataset(
    out_dir: str | os.PathLike,
    raw_rows: list[dict],
    kept_rows: list[dict],
    audit: Audit,
    meta: Mapping[str, Any],
    overwrite: bool = False,
) -> Path:
    """Write a dataset directory atomically; returns it.

    ``kept_rows`` are the training rows (the row format, nothing else); ``raw_rows`` every sampled row with
    ``ok`` and ``reason``. An empty ``kept_rows`` raises (``require_rows``, showing the audit) and writes
    nothing. ``dataset.json`` is ``meta`` plus ``counts``, ``pass_rate`` and ``rows_sha256``.
    """
    require_rows(kept_rows, audit)
    check_free(out_dir, overwrite)
    check_rows(kept_rows, "the training rows")
    extra = [sorted(set(r) - set(ROW_FIELDS) - set(OPTIONAL_ROW_FIELDS)) for r in kept_rows]
    if any(extra):
        raise MechError(
            f"training rows carry extra fields {next(e for e in extra if e)}: keep raw-only fields (ok, reason) in "
            "raw_rows; training rows have exactly messages, prompt_seed, index"
        )
    check_rows(raw_rows, "the raw rows")
    if (audit.total, audit.kept) != (len(raw_rows), len(kept_rows)):
        raise ValueError(f"audit counts {audit.kept}/{audit.total} do not match {len(kept_rows)}/{len(raw_rows)} rows")
    if any("ok" not in r or "reason" not in r for r in raw_rows):
        raise MechError("every raw row needs the filter's 'ok' and 'reason' fields: add them before writing")
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        (tmp / ROWS_FILE).write_text(_jsonl(kept_rows), encoding="utf-8")
        (tmp / RAW_FILE).write_text(_jsonl(raw_rows), encoding="utf-8")
        atomic_write_json(tmp / AUDIT_FILE, audit.to_dict())
        atomic_write_json(tmp / META_FILE, {
            **meta,
            "counts": {"raw": len(raw_rows), "kept": len(kept_rows)},
            "pass_rate": audit.pass_rate,
            "rows_sha256": file_sha256(tmp / ROWS_FILE),
        })
    return Path(out_dir)
