"""Students: configs, row encoding, the one training loop, matched-norm rescaling, student directories."""
