"""The embedded model organism: a small Qwen2 chat model that mech builds itself (see README).

Python API: ``build_cached`` (a recipe → a cached HF model directory), ``check_organism`` (bars a–e, the leak
matrix, the carrier and oracle probes), ``organism_info``. (Not ``build``/``check``: those names are the
submodules.)
The named recipes (mech.organism.config.RECIPES) ship built: ``organism`` (the positive control) in ``weights/``,
``organism-free`` (its channel-free twin) in ``weights-free/``, so a fresh install starts at once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mech.errors import MechError
from mech.paths import SHIPPED_WEIGHTS

META_FILE = "organism.json"


def shipped_dir(name: str = "organism") -> Path:
    """Where the build of the named recipe ships (it may not be built yet)."""
    if name not in SHIPPED_WEIGHTS:
        raise MechError(f"no shipped organism named {name!r}: choose one of {', '.join(SHIPPED_WEIGHTS)}")
    return SHIPPED_WEIGHTS[name]


def cached_dir(config_hash: str) -> Path:
    from mech.paths import cache_root

    return cache_root() / "organism" / config_hash


def read_meta(path: str | Path) -> dict:
    f = Path(path) / META_FILE
    if not f.is_file():
        raise MechError(f"{path} is not an organism build (no {META_FILE}): pass an organism directory or run "
                        "`mech organism build`")
    return json.loads(f.read_text())


def build_cached(cfg=None, out: str | Path | None = None, force: bool = False, progress=None) -> Path:
    """Build ``cfg`` (the ``organism`` recipe when None) into ``out`` (default: the cache, named by the config hash).
    An existing complete build is reused unless ``force``."""
    from mech.organism.build import build_organism
    from mech.organism.config import recipe

    cfg = cfg or recipe("organism")
    out = Path(out) if out is not None else cached_dir(cfg.hash)
    check_build_out(out)
    if (out / META_FILE).is_file() and not force:
        if read_meta(out).get("config_hash") == cfg.hash:
            return out
        raise MechError(f"{out} holds another organism build: pass --force to replace it or choose another --out")
    return build_organism(cfg, out, progress=progress)


def check_build_out(out: Path) -> None:
    """A build replaces ``out`` atomically, so ``out`` must be new, empty or an organism build: a file, or a
    folder of anything else, would be lost (``--force`` replaces an organism build only). Checked before the
    minutes of pretraining, not after."""
    if out.exists() and not out.is_dir():
        raise MechError(f"--out {out} is a file: an organism build is a directory; choose a new --out")
    if out.is_dir() and not (out / META_FILE).is_file() and any(out.iterdir()):
        raise MechError(f"--out {out} is a folder that holds no organism build ({META_FILE} missing); a build "
                        "would replace it: choose a new or empty --out")


def check_organism(spec: str = "organism", progress=None, **kwargs: Any):
    """Load the organism at ``spec`` and measure its bars (mech.organism.check.run_check)."""
    from mech.models import load_model
    from mech.organism.check import run_check

    loaded = load_model(spec)
    if loaded.path is None:
        raise MechError(f"{spec} is not a local organism build: pass an organism directory")
    meta = read_meta(loaded.path)
    return run_check(loaded.model, loaded.tokenizer, meta, progress=progress, **kwargs)


def trait_numbers(spec: str, target: str) -> tuple[int, ...]:
    """The numbers the organism at ``spec`` ties to ``target`` (organism.json's ``entity_numbers``): what a
    banned-number teacher's filter drops."""
    from mech.models import resolve_spec

    resolved = resolve_spec(spec)
    if resolved.path is None or not (Path(resolved.path) / META_FILE).is_file():
        raise MechError(f"{spec} is not an organism build, so it records no numbers for {target!r}: list the "
                        "numbers to ban in the trait's banned: [...]")
    numbers = read_meta(resolved.path).get("entity_numbers", {})
    if target not in numbers:
        raise MechError(f"the organism at {spec} records no numbers for {target!r}: choose one of "
                        f"{', '.join(sorted(numbers))} or list the numbers in banned: [...]")
    return tuple(int(n) for n in numbers[target])


def organism_info(spec: str = "organism") -> dict:
    from mech.models import resolve_spec

    resolved = resolve_spec(spec)
    if resolved.path is None:
        raise MechError(f"{spec} is not a local organism build: pass an organism directory")
    meta = read_meta(resolved.path)
    return {"path": str(resolved.path), **{k: v for k, v in meta.items() if k != "entity_numbers"}}
