"""Localisation interventions: one position contract, one mask, grafting, patching, attribution, one result type."""

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
    single_position_masks,
    sweep_region,
)
from mech.interventions.positions import PositionSpec, position_indices, resolve_positions
from mech.interventions.result import Effect
