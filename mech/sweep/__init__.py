"""Sweeps: a YAML grid → content-hashed cells → cached dataset → student → evaluation → a tidy table.

Grid axes: trait (teacher) × teacher seed × student (LoRA rank / full FT / matched norm / learning rate) ×
training seed × training context × evaluation context. Each stage's artifact is named by the hash of the
resolved config that produces it (and of its inputs' hashes), so re-running a sweep skips finished work and
two sweeps share what they have in common. ``--shard i/n`` gives a process the i-th contiguous block of whole
student groups; processes sharing a cache run at once safely, since each artifact is computed under its own
lock by one process only. Every artifact is written atomically: a killed sweep re-run completes without
recomputing finished cells. Tables are written by mech.report.sweep (``run_sweep`` computes and writes).
"""

from mech.sweep.config import (
    Cell,
    EvalDefaults,
    StudentSpec,
    SweepConfig,
    TeacherDefaults,
    TrainDefaults,
    TraitSpec,
    cells,
    eval_config,
    load_sweep,
    parse_shard,
    student_config,
    teacher_config,
)
from mech.sweep.runner import (
    METRICS,
    SweepRunner,
    finished_tables,
    results_rows,
    run_shard,
    select_students,
    student_cells,
    students_from_sweep,
    summary_rows,
)

__all__ = [
    "Cell", "EvalDefaults", "METRICS", "StudentSpec", "SweepConfig", "SweepRunner", "TeacherDefaults", "TrainDefaults",
    "TraitSpec", "cells", "eval_config", "finished_tables", "load_sweep", "parse_shard", "results_rows", "run_shard",
    "select_students", "student_cells", "student_config", "students_from_sweep", "summary_rows", "teacher_config",
]
