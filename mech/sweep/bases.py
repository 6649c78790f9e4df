"""Which base a cache's artifacts were keyed with, readable without loading the base.

Every dataset, student and evaluation key holds the base's fingerprint (mech.models.model_fingerprint, with the
placement suffix the runner adds), which needs the weights loaded. A sweep run therefore records, per base and
placement, ``<cache>/bases/<files>-<placement>.json``: ``<files>`` hashes the base's files as
mech.models.weights_identity reads them (config, safetensors index and shards, or the GGUF file: sizes and a strided
sample of their bytes, no weights loaded), and the record holds the fingerprint the keys were made with. ``mech
sweep --status`` looks the record up by the same files and names every cell's artifacts from it.

The record only informs: the runner's keys always come from the loaded weights, never from a record, so a record
that were wrong (a checkpoint rewritten so that its size and every sampled block stayed the same) could misreport a
status, never reuse an artifact.
"""

from __future__ import annotations

import json
from pathlib import Path

from mech.errors import MechError
from mech.store import atomic_write_json, content_hash, is_json_object


def placement_name(device_type: str, dtype: str) -> str:
    """``cpu-float32``, ``cuda-bfloat16``: where a base ran and in what."""
    return f"{device_type}-{dtype.removeprefix('torch.')}"


def _records_dir(cache: Path) -> Path:
    return Path(cache) / "bases"


def record_base(cache: Path, spec: str, placement: str, fingerprint: str) -> Path | None:
    """Record that ``spec``'s files, loaded in ``placement``, key artifacts by ``fingerprint``; returns the record's
    path, or None when the files cannot be read (a record is never worth failing a run for). Written atomically, and
    only when missing or different, so concurrent shards write the same bytes or nothing."""
    from mech.models import canonical_base_name, weights_identity

    try:
        files = weights_identity(spec)
    except (MechError, OSError):
        return None
    if not files:
        return None
    path = _records_dir(cache) / f"{content_hash(files)}-{placement}.json"
    record = {"spec": canonical_base_name(spec), "files": files, "placement": placement, "fingerprint": fingerprint}
    if is_json_object(path):
        old = json.loads(path.read_text())
        if all(old.get(k) == record[k] for k in ("files", "placement", "fingerprint")):
            return path
    atomic_write_json(path, record)
    return path


def expected_placement(device: str, dtype: str) -> tuple[str | None, str | None]:
    """(device type, dtype) a sweep's ``device`` / ``dtype`` resolve to on any host, None where it depends on the
    host (``auto``): the host that prints a status (a login node) need not be the one that runs the shards."""
    import torch

    from mech.models import parse_dtype

    dev = None if device == "auto" else torch.device(device).type
    if dtype != "auto":
        return dev, str(parse_dtype(dtype, "cpu")).removeprefix("torch.")
    return dev, ("float32" if dev == "cpu" else None)


def find_base(cache: Path, spec: str, device: str = "auto", dtype: str = "auto") -> tuple[dict | None, str]:
    """The record of ``spec``'s files in the placement a sweep's ``device`` / ``dtype`` give (with ``auto``: any),
    or None; and a line saying which record was used, or why there is none. Of several (``auto`` run on CPU and on
    GPU hosts), the most recently written."""
    from mech.models import weights_identity

    try:
        files = weights_identity(spec)
    except (MechError, OSError) as e:
        return None, (f"the files of base {spec} cannot be read here ({e}), so no record can be matched: every cell "
                      "counts as missing; run the status where the shards' base is readable")
    want = expected_placement(device, dtype)
    found = []
    for p in _records_dir(cache).glob(f"{content_hash(files)}-*.json"):
        rec = json.loads(p.read_text()) if is_json_object(p) else None
        if not rec or rec.get("files") != files or not isinstance(rec.get("fingerprint"), str):
            continue
        dev, _, dt = str(rec.get("placement", "")).partition("-")
        if want[0] in (None, dev) and want[1] in (None, dt):
            found.append((p.stat().st_mtime, str(p), rec))
    wanted = "" if want == (None, None) else f" ({want[0] or 'any device'}, {want[1] or 'any dtype'})"
    if not found:
        return None, (f"no sweep has run on base {spec}{wanted} in this cache yet: every cell is missing, and "
                      "which shard a cell belongs to is unknown until one has (cell keys hold the base's fingerprint, "
                      "which a run records here)")
    found.sort()
    _, path, rec = found[-1]
    note = f"base {spec} as run in {rec['placement']} (fingerprint {rec['fingerprint']}, recorded in {path})"
    others = [r["placement"] for _, _, r in found[:-1]]
    if others:
        note += (f"; also run in {', '.join(others)}, whose cells are keyed apart and not counted here (set device "
                 "and dtype in the YAML to choose)")
    return rec, note
