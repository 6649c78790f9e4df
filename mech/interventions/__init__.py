"""Localisation interventions: the shared position × component × layer mask, weight grafting, patching."""

from mech.interventions.graft import (
    DECODE_POLICIES,
    Gate,
    Grafted,
    graft_generate,
    graft_logits,
    graft_metric,
    grafted,
)
from mech.interventions.mask import (
    MODES,
    NECESSITY,
    SUFFICIENCY,
    Mask,
    ResolvedMask,
    complement,
    resolve_positions,
    single_position_masks,
)
