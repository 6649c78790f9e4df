"""The main job as computation: the organism check, a sweep and the localisation battery on its students, on one
loaded base model. Returns data; mech.report.reproduce writes the report.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from mech.errors import MechError

Stage = Callable[[str, int, int], None]  # (stage description, done, total)


@dataclass
class Reproduction:
    """Everything ``mech reproduce`` measured, ready for mech.report.reproduce."""

    model: str
    info: dict[str, Any]  # the organism build's provenance (mech.organism.organism_info)
    check: Any  # mech.organism.check.CheckReport; None for a model that is not an organism build
    sweep_cfg: Any  # the mech.sweep.SweepConfig that ran
    sweep: dict[str, Any]  # rows, summary, cells, done_cells, computed (mech.sweep.run_shard + finished_tables)
    localisation: Any  # mech.interventions.battery.Localisation
    seconds: float
    more_sweeps: list[tuple[Any, dict[str, Any]]] = dataclasses.field(default_factory=list)  # (config, tables)

    @property
    def role(self) -> str:
        """What this model's results are evidence of (mech.analysis.paper.model_role): only an organism build has a
        check, and its build record says whether it carries the designed channel."""
        from mech.analysis.paper import model_role

        return model_role(self.info, self.check is not None)

    def tests(self) -> list[dict[str, Any]]:
        """Every declared test of every sweep run, each labelled with its experiment."""
        return [t | {"experiment": cfg.name} for cfg, tables in [(self.sweep_cfg, self.sweep), *self.more_sweeps]
                for t in tables.get("tests") or []]

    def evidence(self) -> dict[str, list[dict[str, Any]]]:
        """Per paper claim, this run's tests and localisation nulls bearing on it (mech.analysis.paper)."""
        from mech.analysis.paper import claim_evidence

        loc = self.localisation
        return claim_evidence(self.tests(), getattr(loc, "nulls", None) or [], getattr(loc, "tests", None) or [])


def load_sweeps(paths: Sequence[str | Path]) -> list[Any]:
    """Each sweep YAML as a mech.sweep.SweepConfig; a missing file is a MechError naming the fix."""
    from mech.sweep import load_sweep

    for path in paths:
        if not Path(path).is_file():
            raise MechError(f"sweep file {path} not found: run from the repository root or pass --sweep PATH")
    return [load_sweep(p) for p in paths]


def run_reproduce(model: str, sweep_path: str | Path, students: list[str], cache: Path | None = None,
                  n_samples: int = 200, oracle_rows: int = 300, check_progress: Callable[[str], None] | None = None,
                  stage: Stage | None = None, null_sets: int = 0,
                  more_sweeps: Sequence[str | Path] = (), n_questions: int = 50, sampled: int = 0,
                  sampled_positions: Sequence[str] | None = None) -> Reproduction:
    """Check the organism at ``model``, run the sweep at ``sweep_path`` on it (cached), and localise the trait in
    ``students`` (names from the sweep's summary), paired against their neutral-teacher students, with
    ``null_sets`` random position sets per null region (0: none; ``mech localise --null-sets`` runs them); then run
    ``more_sweeps`` (their tables and declared tests join the report; nothing is localised in them). The battery
    runs on the first ``n_questions`` evaluation questions (fewer make it affordable on a large model's CPU run);
    ``sampled`` answers per question give its second, sampled metric for ``sampled_positions`` (0: none).
    The base model is loaded once and shared by all of it."""
    from mech import organism
    from mech.interventions.battery import LocaliseConfig, compute_localise
    from mech.models import load_model
    from mech.organism.check import run_check
    from mech.students.store import load_student
    from mech.sweep import SweepRunner, finished_tables, run_shard, select_students
    from mech.sweep.runner import select_controls

    t0 = time.time()
    # every sweep runs on the model being reproduced, whatever base its YAML names; all are checked before any work
    sweep_cfg, *extra_cfgs = [dataclasses.replace(c, base_model=model)
                              for c in load_sweeps([sweep_path, *more_sweeps])]
    # built before the model loads, so a bad value fails first
    lcfg = LocaliseConfig(target=sweep_cfg.eval.target, category=sweep_cfg.eval.category,
                          eval_context=sweep_cfg.eval_contexts[0], train_context=sweep_cfg.train_contexts[0],
                          null_sets=null_sets, null_positions=("shared",),  # the region the verdict reads
                          n_questions=n_questions, sampled=sampled,
                          **({"sampled_positions": tuple(sampled_positions)} if sampled_positions else {}))
    base = load_model(model, device=sweep_cfg.device, dtype=sweep_cfg.dtype)
    # the organism's bars are about the organism's designed behaviour: another model has none to check
    is_organism = base.path is not None and (base.path / organism.META_FILE).is_file()
    check = run_check(base.model, base.tokenizer, organism.read_meta(base.path), n_samples=n_samples,
                      oracle_rows=oracle_rows, progress=check_progress) if is_organism else None
    runner = SweepRunner(sweep_cfg, cache, stage, base=base)
    stats = run_shard(runner)
    groups = select_students(runner, students, str(sweep_path))
    controls = select_controls(runner, students, str(sweep_path))  # each student's neutral-teacher twin: paired
    loc = compute_localise(base.model, base.tokenizer, groups, lcfg, lambda d: load_student(base.model, d), stage,
                           controls)
    extra = []
    for cfg in extra_cfgs:
        more = SweepRunner(cfg, cache, stage, base=base)
        extra.append((cfg, run_shard(more) | finished_tables(more)))
    info = organism.organism_info(model) if is_organism else {"path": str(base.path) if base.path else None}
    return Reproduction(model=model, info=info, check=check, sweep_cfg=sweep_cfg,
                        sweep=stats | finished_tables(runner), localisation=loc, seconds=time.time() - t0,
                        more_sweeps=extra)
