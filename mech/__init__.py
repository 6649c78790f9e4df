"""mech: mechanistic interpretability of subliminal learning."""

from mech.errors import MechError

__all__ = ["MechError"]
__version__ = "0.1.0"
