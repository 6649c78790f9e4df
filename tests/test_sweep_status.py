"""Sweeps on a cluster: `mech sweep --status` (mech.sweep.status) and the SLURM recipe in experiments/slurm/.

The status runs on the tiny sweep of tests/test_sweep.py (4 cells: owl and neutral × 2 training seeds) before any
run, after shard 0 of 2, with a lock held by another process, and after both shards. Every answer is known by
construction: shard 0's cells are done after shard 0 ran, a held lock marks exactly the cells that need its artifact.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_sweep import write_cfg

from mech.cli import main
from mech.report.sweep import run_sweep
from mech.store import lock_held
from mech.sweep import SweepRunner, cells, load_sweep
from mech.sweep.status import sweep_status

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "experiments" / "slurm"


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and mtime: what 'nothing written' compares."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def status_cli(capsys, *args) -> tuple[int, str, str]:
    code = main(["sweep", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny sweep's cache after shard 0 of 2 (``partial``, a copy) and after both shards (``full``)."""
    root = tmp_path_factory.mktemp("status")
    cfg_path = write_cfg(root / "tiny.yaml")
    cfg, cache = load_sweep(cfg_path), root / "cache"
    run_sweep(cfg, root / "out", shard="0/2", cache=cache)
    shutil.copytree(cache, root / "partial")
    run_sweep(cfg, root / "out", shard="1/2", cache=cache)
    record = json.loads(next((cache / "bases").glob("*.json")).read_text())
    runner = SweepRunner.keys_only(cfg, record["fingerprint"], cache)
    shards = [runner.shard(cells(cfg), i, 2) for i in range(2)]
    return SimpleNamespace(cfg_path=cfg_path, cfg=cfg, partial=root / "partial", full=cache, out=root / "out",
                           record=record, runner=runner, shards=shards)


# ------------------------------------------------------------------------------------------------ the states


def test_before_any_run_every_cell_is_missing_and_nothing_is_written(capsys, tmp_path):
    cfg_path, cache = write_cfg(tmp_path / "tiny.yaml"), tmp_path / "cache"
    code, out, err = status_cli(capsys, cfg_path, "--status", "--shards", "2", "--cache", cache)
    assert code == 0
    assert out.startswith(f"sweep tiny: 4 cells in {cache}: 0 done, 0 running, 4 missing\n")
    assert "no sweep has run on base organism in this cache yet: every cell is missing" in out
    st = sweep_status(load_sweep(cfg_path), cache, shards=2)
    assert st["counts"] == {"done": 0, "running": 0, "missing": 4}
    assert st["per_shard"] is None and {r["shard"] for r in st["rows"]} == {None}  # unknown without a fingerprint
    assert not cache.exists()


def test_after_shard_0_its_cells_are_done_and_the_rest_missing(runs):
    st = sweep_status(runs.cfg, runs.partial, shards=2)
    assert st["base_record"] == runs.record and "as run in cpu-float32" in st["note"]
    shard_of = {(r["trait"], r["training_seed"]): r["shard"] for r in st["rows"]}
    for i, mine in enumerate(runs.shards):  # the shard each cell is in is the one --shard i/2 computes it in
        assert {shard_of[(c.trait.label, c.training_seed)] for c in mine} == {i}
    state = {(r["trait"], r["training_seed"]): r["state"] for r in st["rows"]}
    assert {state[(c.trait.label, c.training_seed)] for c in runs.shards[0]} == {"done"}
    assert {state[(c.trait.label, c.training_seed)] for c in runs.shards[1]} == {"missing"}
    assert st["per_shard"] == [{"shard": 0, "cells": 2, "done": 2, "running": 0, "missing": 0},
                               {"shard": 1, "cells": 2, "done": 0, "running": 0, "missing": 2}]
    assert st["counts"] == {"done": 2, "running": 0, "missing": 2}
    # the rows name the cached students: the done cells' students are in the cache
    done_keys = {r["student_key"] for r in st["rows"] if r["state"] == "done"}
    assert done_keys == {p.name for p in (runs.partial / "students").iterdir() if not p.name.startswith(".")}
    # with three shards of 4 cells (2 groups per dataset), the counts still add up to the grid
    three = sweep_status(runs.cfg, runs.partial, shards=3)
    assert sum(s["cells"] for s in three["per_shard"]) == 4
    assert sum(s[k] for s in three["per_shard"] for k in ("done", "running", "missing")) == 4


