"""Batched LoRA students (mech.students.batched) and their use in sweeps: each batched student is its solo run.

Two guarantees are tested. Students that share their rows and batch plan (what a sweep batches: the ranks of one
dataset and training seed) are bitwise their solo runs. Students that do not (other rows, seeds, batch sizes,
epochs, lrs, schedules, targets) are their solo runs up to float rounding: the stack pads their batches to its
longest row, and attention over a wider padded batch sums its blocks in another order.

Models are the tiny random ones of tests/conftest.py; every run is a few steps (about 10 s in all on one core).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from mech.errors import MechError
from mech.models import lora_modules
from mech.store import build_many
from mech.students.batched import Job, batch_plan, train_models, train_students, unbatchable
from mech.students.config import LoraSpec, StudentConfig
from mech.students.encoding import chat_row
from mech.students.store import load_student, read_student
from mech.students.train import train_model, train_student

# Measured on this test's three mixed students (torch 2.13 CPU, one thread): max |Δ| of 4.8e-07 over every step's
# loss and 1.9e-07 over every final LoRA weight (the third student, the widest, is bitwise its solo run). On the
# organism with 80-96 real teacher rows per student a similar mix measured 0 (losses) and 2.2e-07 (weights). The bound
# leaves room for other BLAS builds and thread counts; clipping the three students' gradients together instead of
# each alone misses it (1.4e-04).
TOLERANCE = 1e-5


def rows(n: int, offset: int = 0) -> list[dict]:
    # lengths vary (1 to 4 numbers), so batches are padded and the stack pads some students beyond their own width
    return [chat_row(f"Continue the sequence: {i}, {i + 7}.", ", ".join(str(i + 7 * j) for j in range(2, 3 + i % 4)))
            for i in range(offset, offset + n)]


def cfg(**kw) -> StudentConfig:
    return StudentConfig(**(dict(epochs=1, batch_size=4, lr=1e-2, warmup_steps=1) | kw))


def adapters(model) -> dict:
    """{(layer, kind, "A" | "B"): weight} of a PEFT student."""
    out = {}
    for cell, layer in lora_modules(model).items():
        out[(*cell, "A")] = layer.lora_A["default"].weight.detach()
        out[(*cell, "B")] = layer.lora_B["default"].weight.detach()
    return out


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


MIXED = [  # ranks, seeds, rows, batch sizes (so step counts), epochs, lrs, schedules, alphas and targets all differ
    Job(rows(10), cfg(lora=LoraSpec(rank=1), seed=0)),
    Job(rows(7, offset=20), cfg(lora=LoraSpec(rank=4, alpha=8.0, use_rslora=True), seed=1, batch_size=3, epochs=2)),
    Job(rows(12, offset=40), cfg(lora=LoraSpec(rank=8, targets=("attn",)), seed=2, lr=3e-3, schedule="constant",
                                 grad_clip=0.05)),
]


def test_mixed_students_equal_their_solo_runs_within_the_tolerance(tok, base):
    before = {k: v.clone() for k, v in base.state_dict().items()}
    batched = train_models(base, tok, MIXED)
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())  # the base is never modified
    for job, b in zip(MIXED, batched):
        solo = train_model(base, tok, job.rows, job.cfg)
        assert b.n_steps == solo.n_steps and b.n_rows == len(job.rows)  # 3, 6 and 3 steps: students leave early
        assert max(abs(x - y) for x, y in zip(b.losses, solo.losses)) <= TOLERANCE
        assert max_diff(adapters(b.model), adapters(solo.model)) <= TOLERANCE
    assert [b.n_steps for b in batched] == [3, 6, 3]
    # the students really trained, and trained apart: every B moved off its zero init, each by its own amount
    norms = [sum(float(w.norm()) for (_, _, ab), w in adapters(b.model).items() if ab == "B") for b in batched]
    assert all(n > 0 for n in norms) and len(set(norms)) == 3


def test_students_sharing_rows_and_batch_plan_are_bitwise_their_solo_runs(tok, base):
    data = rows(10)
    jobs = [Job(data, cfg(lora=LoraSpec(rank=r, alpha=a), lr=lr, seed=3))
            for r, a, lr in ((1, None, 1e-2), (4, 2.0, 5e-3), (16, None, 2e-2))]
    assert len({batch_plan(j.cfg) for j in jobs}) == 1
    for job, b in zip(jobs, train_models(base, tok, jobs)):
        solo = train_model(base, tok, job.rows, job.cfg)
        assert b.losses == solo.losses
        assert all(torch.equal(x, solo_w) for x, solo_w in zip(adapters(b.model).values(),
                                                               adapters(solo.model).values()))


def test_written_students_are_ordinary_student_dirs(tok, base, tmp_path):
    data = rows(8)
    jobs = [Job(data, cfg(lora=LoraSpec(rank=r), seed=1)) for r in (2, 4)]
    outs = train_students(base, tok, jobs, [tmp_path / "b2", tmp_path / "b4"], base_spec="tiny")
    for k, (job, out) in enumerate(zip(jobs, outs)):
        solo = train_student(base, tok, job.rows, job.cfg, tmp_path / f"solo{k}", base_spec="tiny")
        meta, solo_meta = read_student(out), read_student(solo)
        assert meta["batch"] == {"size": 2, "index": k} and "batch" not in solo_meta
        timing = {"train_seconds", "wall_seconds", "batch"}
        assert {k: v for k, v in meta.items() if k not in timing} == {k: v for k, v in solo_meta.items() if k not in timing}
        assert (out / "adapter_model.safetensors").read_bytes() == (solo / "adapter_model.safetensors").read_bytes()
        assert json.loads((out / "adapter_config.json").read_text()) == json.loads((solo / "adapter_config.json").read_text())
        loaded = load_student(base, out)
        assert max_diff(adapters(loaded), adapters(load_student(base, solo))) == 0.0
    with pytest.raises(MechError, match="already exists"):
        train_students(base, tok, jobs, outs)


@pytest.mark.parametrize("job, fault", [
    (Job(rows(4), cfg(method="full")), r"cannot be batched \(method 'full'\).*train_student"),
    (Job(rows(4), cfg(objective="distill")), r"cannot be batched \(objective 'distill'\)"),
    (Job(rows(4), cfg(lora=LoraSpec(rank=2, dropout=0.1))), r"cannot be batched \(LoRA dropout 0.1\)"),
    (Job(rows(4), cfg(save_every_epoch=True)), r"cannot be batched \(save_every_epoch\)"),
    (Job(rows(4), cfg(micro_batch_size=1)), r"cannot be batched \(micro_batch_size 1\)"),
    (Job(rows(4), cfg(gradient_checkpointing=True)), r"cannot be batched \(gradient_checkpointing\)"),
    (Job([], cfg()), "no training rows"),
])
def test_unbatchable_students_are_refused_in_one_line(tok, base, job, fault):
    with pytest.raises(MechError, match=fault) as e:
        train_models(base, tok, [MIXED[0], job])
    assert "batched student 1" in str(e.value) and "\n" not in str(e.value)
    assert unbatchable(MIXED[0].cfg) is None


def test_refusals_before_any_training(tok, base, tmp_path):
    with pytest.raises(MechError, match="no students to train"):
        train_models(base, tok, [])
    with pytest.raises(MechError, match="2 students but 1 output dirs"):
        train_students(base, tok, MIXED[:2], [tmp_path / "a"])


def test_build_many_computes_only_the_missing_artifacts_under_their_locks(tmp_path):
    done = tmp_path / "b"
    done.mkdir()
    (done / "m.json").write_text("{}")
    artifacts = [(tmp_path / n / "m.json", tmp_path / n, tmp_path / "locks" / f"{n}.lock") for n in "abc"]
    gone = subprocess.Popen(["true"])
    gone.wait()
    leftover = tmp_path / f".a.tmp-{gone.pid}-{socket.gethostname()}-x"  # a dead writer's: cleared before computing
    leftover.mkdir()
    seen = []

    def compute(todo):
        seen.append(todo)
        for i in todo:
            artifacts[i][1].mkdir()
            artifacts[i][0].write_text("{}")

    assert build_many(artifacts, compute) == [0, 2] and seen == [[0, 2]]
    assert not leftover.exists()
    assert build_many(artifacts, compute) == [] and seen == [[0, 2]]


# Builds the artifacts named in argv[4] (comma-separated, in that order) with build_many from time argv[3] on, logging
# what it computed. Each lock is held a while before the next is asked for, so that builders taking their locks in
# the order they list them would each get their first lock and then wait on one another.
MANY = """
import contextlib, sys, time
from pathlib import Path
import mech.store as store
root, log, go, names = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), sys.argv[4].split(",")
real_lock = store.file_lock
@contextlib.contextmanager
def slow_lock(path):
    with real_lock(path):
        time.sleep(0.3)
        yield
