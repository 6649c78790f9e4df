"""Where mech's own files live. A leaf: it imports nothing from mech, so any module may ask it."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).parent
ORGANISM_WEIGHTS = PACKAGE_DIR / "organism" / "weights"  # the shipped positive control (recipe "organism")
ORGANISM_FREE_WEIGHTS = PACKAGE_DIR / "organism" / "weights-free"  # its channel-free twin ("organism-free")
# model spec -> the shipped build of the recipe of that name (mech.organism.config.RECIPES)
SHIPPED_WEIGHTS = {"organism": ORGANISM_WEIGHTS, "organism-free": ORGANISM_FREE_WEIGHTS}


def cache_root() -> Path:
    """Where built artifacts live: $MECH_CACHE, else ~/.cache/mech."""
    return Path(os.environ.get("MECH_CACHE", Path.home() / ".cache" / "mech"))