HOLD = """
import fcntl, sys
f = open(sys.argv[1], "a")
fcntl.flock(f, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
"""


def hold_lock(path: Path) -> subprocess.Popen:
    """Another process holding ``path``'s flock until its stdin closes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def release(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    proc.wait(timeout=30)


def test_a_lock_held_by_another_process_marks_exactly_the_cells_that_need_it_running(runs, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(runs.partial, cache)
    runner = SweepRunner.keys_only(runs.cfg, runs.record["fingerprint"], cache)
    one, other = runs.shards[1]  # shard 1's two cells (one dataset, two students): missing after shard 0
    states = lambda: {(r["trait"], r["training_seed"]): r["state"]  # noqa: E731
                      for r in sweep_status(runs.cfg, cache)["rows"]}
    label = lambda c: (c.trait.label, c.training_seed)  # noqa: E731
    before = snapshot(cache)

    holder = hold_lock(runner._lock("students", runner.student_key(one)))  # training one student
    try:
        st = states()
        assert st[label(one)] == "running" and st[label(other)] == "missing"
        assert {st[label(c)] for c in runs.shards[0]} == {"done"}
    finally:
        release(holder)
    holder = hold_lock(runner._lock("datasets", runner.dataset_key(one.trait, one.teacher_seed)))  # their teacher
    try:
        st = states()
        assert st[label(one)] == st[label(other)] == "running"
    finally:
        release(holder)
    # the holder is gone: its lock file stays, and says nothing
    assert states()[label(one)] == "missing"
    assert set(snapshot(cache)) - set(before) == {f"locks/students-{runner.student_key(one)}.lock",
                                                  f"locks/datasets-{runner.dataset_key(one.trait, 0)}.lock"}


def test_lock_held_probes_without_creating_or_keeping_a_lock(tmp_path):
    path = tmp_path / "locks" / "x.lock"
    assert not lock_held(path) and not path.exists()  # no lock file: not held, and none made
    holder = hold_lock(path)
    try:
        assert lock_held(path) and lock_held(path)  # the probe releases at once: a second probe sees the same
    finally:
        release(holder)
    assert not lock_held(path)


def test_after_both_shards_every_cell_is_done_and_the_json_says_so(runs, capsys, tmp_path):
    report = tmp_path / "status.json"
    code, out, _ = status_cli(capsys, runs.cfg_path, "--status", "--shards", "2", "--cache", runs.full,
                              "--json", report)
    assert code == 0 and "4 cells in" in out and "4 done, 0 running, 0 missing" in out
    st = json.loads(report.read_text())
    assert st["counts"] == {"done": 4, "running": 0, "missing": 0} and st["cells"] == len(st["rows"]) == 4
    assert [s["done"] for s in st["per_shard"]] == [2, 2] and {r["state"] for r in st["rows"]} == {"done"}
    assert {r["student_key"] for r in st["rows"]} == {p.name for p in (runs.full / "students").iterdir()}


def test_status_loads_no_weights_and_writes_nothing_in_the_cache(runs, capsys, monkeypatch, tmp_path):
    import mech.models
    import mech.models.loader

    def refuse(*args, **kwargs):
        raise AssertionError("the status loaded the model")

    for module in (mech.models, mech.models.loader):
        monkeypatch.setattr(module, "load_model", refuse)
        monkeypatch.setattr(module, "model_fingerprint", refuse)
    before = snapshot(runs.partial)
    code, out, _ = status_cli(capsys, runs.cfg_path, "--status", "--shards", "2", "--cache", runs.partial,
                              "--json", tmp_path / "st.json")
    assert code == 0 and "2 done, 0 running, 2 missing" in out
    assert snapshot(runs.partial) == before


# ------------------------------------------------------------------------------------------------ the record


def test_keys_are_unchanged_and_the_record_holds_the_runs_fingerprint(runs):
    """The cache keys of main before the status existed (fixed fingerprint, so independent of the weights), and
    the recorded fingerprint is the one the runner keys by."""
    runner = SweepRunner.keys_only(runs.cfg, "fingerprint")
    keys = {(c.trait.label, c.training_seed): (runner.student_key(c), runner.eval_path(c).stem)
            for c in cells(runs.cfg)}
    assert keys == {("owl", 0): ("952d250c4e532978", "3d6391e40e450015"),
                    ("owl", 1): ("cd41ce0701583234", "79a431c4a7dcdd83"),
                    ("neutral", 0): ("913d241b2b73ba85", "d0d4102516198d29"),
                    ("neutral", 1): ("6e973e2b3b99527c", "440aa5df884b855f")}
    assert SweepRunner(runs.cfg, runs.full).fingerprint == runs.record["fingerprint"]
    assert runs.record["placement"] == "cpu-float32" and runs.record["spec"] == "organism"
    assert len(list((runs.full / "bases").iterdir())) == 1  # both shards wrote the same record (or left it)


def test_the_record_follows_the_files_not_the_name(runs, capsys, tmp_path):
    """A copy of the base's files elsewhere matches the record; the same files with moved weights (a finetune
    saved in their place) do not, and are reported as never run."""
    from safetensors.torch import load_file, save_file

    from mech.models import organism_dir

    copy = tmp_path / "copy"
    shutil.copytree(organism_dir(), copy)
    code, out, _ = status_cli(capsys, runs.cfg_path, "--status", "--cache", runs.full, "--model", copy)
    assert code == 0 and "4 done" in out and "as run in cpu-float32" in out
    weights = load_file(copy / "model.safetensors")
    save_file({k: v * 1.01 for k, v in weights.items()}, copy / "model.safetensors", metadata={"format": "pt"})
    code, out, _ = status_cli(capsys, runs.cfg_path, "--status", "--cache", runs.full, "--model", copy)
    assert code == 0 and "0 done, 0 running, 4 missing" in out and "no sweep has run on base" in out


def test_a_gpu_sweep_reports_from_a_cpu_host_by_its_placement(runs, capsys, tmp_path):
    """device: cuda is refused for a run on this CPU host but reported on (a login node); only a record of that
    placement counts, and with auto the most recent of several is used and the others named."""
    cache = tmp_path / "cache"
    shutil.copytree(runs.full, cache)
    gpu = write_cfg(tmp_path / "gpu.yaml", device="cuda", dtype="bfloat16")
    code, out, _ = status_cli(capsys, gpu, "--status", "--shards", "2", "--cache", cache)
    assert code == 0 and "no sweep has run on base organism (cuda, bfloat16)" in out and "4 missing" in out
    cpu_record = next((cache / "bases").glob("*-cpu-float32.json"))
    gpu_record = cpu_record.with_name(cpu_record.name.replace("cpu-float32", "cuda-bfloat16"))
    gpu_record.write_text(json.dumps(runs.record | {"placement": "cuda-bfloat16",
                                                    "fingerprint": runs.record["fingerprint"] + "-cuda-bfloat16"}))
    st = sweep_status(load_sweep(gpu, check_placement=False), cache, shards=2)
    assert st["base_record"]["placement"] == "cuda-bfloat16"
    assert st["counts"]["missing"] == 4 and [s["cells"] for s in st["per_shard"]] == [2, 2]  # keyed apart from CPU
    os.utime(cpu_record, (1, 1))  # auto: the newer record (the GPU one) is used, the CPU one named
    st = sweep_status(runs.cfg, cache)
    assert st["base_record"]["placement"] == "cuda-bfloat16" and "also run in cpu-float32" in st["note"]
    st = sweep_status(load_sweep(write_cfg(tmp_path / "cpu.yaml", device="cpu")), cache)
    assert st["base_record"]["placement"] == "cpu-float32" and st["counts"]["done"] == 4


def test_a_hub_base_is_identified_by_its_snapshot_without_loading_it(capsys, monkeypatch, tmp_path):
    """A hub id not downloaded here is reported on (every cell missing, and why); once its snapshot is in the HF
    cache, its files are identified by size and sampled blocks: a moved byte in a sampled block is seen."""
    import huggingface_hub.constants

    from mech.models import weights_identity

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    cfg_path = write_cfg(tmp_path / "hub.yaml", base_model="org/model", device="cuda", dtype="bfloat16")
    code, out, _ = status_cli(capsys, cfg_path, "--status", "--cache", tmp_path / "cache")
    assert code == 0 and "4 missing" in out and "the files of base org/model cannot be read here" in out
    repo = tmp_path / "hf" / "models--org--model"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    weights = bytearray(os.urandom(3 << 20))  # 3 MiB: sampled, not read whole
    (snap / "model.safetensors").write_bytes(bytes(weights))
    first = weights_identity("org/model")
    assert set(first) == {"config.json", "model.safetensors"} and weights_identity("org/model") == first
    weights[10] ^= 1  # inside the first sampled block
    (snap / "model.safetensors").write_bytes(bytes(weights))
    assert weights_identity("org/model")["model.safetensors"] != first["model.safetensors"]
    assert not (tmp_path / "cache").exists()


# ------------------------------------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize("args, fragment", [
    (["--status", "--shard", "0/2"], "--status reports on every shard and runs none: drop --shard 0/2"),
    (["--status", "--shards", "0"], "bad --shards '0': expected the n of the shards' --shard i/n"),
    (["--status", "--shards", "x"], "bad --shards 'x'"),
    (["--status", "--shards", "-2"], "bad --shards '-2'"),
    (["--status", "--out", "OUT"], "--status writes no tables: drop --out"),
    (["--shards", "2"], "--shards goes with --status"),
    (["--json", "OUT/st.json"], "--json goes with --status"),
])
def test_bad_status_options_are_one_line_and_exit_2(capsys, tmp_path, args, fragment):
    cfg_path = write_cfg(tmp_path / "tiny.yaml")
    args = [a.replace("OUT", str(tmp_path / "out")) for a in args]
    code, out, err = status_cli(capsys, cfg_path, *args, "--cache", tmp_path / "cache")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("mech: error: ") and fragment in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.yaml"]


def test_a_config_typo_is_one_line_and_exit_2_for_the_status(capsys, tmp_path):
    cfg_path = write_cfg(tmp_path / "tiny.yaml", trainng_seeds=[0])
    code, out, err = status_cli(capsys, cfg_path, "--status", "--cache", tmp_path / "cache")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "unknown key tiny.trainng_seeds" in err and "did you mean 'training_seeds'" in err


# ------------------------------------------------------------------------------------------------ SLURM recipe


FAKE = """#!{python}
import json, os, sys
with open(os.environ["RECORD"], "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "threads": os.environ.get("OMP_NUM_THREADS"),
                        "shards": os.environ.get("SHARDS")}}) + "\\n")
