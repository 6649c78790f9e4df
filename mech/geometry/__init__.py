"""Geometry of a student's update and of the trait's directions (issue 9).

``linalg``: spectra, effective ranks, norms, principal angles and overlaps with their random expectation.
``update``: ΔW per module (LoRA through its factors, full finetuning as student − base, embeddings included),
and students rebuilt from a truncated update. ``steering``: steering vectors per layer (teacher and student),
the target's readout direction, write-space alignment and the steering tests. ``run``: the computation over a
sweep's students or student directories given directly, returning tables as data (``mech.report.geometry`` writes them).
"""
