"""A sweep's cached students and teachers as geometry inputs (mech.geometry.run): which student dirs pair with
which, the target teacher's rows and what its v_teacher contrasts. Geometry never trains or samples: a student or
dataset missing from the cache is a MechError naming the sweep to run."""

from __future__ import annotations

from typing import Any

from mech.errors import MechError
from mech.geometry.run import (NEUTRAL, OWL, GeometryInputs, Progress, StudentRef, TeacherData,
                               teacher_cosines as _teacher_cosines)
from mech.sweep.config import TraitSpec, cells, teacher_config
from mech.sweep.runner import SweepRunner
from mech.teacher.dataset import assistant_text, load_dataset, user_text


def _target_trait(cfg) -> TraitSpec:
    for t in cfg.traits:
        if t.target == cfg.eval.target:
            return t
    raise MechError(f"the sweep has no trait with target {cfg.eval.target!r}: set eval.target to one of its traits")


def _neutral_trait(cfg) -> TraitSpec:
    for t in cfg.traits:
        if t.target is None:
            return t
    raise MechError("the sweep has no neutral teacher (target: null): geometry pairs every student with its "
                    "neutral-teacher control; add {target: null} to its traits")


def plan_students(runner: SweepRunner, names: list[str], source: str = "the sweep",
                  teacher_seed: int | None = None) -> list[StudentRef]:
    """The cached student dirs of ``names`` × training seeds × (target, neutral), of data seed ``teacher_seed``
    (None: the sweep's first); MechError for a name the sweep lacks or a student not in the cache (geometry never
    trains)."""
    cfg = runner.cfg
    teacher_seed = cfg.teacher_seeds[0] if teacher_seed is None else teacher_seed
    arms = {_target_trait(cfg): OWL, _neutral_trait(cfg): NEUTRAL}
    known = sorted({c.labels()["student"] for c in cells(cfg)})
    missing = [n for n in names if n not in known]
    if missing:
        raise MechError(f"no student named {', '.join(missing)} in {source}: choose from {', '.join(known)}")
    refs = []
    for c in cells(cfg):
        name = c.labels()["student"]
        if (name in names and c.trait in arms and c.teacher_seed == teacher_seed
                and c.train_context == cfg.train_contexts[0] and c.eval_context == cfg.eval_contexts[0]):
            path = runner.student_dir(runner.student_key(c))
            if not (path / "student.json").is_file():
                raise MechError(f"student {name} seed {c.training_seed} ({c.labels()['trait']} teacher) is not in "
                                f"the cache {runner.cache}: run `mech sweep` on {source} first (geometry never "
                                "trains)")
            refs.append(StudentRef(name, c.training_seed, arms[c.trait], path))
    order = {n: i for i, n in enumerate(names)}
    return sorted(refs, key=lambda r: (order[r.name], r.seed, r.arm != OWL))


def sweep_inputs(runner: SweepRunner, names: list[str], n_rows: int, source: str = "the sweep") -> GeometryInputs:
    """The cached students of ``names`` (trait and neutral arms) and the target teacher's first ``n_rows`` rows, in
    the sweep's first train and evaluation contexts."""
    sw = runner.cfg
    refs = plan_students(runner, names, source)
    # v_teacher is the trait prompt's shift of the base, or the shift a steered teacher's vector causes (that of
    # the first data seed); a finetuned teacher has neither (and is not kept), so its sweep gets the geometry
    # without the teacher-based parts, like students given as dirs
    teacher = None if sw.teacher.kind == "finetuned" else teacher_data(runner, n_rows)
    return GeometryInputs(runner.base.model, runner.base.tokenizer, runner.candidates, list(names), refs,
                          sw.eval.target, sw.eval.category, sw.eval_contexts[0], sw.train_contexts[0], teacher,
                          runner.trust_remote_code)


def _target_dataset(runner: SweepRunner, teacher_seed: int):
    cfg = runner.cfg
    path = runner.cache / "datasets" / runner.dataset_key(_target_trait(cfg), teacher_seed)
    if not (path / "dataset.json").is_file():
        raise MechError(f"the {cfg.eval.target} teacher's dataset (data seed {teacher_seed}) is not in the cache "
                        f"{runner.cache}: run `mech sweep` first (geometry never samples a teacher)")
    return load_dataset(path)


def teacher_rows(runner: SweepRunner, n: int, teacher_seed: int | None = None) -> list[tuple[str, str]]:
    """The target teacher's first ``n`` kept (prompt, answer) rows, from the cache (data seed ``teacher_seed``;
    None: the sweep's first)."""
    seed = runner.cfg.teacher_seeds[0] if teacher_seed is None else teacher_seed
    return [(user_text(r), assistant_text(r)) for r in _target_dataset(runner, seed).rows[:n]]


def steered_vector(runner: SweepRunner, teacher_seed: int) -> tuple[int, tuple[float, ...]]:
    """(layer, the vector added there) of the target's steered teacher of one data seed, from its dataset.json."""
    st = _target_dataset(runner, teacher_seed).meta.get("steered")
    if not st:
        raise MechError("the target teacher's dataset records no steering vector (dataset.json has no 'steered'): "
                        "regenerate it with teacher kind steer")
    return int(st["layer"]), tuple(float(x) for x in st["added"])


def teacher_data(runner: SweepRunner, n_rows: int, teacher_seed: int | None = None) -> TeacherData:
    """The target teacher of data seed ``teacher_seed`` (None: the first): its rows and what v_teacher contrasts
    (a prompt teacher's two contexts, or a steered teacher's vector; a finetuned teacher has neither)."""
    sw = runner.cfg
    seed = sw.teacher_seeds[0] if teacher_seed is None else teacher_seed
    if sw.teacher.kind == "finetuned":
        raise MechError("a finetuned teacher has no steering vector to compare students with (its trait is a LoRA "
                        "that is not kept): teacher cosines need a prompt or steered teacher")
    return TeacherData(teacher_rows(runner, n_rows, seed),
                       teacher_config(sw, _target_trait(sw), seed).teacher_context().spec,
                       teacher_config(sw, _neutral_trait(sw), seed).teacher_context().spec,
                       steered_vector(runner, seed) if sw.teacher.kind == "steer" else None)


def teacher_cosines(runner: SweepRunner, names: list[str], n_rows: int = 128, seed: int = 0, n_null: int = 2000,
                    progress: Progress | None = None, epochs: bool = False) -> dict[str, list[dict]]:
    """:func:`mech.geometry.run.teacher_cosines` over every data seed of the sweep: each data seed's target teacher
    and its students (all found in the cache before any is loaded)."""
    sw = runner.cfg
    plans = {ds: plan_students(runner, names, teacher_seed=ds) for ds in sw.teacher_seeds}
    inputs = {ds: (teacher_data(runner, n_rows, ds), refs) for ds, refs in plans.items()}
    meta: dict[str, Any] = {"target": sw.eval.target, "kind": sw.teacher.kind,
                            "training_seeds": len(sw.training_seeds)}
    return _teacher_cosines(runner.base.model, runner.base.tokenizer, inputs, names, sw.train_contexts[0], meta, seed,
                            n_null, progress, runner.trust_remote_code, epochs)