print(os.environ.get("FAKE_OUT", ""))
"""


@pytest.fixture
def fake(tmp_path):
    """An executable that records its argv (and OMP_NUM_THREADS) as JSON lines; and the env to run scripts in."""
    exe = tmp_path / "fake"
    exe.write_text(FAKE.format(python=sys.executable))
    exe.chmod(0o755)
    record = tmp_path / "calls.jsonl"
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "MECH": str(exe), "SBATCH": str(exe),
           "RECORD": str(record), "CFG": "experiments/quick.yaml", "SHARED_CACHE": "/shared/cache", "OUT": "runs/q"}

    def run(script: str, *args: str, **extra: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
        record.unlink(missing_ok=True)
        proc = subprocess.run(["bash", str(SLURM / script), *args], env=env | extra, capture_output=True, text=True)
        calls = [json.loads(x) for x in record.read_text().splitlines()] if record.exists() else []
        return proc, calls

    return run


@pytest.mark.parametrize("script", ["sweep_array.sbatch", "sweep_finish.sbatch", "submit.sh"])
def test_the_slurm_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(SLURM / script)]).returncode == 0


def test_each_array_task_runs_its_shard_on_the_shared_cache(fake):
    for k in range(3):
        proc, calls = fake("sweep_array.sbatch", SLURM_ARRAY_TASK_ID=str(k), SLURM_ARRAY_TASK_COUNT="3",
                           SLURM_CPUS_PER_TASK="4")
        assert proc.returncode == 0, proc.stderr
        assert calls == [{"argv": ["sweep", "experiments/quick.yaml", "--shard", f"{k}/3", "--cache", "/shared/cache",
                                   "--out", "runs/q"], "threads": "4", "shards": None}]
    # a resubmitted task (sbatch --array=5: a task count of 1) keeps its shard of SHARDS; MODEL becomes --model
    proc, calls = fake("sweep_array.sbatch", SLURM_ARRAY_TASK_ID="5", SLURM_ARRAY_TASK_COUNT="1", SHARDS="8",
                       MODEL="Qwen/Qwen2.5-7B-Instruct")
    assert proc.returncode == 0, proc.stderr
    assert calls[0]["argv"][2:4] == ["--shard", "5/8"] and calls[0]["argv"][-2:] == ["--model",
                                                                                     "Qwen/Qwen2.5-7B-Instruct"]
    assert calls[0]["threads"] == "1"  # no SLURM_CPUS_PER_TASK: one thread
    proc, calls = fake("sweep_array.sbatch", SLURM_ARRAY_TASK_ID="0", SLURM_ARRAY_TASK_COUNT="2", CFG="")
    assert proc.returncode != 0 and "set CFG" in proc.stderr and calls == []


def test_the_finishing_job_reports_then_writes_the_tables_unsharded(fake):
    proc, calls = fake("sweep_finish.sbatch", SHARDS="3", SLURM_CPUS_PER_TASK="2")
    assert proc.returncode == 0, proc.stderr
    assert [c["argv"] for c in calls] == [
        ["sweep", "experiments/quick.yaml", "--status", "--shards", "3", "--cache", "/shared/cache", "--json",
         "runs/q/status.json"],
        ["sweep", "experiments/quick.yaml", "--cache", "/shared/cache", "--out", "runs/q"]]
    assert {c["threads"] for c in calls} == {"2"}
    proc, calls = fake("sweep_finish.sbatch", SHARDS="3", MODEL="smollm2-135m")
    assert proc.returncode == 0 and [c["argv"][-2:] for c in calls] == [["--model", "smollm2-135m"]] * 2
    proc, calls = fake("sweep_finish.sbatch")
    assert proc.returncode != 0 and "set SHARDS" in proc.stderr and calls == []


def test_submit_queues_the_array_then_the_finishing_job_after_it(fake):
    proc, calls = fake("submit.sh", "3", "--account=abc", FAKE_OUT="4242;cluster")
    assert proc.returncode == 0, proc.stderr
    assert [c["argv"] for c in calls] == [
        ["--parsable", "--array=0-2", "--account=abc", str(SLURM / "sweep_array.sbatch")],
        ["--parsable", "--dependency=afterok:4242", "--account=abc", str(SLURM / "sweep_finish.sbatch")]]
    assert {c["shards"] for c in calls} == {"3"}  # both jobs see N (sbatch passes the environment on)
    for bad in ("0", "x", ""):
        proc, calls = fake("submit.sh", bad)
        assert proc.returncode == 2 and "N, the number of shards" in proc.stderr and calls == []


@pytest.mark.slow  # ~40 s: two array tasks at once and the finishing job, each a real mech process
def test_the_recipe_runs_the_tiny_sweep_end_to_end(tmp_path):
    """The array's two tasks run at once on one cache, then the finishing job: every cell done, each artifact
    computed once, and the last shard's tables already the finishing job's, byte for byte."""
    mech = tmp_path / "mech"
    mech.write_text(f'#!/bin/bash\nexec {sys.executable} -m mech.cli "$@"\n')
    mech.chmod(0o755)
    cache, out = tmp_path / "cache", tmp_path / "out"
    env = dict(os.environ, MECH=str(mech), CFG=str(write_cfg(tmp_path / "tiny.yaml")), SHARED_CACHE=str(cache),
               OUT=str(out), SLURM_ARRAY_TASK_COUNT="2", SLURM_CPUS_PER_TASK="1", MECH_CACHE=str(tmp_path / "mc"))
    logs = [(tmp_path / f"task{k}.log").open("w") for k in range(2)]
    tasks = [subprocess.Popen(["bash", str(SLURM / "sweep_array.sbatch")], cwd=REPO, stdout=logs[k],
                              stderr=subprocess.STDOUT, env=env | {"SLURM_ARRAY_TASK_ID": str(k)}) for k in range(2)]
    try:
        codes = [t.wait(timeout=300) for t in tasks]
    finally:
        for t, log in zip(tasks, logs):
            if t.poll() is None:
                t.kill()
            log.close()
    assert codes == [0, 0], "".join((tmp_path / f"task{k}.log").read_text() for k in range(2))
    shard_tables = {name: (out / name).read_bytes() for name in ("results.csv", "summary.csv")}
    finish = subprocess.run(["bash", str(SLURM / "sweep_finish.sbatch")], cwd=REPO, capture_output=True, text=True,
                            env=env | {"SHARDS": "2"})
    assert finish.returncode == 0, finish.stderr
    assert "4 done, 0 running, 0 missing" in finish.stdout
    assert "this run computed {'datasets': 0, 'students': 0, 'evals': 0}" in finish.stdout
    assert json.loads((out / "status.json").read_text())["counts"]["done"] == 4
    assert {name: (out / name).read_bytes() for name in shard_tables} == shard_tables
    log = [json.loads(line) for line in (cache / "computed.jsonl").read_text().splitlines()]
    assert len(log) == len({(e["stage"], e["key"]) for e in log}) == 2 + 4 + 5  # each artifact once