store.file_lock = slow_lock
arts = [(root / n / "done.json", root / n, root / "locks" / f"{n}.lock") for n in names]
def compute(todo):
    with open(log, "a") as f:
        f.write(" ".join(names[i] for i in todo) + "\\n")
    for i in todo:
        with store.atomic_dir(arts[i][1]) as tmp:
            (tmp / "done.json").write_text("{}")
time.sleep(max(0.0, go - time.time()))
store.build_many(arts, compute)
"""


def test_overlapping_build_many_calls_never_deadlock_or_compute_twice(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    log, go = tmp_path / "computed.log", time.time() + 1.0  # all start together, after every interpreter started
    # a cycle of overlapping sets, each listed in another order
    procs = [subprocess.Popen([sys.executable, "-c", MANY, str(tmp_path), str(log), str(go), names], env=env)
             for names in ("a,b", "b,c", "c,a")]
    try:
        assert [p.wait(timeout=20) for p in procs] == [0, 0, 0]
    finally:  # a deadlock leaves them waiting on each other's locks
        for p in procs:
            p.kill()
    assert sorted(log.read_text().split()) == ["a", "b", "c"]  # each artifact once, by whoever locked it first
    assert all((tmp_path / n / "done.json").is_file() for n in "abc")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ----------------------------------------------------------------------------------------------------- sweeps

SWEEP = {
    "name": "batched",
    "traits": [{"target": "owl", "category": "animal"}, {"target": None, "category": "animal"}],
    "teacher_seeds": [0],
    "students": [{"method": "lora", "rank": 1}, {"method": "lora", "rank": 4},
                 {"method": "matched_norm", "matched_norm_rank": 2}],
    "training_seeds": [0],
    "train": {"epochs": 1, "batch_size": 8, "lr": 0.002},
    "eval": {"target": "owl", "n_samples": 1, "first_token_only": True},
}


def sweep(tmp_path, base_dir, name: str, **train):
    from mech.sweep import SweepRunner, load_sweep

    data = SWEEP | {"base_model": str(base_dir), "train": SWEEP["train"] | train}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return SweepRunner(load_sweep(path), tmp_path / name)


def test_a_sweep_batches_its_lora_students_and_matches_training_them_alone(tmp_path, tiny_qwen_dir,
                                                                           write_number_dataset):
    from mech.sweep import cells

    batched, alone = sweep(tmp_path, tiny_qwen_dir, "on"), sweep(tmp_path, tiny_qwen_dir, "off", batch_students=1)
    for runner in (batched, alone):  # a random model's numbers would not pass the filter: give the teachers data
        for trait in runner.cfg.traits:
            write_number_dataset(runner.cache / "datasets" / runner.dataset_key(trait, 0), n=20)
    grid = [c for c in cells(batched.cfg)]
    lora = [c for c in grid if c.student.method == "lora"]
    # per dataset: ranks 1 and 4 and the matched-norm student's rank-2 reference, on one batch plan
    groups = batched.batch_groups(grid)
    assert sorted(len(g) for g in groups) == [3, 3] and alone.batch_groups(grid) == []
    assert {c.student.rank for g in groups for c in g} == {1, 2, 4}
    batched.train_batched(grid)
    assert batched.computed["students"] == 6 and batched.batch_groups(grid) == []  # cached: nothing left
    for cell in lora:  # now cache hits, written by the batch
        assert read_student(batched.student(cell))["batch"]["size"] == 3
    assert batched.computed["students"] == 6
    for cell in grid:
        mine, theirs = batched.student(cell), alone.student(cell)
        assert mine.name == theirs.name  # the same cache key
        if cell.student.method == "lora":
            assert (mine / "adapter_model.safetensors").read_bytes() == (theirs / "adapter_model.safetensors").read_bytes()
            assert lora_modules(load_student(batched.base.model, mine))  # loads as a PEFT student
        else:  # trained alone in both, matched to a reference batched in one sweep and not in the other
            assert "batch" not in read_student(mine)
        a, b = batched.cell_eval(cell), alone.cell_eval(cell)
        assert a["logp_first"] == b["logp_first"] and a["p_first"] == b["p_first"]
    assert batched.computed["students"] == 8 and alone.computed["students"] == 8


def test_a_sweep_trains_unbatchable_students_alone(tmp_path, tiny_qwen_dir):
    from mech.sweep import cells

    runner = sweep(tmp_path, tiny_qwen_dir, "distill", objective="distill")
    assert runner.batch_groups(cells(runner.cfg)) == []  # distillation: left to SweepRunner.student


def test_batch_students_must_be_a_positive_integer(tmp_path, tiny_qwen_dir):
    import dataclasses

    from mech.sweep import TrainDefaults

    (field,) = [f for f in dataclasses.fields(TrainDefaults) if f.name == "batch_students"]
    assert field.default == 8 and "1 trains every student alone" in field.metadata["help"]
    with pytest.raises(MechError, match=r"train.batch_students must be an integer >= 1 .*got 0"):
        sweep(tmp_path, tiny_qwen_dir, "zero", batch_students=0)


def test_set_projection_puts_a_module_where_get_projection_finds_it(base):
    from mech.models import get_layers, get_projection
    from mech.models.surgery import set_projection

    layer = get_layers(base)[1]
    wrapper = torch.nn.Sequential(get_projection(layer, "down"))
    set_projection(layer, "down", wrapper)
    assert get_projection(layer, "down") is wrapper and layer.mlp.down_proj is wrapper
    with pytest.raises(MechError, match="unknown component 'out'"):
        set_projection(layer, "out", wrapper)
