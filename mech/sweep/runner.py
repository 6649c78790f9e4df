"""The sweep runner: computes (or finds in the cache) each cell's dataset, student and evaluation, under
per-artifact locks, and returns the tables as data (mech.report.sweep writes them)."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from mech.errors import MechError
from mech.paths import cache_root
from mech.store import (append_jsonl, atomic_write_json, build_many, build_once, discard, file_lock,
                        is_json_object)
from mech.sweep.bases import placement_name, record_base
from mech.sweep.config import (Cell, StudentSpec, SweepConfig, TraitSpec, cells, eval_config, load_sweep,
                               stage_key, student_config, teacher_config)


# ----------------------------------------------------------------------------------------------- the runner

Progress = Callable[[str, int, int], None]  # (stage description, done, total)


class SweepRunner:
    """Computes (or finds in the cache) the dataset, student and evaluation of each cell.

    Processes sharing a cache (shards, or two sweeps with cells in common) each compute a missing artifact
    only under its lock, ``<cache>/locks/<stage>-<key>.lock``: whoever waited finds it done."""

    def __init__(self, cfg: SweepConfig, cache: Path | None = None, progress: Progress | None = None,
                 base: Any = None, trust_remote_code: bool = False):
        """``base``: the already loaded ``cfg.base_model`` (a mech.models.LoadedModel), so a caller that holds it
        (``mech reproduce``) does not load it twice. ``trust_remote_code``: see mech.models.load_model."""
        from mech.models import load_model, model_fingerprint

        self.cfg = cfg
        self.trust_remote_code = trust_remote_code
        self.cache = Path(cache) if cache is not None else cache_root() / "sweeps"
        self.progress = progress or (lambda desc, done, total: None)
        self.base = base if base is not None else load_model(cfg.base_model, device=cfg.device, dtype=cfg.dtype,
                                                             trust_remote_code=trust_remote_code)
        # the fingerprint ignores dtype, but samples, students and evaluations do not: a base run anywhere but
        # CPU float32 (where every existing cache was made) keys its artifacts apart
        placement = (self.base.device.type, str(self.base.dtype).removeprefix("torch."))
        self.placement = placement_name(*placement)
        self.fingerprint = model_fingerprint(self.base.model) + ("" if placement == ("cpu", "float32")
                                                                 else "-" + "-".join(placement))
        self.computed = {"datasets": 0, "students": 0, "evals": 0}
        # one candidate-answer list for the base and every student, so answer distributions line up
        from mech.evaluation.trait import candidate_answers

        self.candidates, _ = candidate_answers(self.base.model, cfg.eval.category, cfg.eval.target)
        self._engine = None  # the base's vLLM engine (backend vllm), started on first use

    # the vLLM engine --------------------------------------------------------------------------------------------
    def _new_engine(self, spec: str, lora_rank: int | None = None):
        """A vLLM engine of ``spec`` (the base, or a full student's dir) with the sweep's engine settings."""
        from mech.evaluation.vllm_backend import engine_for

        return engine_for(spec, self.base.dtype, lora_rank=lora_rank, max_loras=self.cfg.vllm.max_loras,
                          gpu_memory_utilization=self.cfg.vllm.gpu_memory_utilization,
                          trust_remote_code=self.trust_remote_code)

    def vllm_engine(self):
        """The base's vLLM engine, serving every LoRA student of the sweep as an adapter (backend vllm only)."""
        from mech.sweep.config import vllm_lora_rank

        if self._engine is None:
            self._engine = self._new_engine(self.cfg.base_model, vllm_lora_rank(self.cfg))
        return self._engine

    def close_engine(self) -> None:
        """Give the engine's GPU memory back (before a student trains; the next sample starts it again)."""
        if self._engine is not None:
            self._engine.close()

    @contextlib.contextmanager
    def _serving(self, cell: Cell | None):
        """What samples a trait evaluation under backend vllm: the base engine (``cell`` None), a LoRA student as an
        adapter on it, or a full-model student's own engine, shut down after (with the base's closed first, so the
        two never share the card). None under backend hf."""
        from mech.evaluation.vllm_backend import Served
        from mech.students.store import LORA, student_kind

        if eval_config(self.cfg, self.cfg.eval_contexts[0]).backend != "vllm":
            yield None
        elif cell is None:
            yield Served(self.vllm_engine())
        elif student_kind(self.student(cell)) == LORA:
            yield Served(self.vllm_engine(), self.student(cell))
        else:
            self.close_engine()
            with contextlib.closing(self._new_engine(str(self.student(cell)))) as own:
                yield Served(own)

    @classmethod
    def keys_only(cls, cfg: SweepConfig, fingerprint: str, cache: Path | None = None) -> "SweepRunner":
        """A runner that names a sweep's artifacts (keys, paths, locks, shards) from its base's known
        ``fingerprint`` (mech.sweep.bases), with no model loaded: it can tell what is cached, never compute."""
        runner = cls.__new__(cls)
        runner.cfg, runner.fingerprint = cfg, fingerprint
        runner.cache = Path(cache) if cache is not None else cache_root() / "sweeps"
        return runner

    def record_base(self) -> Path | None:
        """Record in the cache which fingerprint this base's files key artifacts by (mech.sweep.bases), so a
        status can name the cells without loading the weights."""
        return record_base(self.cache, self.cfg.base_model, self.placement, self.fingerprint)

    def _cached(self, stage: str, key: str, path: Path, marker: Path, compute: Callable[[], Any]) -> Path:
        """The one cache protocol of every stage: ``path`` is complete once ``marker`` exists; else compute it.
        A marker that is not a readable JSON object (a truncated or edited file) counts as missing."""
        lock = self._lock(stage, key)
        if marker.exists() and not is_json_object(marker):
            with file_lock(lock):
                if marker.exists() and not is_json_object(marker):  # another process may have redone it
                    warnings.warn(f"the cached {stage[:-1]} {path} is corrupt ({marker.name} is not a JSON "
                                  "object): recomputing it", stacklevel=2)
                    discard(path)
        if build_once(marker, path, lock, compute):
            self._record(stage, key)
        return path

    def _lock(self, stage: str, key: str) -> Path:
        return self.cache / "locks" / f"{stage}-{key}.lock"

    def _record(self, stage: str, key: str) -> None:
        self.computed[stage] += 1
        # an audit of who computed what: an artifact listed twice was computed twice
        append_jsonl(self.cache / "computed.jsonl", {"stage": stage, "key": key, "pid": os.getpid(),
                                                     "host": socket.gethostname(), "time": round(time.time(), 3)})

    # datasets ------------------------------------------------------------------------------------------------
    def dataset_key(self, trait: TraitSpec, teacher_seed: int) -> str:
        # to_dict leaves out options at their off value, so adding one never changes an existing dataset's key
        tc = teacher_config(self.cfg, trait, teacher_seed).to_dict()
        if trait.control == "random":  # no model: the prompts, the filter and the seed make it
            return stage_key("dataset", "control_random", tc)
        if trait.control in ("shuffled_within", "shuffled_across"):
            source = self.dataset_key(dataclasses.replace(trait, control=None), teacher_seed)
            return stage_key("dataset", trait.control, source, teacher_seed)
        if trait.control in ("divergence_only", "divergence_off"):  # the base reads the source rows in two contexts
            source = self.dataset_key(dataclasses.replace(trait, control=None), teacher_seed)
            return stage_key("dataset", trait.control, source, self.fingerprint, self.cfg.teacher.context)
        return stage_key("dataset", self.fingerprint, tc)

    def dataset(self, trait: TraitSpec, teacher_seed: int) -> Path:
        from mech.teacher import controls
        from mech.teacher.generate import generate

        key = self.dataset_key(trait, teacher_seed)
        path = self.cache / "datasets" / key
        desc = f"teacher {trait.label} seed {teacher_seed}"
        tc = teacher_config(self.cfg, trait, teacher_seed)
        if trait.control == "random":
            compute = lambda: controls.random_numbers(tc, path, seed=teacher_seed)  # noqa: E731
        elif trait.control in ("shuffled_within", "shuffled_across"):
            compute = lambda: controls.shuffled(  # noqa: E731
                self.dataset(dataclasses.replace(trait, control=None), teacher_seed), path,
                trait.control.removeprefix("shuffled_"), seed=teacher_seed)
        elif trait.control in ("divergence_only", "divergence_off"):
            from mech.teacher.divergence import divergence_control

            compute = lambda: divergence_control(  # noqa: E731
                self.base.model, self.base.tokenizer, self.dataset(dataclasses.replace(trait, control=None),
                                                                   teacher_seed),
                path, trait.control.removeprefix("divergence_"), tc.teacher_context(), self.cfg.teacher.context)
        else:
            from mech.evaluation.vllm_backend import Served

            compute = lambda: generate(self.base.model, self.base.tokenizer, tc, path,  # noqa: E731
                                       progress=lambda done, total: self.progress(desc, done, total),
                                       served=Served(self.vllm_engine()) if tc.backend == "vllm" else None)
        return self._cached("datasets", key, path, path / "dataset.json", compute)

    # students ------------------------------------------------------------------------------------------------
    def _reference_cell(self, cell: Cell) -> Cell:
        ref = StudentSpec(method="lora", rank=cell.student.reference_rank, alpha=cell.student.alpha)
        return dataclasses.replace(cell, student=ref)

    def _anchor(self, cell: Cell) -> Cell:
        """The cell itself, or the LoRA reference a matched-norm / matched-loss student is defined against."""
        return self._reference_cell(cell) if cell.student.reference_rank is not None else cell

    def student_key(self, cell: Cell) -> str:
        ref_key = self.student_key(self._reference_cell(cell)) if cell.student.reference_rank is not None else None
        sc = student_config(self.cfg, cell.student, cell.training_seed, cell.train_context, reference=ref_key)
        # a student is its base's: every dataset key but the model-free random numbers' already holds the base's
        # fingerprint, so only those students add it (the others' keys, and caches, stay as they were)
        base = (self.fingerprint,) if cell.trait.control == "random" else ()
        return stage_key("student", self.dataset_key(cell.trait, cell.teacher_seed), sc.to_dict(),
                         self.cfg.train.max_rows, *base)

    def student_dir(self, key: str) -> Path:
        """Where the student of ``key`` is cached (complete once its student.json exists)."""
        return self.cache / "students" / key

    def student(self, cell: Cell) -> Path:
        key = self.student_key(cell)
        path = self.student_dir(key)
        return self._cached("students", key, path, path / "student.json", lambda: self._train(cell, path))

    def _train(self, cell: Cell, path: Path) -> None:
        from mech.students.train import train_student

        # inputs are made (under their own locks) inside this student's lock: locks are always taken from a
        # dependent to its inputs, never back, so shards waiting on each other cannot deadlock
        reference = str(self.student(self._reference_cell(cell))) if cell.student.reference_rank is not None else None
        rows = self._rows(cell)
        self.close_engine()  # training needs the card
        sc = student_config(self.cfg, cell.student, cell.training_seed, cell.train_context, reference=reference)
        desc = f"train {cell.labels()['student']} seed {cell.training_seed} on {cell.labels()['trait']}"
        train_student(self.base.model, self.base.tokenizer, rows, sc, path, base_spec=self.cfg.base_model,
                      teacher=self.distill_teacher(cell) if sc.objective == "distill" else None,
                      progress=lambda step, total, *_: self.progress(desc, step, total))

    def _rows(self, cell: Cell) -> list[dict]:
        from mech.teacher.dataset import load_dataset

        rows = load_dataset(self.dataset(cell.trait, cell.teacher_seed)).rows
        return rows if self.cfg.train.max_rows is None else rows[: self.cfg.train.max_rows]

    # batched students ----------------------------------------------------------------------------------------
    def batch_groups(self, todo: list[Cell]) -> list[list[Cell]]:
        """The uncached LoRA students of ``todo`` (and the LoRA references of its matched-norm / -loss cells) that can train
        together, in batches of at most ``train.batch_students``: each batch shares a dataset and a batch plan
        (mech.students.batched.batch_plan), so its students see the same rows at every step and each comes out
        as its solo run would. Students that cannot be batched, or would be alone, are left to :meth:`student`."""
        from mech.students.batched import batch_plan, unbatchable

        size = self.cfg.train.batch_students
        if size < 2:
            return []
        plans: dict[tuple, dict[str, Cell]] = {}
        for cell in todo:
            cell = self._anchor(cell)
            if cell.student.method != "lora":
                continue
            key = self.student_key(cell)
            sc = student_config(self.cfg, cell.student, cell.training_seed, cell.train_context)
            if unbatchable(sc) is None and not (self.student_dir(key) / "student.json").exists():
                plans.setdefault((self.dataset_key(cell.trait, cell.teacher_seed), batch_plan(sc)), {})[key] = cell
        groups = []
        for plan in sorted(plans, key=repr):  # a fixed order, so shards that share students batch them alike
            chosen = [plans[plan][key] for key in sorted(plans[plan])]
            groups += [chosen[i:i + size] for i in range(0, len(chosen), size) if len(chosen[i:i + size]) > 1]
        return groups

    def train_batched(self, todo: list[Cell]) -> None:
        """Train :meth:`batch_groups` of ``todo`` one batched run per group, each student into its own cache entry
        (under its own lock: :func:`mech.store.build_many`), so every later :meth:`student` is a cache hit."""
        for group in self.batch_groups(todo):
            keys = [self.student_key(c) for c in group]
            paths = [self.student_dir(key) for key in keys]
            artifacts = [(p / "student.json", p, self._lock("students", key)) for p, key in zip(paths, keys)]
            for i in build_many(artifacts, lambda todo: self._train_group([group[i] for i in todo],
                                                                          [paths[i] for i in todo])):
                self._record("students", keys[i])

    def _train_group(self, group: list[Cell], paths: list[Path]) -> None:
        from mech.students.batched import Job, train_students

        if len(group) == 1:  # the others were finished meanwhile (another shard): train it as usual
            self._train(group[0], paths[0])
            return
        jobs = [Job(self._rows(c), student_config(self.cfg, c.student, c.training_seed, c.train_context))
                for c in group]
        self.close_engine()  # training needs the card
        c = group[0]
        desc = (f"train {', '.join(x.labels()['student'] for x in group)} batched, seed {c.training_seed} on "
                f"{c.labels()['trait']}")
        train_students(self.base.model, self.base.tokenizer, jobs, paths, base_spec=self.cfg.base_model,
                       progress=lambda step, total, *_: self.progress(desc, step, total))

    def distill_teacher(self, cell: Cell):
        """The model the cell's dataset was sampled from, as a distillation target: the base model in the
        teacher's own context (the trait prompt of a trait teacher, ``teacher.context`` of the neutral one)."""
        from mech.students.config import Teacher

        ctx = teacher_config(self.cfg, cell.trait, cell.teacher_seed).teacher_context()
        return Teacher(self.base.model, context=ctx.spec)

    # evaluations ---------------------------------------------------------------------------------------------
    def _eval_path(self, model_key: str, eval_context: str) -> Path:
        # to_dict leaves backend out at hf: the key is the one the dataclass gave before backends existed
        key = stage_key("eval", model_key, eval_config(self.cfg, eval_context).to_dict())
        return self.cache / "evals" / f"{key}.json"

    def _evaluate(self, model_key: str, load: Callable[[], Any], eval_context: str, cell: Cell | None = None
                  ) -> dict:
        from mech.evaluation.trait import evaluate_trait

        path = self._eval_path(model_key, eval_context)
        desc = f"eval {model_key[:24]} in {eval_context}"

        def compute() -> None:
            with load() as model, self._serving(cell) as served:
                res = evaluate_trait(model, self.base.tokenizer, eval_config(self.cfg, eval_context),
                                     candidates=self.candidates, served=served,
                                     progress=lambda stage: self.progress(f"{desc}: {stage}", 0, 0))
            atomic_write_json(path, res.to_dict())

        return json.loads(self._cached("evals", path.stem, path, path, compute).read_text())

    def _base_model_key(self) -> str:
        return f"base-{self.fingerprint}"

    def base_eval(self, eval_context: str) -> dict:
        return self._evaluate(self._base_model_key(), lambda: contextlib.nullcontext(self.base.model), eval_context)

    def _cell_model_key(self, cell: Cell) -> str:
        return f"student-{self.student_key(cell)}"

    def cell_eval(self, cell: Cell) -> dict:
        from mech.students.store import student_on_base

        # the adapter goes on the base itself for the evaluation (no 15 GB copy of a 7B base per student)
        return self._evaluate(self._cell_model_key(cell),
                              lambda: student_on_base(self.base.model, self.student(cell),
                                                      trust_remote_code=self.trust_remote_code),
                              cell.eval_context, cell)

    def eval_path(self, cell: Cell) -> Path:
        """Where the cell's evaluation is cached (the cell is done once it exists)."""
        return self._eval_path(self._cell_model_key(cell), cell.eval_context)

    def base_eval_path(self, eval_context: str) -> Path:
        return self._eval_path(self._base_model_key(), eval_context)

    def is_done(self, cell: Cell) -> bool:
        return self.eval_path(cell).is_file()

    # shards --------------------------------------------------------------------------------------------------
    def group_key(self, cell: Cell) -> tuple[str, str]:
        """Cells that must share a shard: one student's evaluation contexts, and a matched-norm / -loss student
        with the LoRA reference it is defined against (on one dataset), so a shard never waits on another's training."""
        return self.dataset_key(cell.trait, cell.teacher_seed), self.student_key(self._anchor(cell))

    def shard(self, all_cells: list[Cell], i: int, n: int) -> list[Cell]:
        """Shard ``i`` of ``n``: a contiguous block of whole groups in a fixed order (content hashes), about
        1/n of the cells. Blocks keep groups and datasets together; the artifact locks cover the rest."""
        order = sorted(all_cells, key=lambda c: self.group_key(c) + (self.student_key(c), c.eval_context))
        mine, start = [], 0
        for _, group in itertools.groupby(order, key=self.group_key):
            group = list(group)
            if start * n // len(order) == i:  # the block a group falls in is where its first cell falls
                mine += group
            start += len(group)
        return mine


def students_from_sweep(sweep_path: str, names: list[str], cache=None, progress=None):
    """The trait students of ``names`` (all training seeds) from a sweep's cache, trained if missing.
    Returns (runner, {group name: [student dir, ...]}) for the sweep's first train/eval contexts."""
    cfg = load_sweep(sweep_path)
    student_cells(cfg, names, sweep_path)  # a name the sweep lacks fails before the model loads
    runner = SweepRunner(cfg, cache, progress)
    return runner, select_students(runner, names, sweep_path)


def student_cells(cfg: SweepConfig, names: list[str], source: str = "the sweep") -> dict[str, list[Cell]]:
    """{name: [cell per training seed]} of the target-trait students called ``names`` in the sweep's first
    train/eval contexts; MechError naming the fault when the sweep has no such student."""
    targets = [t.target for t in cfg.traits if t.target is not None]
    if cfg.eval.target not in targets:
        raise MechError(f"no trait with target {cfg.eval.target!r} in {source} (its traits: "
                        f"{', '.join(targets) or 'only the neutral one'}): the students localised are those of "
                        "eval.target's teacher; add that trait or set eval.target to one of the traits")
    chosen: dict[str, list[Cell]] = {}
    for c in cells(cfg):
        name = c.labels()["student"]
        if (c.trait.target == cfg.eval.target and c.trait.control is None and name in names
                and c.train_context == cfg.train_contexts[0] and c.eval_context == cfg.eval_contexts[0]):
            chosen.setdefault(name, []).append(c)
    missing = [n for n in names if n not in chosen]
    if missing:
        known = sorted({c.labels()["student"] for c in cells(cfg)})
        raise MechError(f"no student named {', '.join(missing)} in {source}: choose from {', '.join(known)}")
    return chosen


def select_students(runner: SweepRunner, names: list[str], source: str = "the sweep") -> dict[str, list[Path]]:
    """{name: [student dir per training seed]} of :func:`student_cells`, trained if missing; ``source`` names
    the sweep in errors."""
    chosen = student_cells(runner.cfg, names, source)
    runner.train_batched([c for group in chosen.values() for c in group])
    return {name: [runner.student(c) for c in group] for name, group in chosen.items()}


def select_controls(runner: SweepRunner, names: list[str], source: str = "the sweep") -> dict[str, list[Path]]:
    """{name: [the neutral-teacher student of each :func:`select_students` student, same seeds and order]},
    trained if missing: the paired control of a localisation."""
    neutral = lambda c: dataclasses.replace(c, trait=TraitSpec(None, c.trait.category))  # noqa: E731
    chosen = {name: [neutral(c) for c in group] for name, group in student_cells(runner.cfg, names, source).items()}
    runner.train_batched([c for group in chosen.values() for c in group])
    return {name: [runner.student(c) for c in group] for name, group in chosen.items()}


# ----------------------------------------------------------------------------------------------- results

METRICS = ("logp_first", "p_first", "rate")


def _cell_metrics(res: dict) -> dict[str, float]:
    return {m: float(res[m]) for m in METRICS if res.get(m) is not None}


def results_rows(runner: SweepRunner, done: list[Cell]) -> list[dict]:
    """One row per cell × metric: raw values, Δ vs the base in the same rendered context, and the paired
    difference vs the control student (neutral teacher; same student config, seeds and contexts)."""
    rows = []
    evals = {cell: runner.cell_eval(cell) for cell in done}
    for cell in done:
        res = evals[cell]
        base = runner.base_eval(cell.eval_context)
        if res.get("context_hash") != base.get("context_hash"):
            raise MechError(f"cell {cell.labels()} was evaluated in another rendered context than its base: "
                            "clear the sweep cache")
        neutral = TraitSpec(None, cell.trait.category)
        control = evals.get(dataclasses.replace(cell, trait=neutral)) if cell.trait != neutral else None
        labels = cell.labels() | {"student_key": runner.student_key(cell)}
        vals = _cell_metrics(res)
        for m, v in vals.items():
            rows.append(labels | {"metric": m, "value": v})
            rows.append(labels | {"metric": f"delta_{m}", "value": v - float(base[m])})
            if control is not None and m in control:
                rows.append(labels | {"metric": f"paired_{m}", "value": v - float(control[m])})
    return rows


def summary_rows(rows: list[dict]) -> list[dict]:
    """Mean and 95 % CI per trait × student × contexts × metric: training seeds are averaged within their data
    (teacher) seed, and the interval is over data seeds (mech.analysis.stats.nested_ci); with one data seed it is
    over training seeds, conditional on that dataset (``ci_over`` says which)."""
    from mech.analysis.stats import nested_ci

    keys = ("trait", "category", "student", "method", "rank", "train_context", "eval_context", "metric")
    return nested_ci(rows, keys, "value", outer="teacher_seed")


def in_context_text(answers: list[str], k: int) -> str:
    """The in-context control's system prompt: the first ``k`` teacher answers, one per line."""
    if k < 1 or len(answers) < k:
        raise MechError(f"the in-context control needs {k} teacher answers, the dataset has {len(answers)}: lower "
                        "eval.in_context")
    return "\n".join(answers[:k])


def in_context_rows(runner: SweepRunner) -> list[dict]:
    """The in-context control: the base model, no finetuning, with ``eval.in_context`` of a teacher's answers as
    its system prompt, against the neutral teacher's answers of the same data seed in the same place; one row per
    trait arm × data seed × metric (``in_context_paired_<m>``; ``in_context_delta_<m>`` vs the plain base)."""
    from mech.teacher.dataset import load_dataset

    cfg = runner.cfg
    k = cfg.eval.in_context
    rows = []
    for trait in cfg.traits:
        neutral = TraitSpec(None, trait.category)
        if trait == neutral:
            continue
        for d in cfg.teacher_seeds:
            res = {}
            for arm in (trait, neutral):
                text = in_context_text(load_dataset(runner.dataset(arm, d)).answers(), k)
                res[arm] = runner.base_eval(f"custom:{text}")
            plain = runner.base_eval(cfg.eval_contexts[0])
            for m in METRICS:
                if res[trait].get(m) is None:
                    continue
                labels = {"trait": trait.label, "category": trait.category, "teacher_seed": d, "in_context": k}
                rows.append(labels | {"metric": f"in_context_paired_{m}",
                                      "value": float(res[trait][m]) - float(res[neutral][m])})
                rows.append(labels | {"metric": f"in_context_delta_{m}",
                                      "value": float(res[trait][m]) - float(plain[m])})
    return rows


def hypothesis_rows(cfg: SweepConfig, rows: list[dict], seed: int = 0) -> list[dict]:
    """The sweep's declared tests (mech.analysis.hypotheses) on its results rows, Holm / BH adjusted over all:
    each arm on its trait's rows (default eval.target) in its contexts (default the sweep's first); arms in other
    contexts pair with them within the same data and training seed."""
    from mech.analysis.hypotheses import run_declared
    from mech.sweep.config import hypothesis_arm

    names = {Cell(cfg.traits[0], 0, s, 0, "", "").labels()["student"]: s for s in cfg.students}
    pairs, ranks = [], {}
    for h in cfg.hypotheses:
        mine = []
        for arm in h.arms:  # each arm's rows (a student of one teacher in one context pair), relabelled by the arm
            want = hypothesis_arm(arm, cfg, h)
            if names[want[0]].method == "lora":
                ranks[arm] = names[want[0]].rank
            mine += [r | {"student": arm} for r in rows
                     if (r["student"], r["trait"], r["train_context"], r["eval_context"]) == want]
        pairs.append((h, mine))
    return run_declared(pairs, ranks, seed=seed)


def run_shard(runner: SweepRunner, i: int = 0, n: int = 1,
              cell_progress: Callable[[int, int], None] | None = None) -> dict:
    """Compute (or find cached) every cell of shard ``i`` of ``n``; returns run statistics."""
    all_cells = cells(runner.cfg)
    mine = runner.shard(all_cells, i, n)
    t0 = time.time()
    runner.record_base()  # before any work, so a status run meanwhile can name the cells
    try:
        runner.train_batched([c for c in mine if not runner.is_done(c)])  # a finished cell's student is not needed
        for k, cell in enumerate(mine):
            runner.base_eval(cell.eval_context)
            runner.cell_eval(cell)
            if cell_progress:
                cell_progress(k + 1, len(mine))
    finally:
        runner.close_engine()  # a vLLM engine (backend vllm) holds its share of the GPU until closed
    return {"cells": len(all_cells), "shard_cells": len(mine), "computed": runner.computed,
            "seconds": time.time() - t0}


def cross_trait(runner: SweepRunner, done: list[Cell]) -> dict[str, list[dict]]:
    """Every teacher trait × every candidate answer, paired against the neutral teacher (mech.analysis.transfer)."""
    from mech.analysis.transfer import cross_trait_tables, paired_candidate_rows

    evals = {cell: runner.cell_eval(cell) for cell in done}
    pairs = []
    for cell, res in evals.items():
        control = evals.get(dataclasses.replace(cell, trait=TraitSpec(None, cell.trait.category)))
        if cell.trait.target is not None and control is not None:
            pairs.append((cell.labels(), res, control))
    return cross_trait_tables(paired_candidate_rows(pairs))


def finished_tables(runner: SweepRunner) -> dict:
    """The rows and summary of every cell finished in the cache (by any shard), and how many cells that is;
    with ``eval.cross_trait``, also the cross-trait matrix."""
    done = [c for c in cells(runner.cfg) if runner.is_done(c)]
    rows = results_rows(runner, done)
    out = {"rows": rows, "summary": summary_rows(rows), "done_cells": len(done)}
    if runner.cfg.hypotheses and len(done) == len(cells(runner.cfg)):  # a test runs on the whole design only
        out["tests"] = hypothesis_rows(runner.cfg, rows)
    if runner.cfg.eval.in_context:
        from mech.analysis.stats import nested_ci

        ic = in_context_rows(runner)
        out["in_context"] = {"rows": ic, "summary": nested_ci(ic, ("trait", "metric"), "value", outer="teacher_seed")}
    if not runner.cfg.eval.first_token_only:  # the sampled rate's SE and the samples it would need
        from mech.analysis.power import power_rows
        from mech.resources import questions

        n = runner.cfg.eval.n_samples * len(questions(runner.cfg.eval.category))
        out["power"] = power_rows(out["summary"], n)
    if runner.cfg.eval.cross_trait:
        out["cross_trait"] = cross_trait(runner, done)
    out["rank_widths"] = rank_width_rows(runner.cfg, runner.base.model)
    return out


def rank_width_rows(cfg: SweepConfig, model: Any) -> list[dict]:
    """Each LoRA rank of the sweep as a fraction of each targeted projection's width (min(in, out), mech.models.
    surgery.projection_widths): rank 64 on a 64-wide key projection is already full rank there."""
    from mech.models.surgery import projection_widths
    from mech.students.config import LoraSpec

    widths = projection_widths(model)
    targets = [k for k in LoraSpec().targets if k in widths]  # sweeps train LoRA on every projection
    return [{"rank": r, "kind": k, "width": widths[k], "fraction": min(r, widths[k]) / widths[k]}
            for r in sorted({s.rank for s in cfg.students if s.method == "lora"}) for k in targets]
