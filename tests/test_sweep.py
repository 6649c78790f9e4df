"""Sweeps (mech.sweep): config loading and validation, shards, and end-to-end runs on the shipped organism.

The end-to-end grid is 2 traits (owl, neutral) × 1 LoRA rank-1 student × 2 training seeds on 24 teacher
prompts, evaluated with 2 samples per question: about 10 s on one core. One uninterrupted run (``baseline``)
is the reference that the re-run, sharded and killed-and-resumed runs must reproduce byte for byte.
"""

from __future__ import annotations

import collections
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from mech.errors import MechError
from mech.report.sweep import run_sweep
from mech.sweep import SweepConfig, SweepRunner, TraitSpec, cells, load_sweep, parse_shard

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
BASE_METRICS = {"logp_first", "p_first", "rate"}
TABLES = ("results.csv", "results.parquet", "summary.csv", "summary.parquet", "summary.md")
CONFIG_COLUMNS = ("trait", "category", "teacher_seed", "student", "method", "rank", "training_seed",
                  "train_context", "eval_context", "student_key")
STAGE_DIRS = ("datasets", "students", "evals")

TINY = {
    "name": "tiny",
    "base_model": "organism",
    "traits": [{"target": "owl", "category": "animal"}, {"target": None, "category": "animal"}],
    "teacher_seeds": [0],
    "students": [{"method": "lora", "rank": 1}],
    "training_seeds": [0, 1],
    "train_contexts": ["default"],
    "eval_contexts": ["default"],
    "teacher": {"n_prompts": 24, "max_new_tokens": 40},
    "train": {"epochs": 1, "batch_size": 8, "lr": 0.002},
    "eval": {"target": "owl", "n_samples": 2},
}


def write_cfg(path: Path, **changes) -> Path:
    """TINY with top-level ``changes`` (a value of None deletes the key), written as YAML to ``path``."""
    data = {**TINY, **changes}
    data = {k: v for k, v in data.items() if v is not None}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def load_error(tmp_path: Path, **changes) -> str:
    with pytest.raises(MechError) as e:
        load_sweep(write_cfg(tmp_path / "sweep.yaml", **changes))
    return str(e.value)


def leftovers(cache: Path) -> list[str]:
    """Temporary entries (atomic writes in progress, or left by a killed run) in the cache's stage dirs."""
    return sorted(str(p.relative_to(cache)) for d in STAGE_DIRS if (cache / d).is_dir()
                  for p in (cache / d).iterdir() if p.name.startswith("."))


def finished_students(cache: Path) -> set[str]:
    """Students whose atomic write is complete: a temporary ``.name.tmp-…`` dir may already hold student.json in
    the instant before its rename, and is not one (counting it made the kill test flaky)."""
    d = cache / "students"
    return ({p.name for p in d.iterdir() if not p.name.startswith(".") and (p / "student.json").is_file()}
            if d.is_dir() else set())


# ------------------------------------------------------------------------------------------------ load_sweep


def test_load_sweep_builds_the_grid(tmp_path):
    cfg = load_sweep(write_cfg(tmp_path / "sweep.yaml"))
    assert isinstance(cfg, SweepConfig)
    assert cfg.traits == (TraitSpec("owl", "animal"), TraitSpec(None, "animal"))
    assert cfg.training_seeds == (0, 1) and cfg.students[0].rank == 1
    assert cfg.teacher.n_prompts == 24 and cfg.teacher.prompt_seed == 0  # unset fields keep their defaults
    grid = cells(cfg)
    assert len(grid) == 4
    assert {(c.trait.target, c.training_seed) for c in grid} == {("owl", 0), ("owl", 1), (None, 0), (None, 1)}


def test_shipped_quick_sweep_loads():
    cfg = load_sweep(REPO / "experiments" / "quick.yaml")
    assert cfg.base_model == "organism"
    assert len(cells(cfg)) == len(cfg.traits) * len(cfg.students) * len(cfg.training_seeds) * 3 == 30
    assert cfg.teacher_seeds == (0, 1, 2) and cfg.training_seeds == (0,)  # 3 data seeds x 1 training seed
    assert TraitSpec(None, "animal") in cfg.traits  # the paired control is on the grid


@pytest.mark.parametrize(
    "changes, key, suggestion",
    [
        ({"trainng_seeds": [0]}, "sweep.trainng_seeds", "training_seeds"),
        ({"traits": [{"target": "owl"}, {"target": None, "categroy": "animal"}]}, "sweep.traits[1].categroy",
         "category"),
        ({"students": [{"method": "lora", "rnak": 2}]}, "sweep.students[0].rnak", "rank"),
        ({"teacher": {"n_promts": 24}}, "sweep.teacher.n_promts", "n_prompts"),
        ({"train": {"epoch": 1}}, "sweep.train.epoch", "epochs"),
        ({"eval": {"n_sample": 2}}, "sweep.eval.n_sample", "n_samples"),
    ],
)
def test_unknown_key_anywhere_is_named_with_a_suggestion(tmp_path, changes, key, suggestion):
    msg = load_error(tmp_path, **changes)
    assert f"unknown key {key}" in msg
    assert f"did you mean {suggestion!r}" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("axis", ["traits", "teacher_seeds", "students", "training_seeds", "train_contexts",
                                  "eval_contexts"])
def test_an_empty_axis_is_zero_cells(tmp_path, axis):
    assert "zero cells" in load_error(tmp_path, **{axis: []})


@pytest.mark.parametrize(
    "student, field",
    [
        ({"method": "lora", "rank": 0}, "rank"),
        ({"method": "lora", "rank": -4}, "rank"),
        ({"method": "lora", "rank": None}, "rank"),
        ({"method": "matched_norm"}, "matched_norm_rank"),  # no rank to match: refused, not a TypeError later
        ({"method": "matched_norm", "matched_norm_rank": 0}, "matched_norm_rank"),
        ({"method": "matched_loss"}, "matched_loss_rank"),
    ],
)
def test_a_rank_below_one_is_refused_at_load(tmp_path, student, field):
    msg = load_error(tmp_path, students=[{"method": "lora", "rank": 1}, student])
    assert f"sweep.students[1].{field}" in msg and ">= 1" in msg


def test_full_finetuning_needs_no_rank(tmp_path):
    cfg = load_sweep(write_cfg(tmp_path / "sweep.yaml", students=[{"method": "full", "rank": None}]))
    assert cfg.students[0].method == "full"


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"students": [{"method": "lorra", "rank": 1}]}, "unknown training method 'lorra'"),
        ({"train_contexts": ["defualt"]}, "unknown context 'defualt'"),
        ({"eval_contexts": ["default", "sytem"]}, "unknown context 'sytem'"),
        ({"eval": {"n_samples": 0}}, "n_samples must be >= 1"),
        ({"teacher": {"n_prompts": 0}}, "n_prompts must be at least 1"),
        ({"traits": [{"target": "owl", "category": "fish"}]}, "no questions for category 'fish'"),
        ({"students": [{"method": "lora", "rank": 1, "lr": -1.0}]}, "invalid lr"),
        ({"training_seeds": "0"}, "expected a list"),
    ],
)
def test_bad_values_fail_at_load_not_after_the_model_loads(tmp_path, changes, fragment):
    assert fragment in load_error(tmp_path, **changes)


def test_a_missing_or_broken_file_is_a_mech_error(tmp_path):
    with pytest.raises(MechError, match="not found"):
        load_sweep(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("traits: [\n")
    with pytest.raises(MechError, match="not valid YAML"):
        load_sweep(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(MechError, match="must be a mapping"):
        load_sweep(tmp_path / "list.yaml")


# ------------------------------------------------------------------------------------------------ parse_shard


@pytest.mark.parametrize("spec, expected", [(None, (0, 1)), ("0/1", (0, 1)), ("0/2", (0, 2)), ("1/2", (1, 2)),
                                            ("3/4", (3, 4)), ("09/10", (9, 10))])
def test_parse_shard(spec, expected):
    assert parse_shard(spec) == expected


@pytest.mark.parametrize("spec", ["2/2", "4/2", "-1/2", "1/0", "0/0", "0/-1", "1", "", "1/2/3", "a/b", "1.0/2",
                                  "1/", "/2"])
def test_parse_shard_refuses(spec):
    with pytest.raises(MechError, match=r"bad --shard .*expected i/n with 0 <= i < n"):
        parse_shard(spec)


def test_a_bad_shard_is_one_line_before_the_model_loads(capsys, tmp_path):
    from mech.cli import main

    for spec in ("3/2", "x"):
        code = main(["sweep", str(write_cfg(tmp_path / "sweep.yaml")), "--shard", spec, "--cache",
                     str(tmp_path / "cache"), "--out", str(tmp_path / "out")])
        out, err = capsys.readouterr()
        assert code == 2 and out == ""
        assert err.strip().splitlines() == [
            f"mech: error: bad --shard {spec!r}: expected i/n with 0 <= i < n, e.g. 0/4"]
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


def keys_only_runner(cfg: SweepConfig) -> SweepRunner:
    """A runner that can name artifacts (keys, groups, shards) without loading a model."""
    runner = object.__new__(SweepRunner)
    runner.cfg, runner.fingerprint = cfg, "fingerprint"
    return runner


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 16])
def test_shards_are_contiguous_blocks_of_whole_groups(tmp_path, n):
    cfg = load_sweep(write_cfg(tmp_path / "sweep.yaml", training_seeds=[0, 1, 2], eval_contexts=["default", "none"],
                               students=[{"method": "lora", "rank": 1}, {"method": "lora", "rank": 2},
                                         {"method": "matched_norm", "matched_norm_rank": 1},
                                         {"method": "matched_norm", "matched_norm_rank": 1,
                                          "matched_norm_scope": "global"},
                                         {"method": "matched_loss", "matched_loss_rank": 1}]))
    runner, grid = keys_only_runner(cfg), cells(cfg)
    shards = [runner.shard(grid, i, n) for i in range(n)]
    flat = [c for s in shards for c in s]
    assert sorted(map(repr, flat)) == sorted(map(repr, grid)) and len(set(flat)) == len(grid)  # a partition
    assert flat == runner.shard(grid, 0, 1)  # shard i is the i-th block of one fixed order
    shard_of = {c: i for i, s in enumerate(shards) for c in s}
    key = {c: runner.student_key(c) for c in grid}
    ref = {c: runner.student_key(runner._reference_cell(c)) for c in grid if c.student.reference_rank is not None}
    for c in grid:
        # every eval context of a student, and a matched-norm / -loss student's LoRA reference, share its shard
        same = [d for d in grid if key[d] in (key[c], ref.get(c))]
        assert len(same) == (4 if c in ref else 2) and {shard_of[d] for d in same} == {shard_of[c]}
    biggest_group = 4 * 2  # lora r1 with its two matched-norm and its matched-loss students, × 2 eval contexts
    assert all(abs(len(s) - len(grid) / n) < biggest_group for s in shards)  # about 1/n of the cells each


# ------------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """One uninterrupted, unsharded run of the tiny grid: (config path, cache, out dir, run_sweep's result)."""
    root = tmp_path_factory.mktemp("sweep_baseline")
    cfg_path = write_cfg(root / "tiny.yaml")
    res = run_sweep(load_sweep(cfg_path), root / "out", cache=root / "cache")
    return cfg_path, root / "cache", root / "out", res


def test_run_sweep_writes_the_tables(baseline):
    _, cache, out, res = baseline
    assert res["cells"] == res["shard_cells"] == res["done_cells"] == 4
    # 2 datasets (owl, neutral), 4 students, 4 student evals + 1 base eval
    assert res["computed"] == {"datasets": 2, "students": 4, "evals": 5}
    power = ("power.csv", "power.md")  # the sweep samples, so the sampled rate's power is reported
    assert sorted(Path(p).name for p in res["written"]) == sorted(TABLES + power)
    assert all((out / name).is_file() for name in TABLES + power)
    assert len(finished_students(cache)) == 4
    assert leftovers(cache) == []


def test_results_have_one_row_per_cell_and_metric(baseline):
    _, _, out, _ = baseline
    df = pd.read_parquet(out / "results.parquet")
    assert set(CONFIG_COLUMNS) <= set(df.columns) and {"metric", "value"} <= set(df.columns)
    assert not df[list(CONFIG_COLUMNS)].drop(columns="rank").isna().any().any()
    assert set(df["trait"]) == {"owl", "neutral"} and set(df["training_seed"]) == {0, 1}
    assert (df["rank"] == 1).all() and (df["student"] == "lora_r1").all()
    per_cell = df.groupby(["trait", "training_seed", "metric"]).size()
    assert (per_cell == 1).all()
    deltas = {f"delta_{m}" for m in BASE_METRICS}
    paired = {f"paired_{m}" for m in BASE_METRICS}
    assert set(df[df.trait == "owl"].metric) == BASE_METRICS | deltas | paired
    assert set(df[df.trait == "neutral"].metric) == BASE_METRICS | deltas  # paired_* only for the owl rows
    assert len(df) == 2 * 9 + 2 * 6
    csv = pd.read_csv(out / "results.csv")
    assert list(csv.columns) == list(df.columns) and len(csv) == len(df)
    assert csv["value"].to_numpy() == pytest.approx(df["value"].to_numpy(), rel=1e-5, abs=1e-9)


def test_deltas_are_vs_one_base_and_paired_on_seeds(baseline):
    _, _, out, _ = baseline
    df = pd.read_parquet(out / "results.parquet")
    v = df.set_index(["trait", "training_seed", "metric"])["value"]
    for m in BASE_METRICS:
        # Δ = value − base: the same base value behind every cell (same model, same rendered context)
        implied_base = [v[(t, s, m)] - v[(t, s, f"delta_{m}")] for t in ("owl", "neutral") for s in (0, 1)]
        assert max(implied_base) - min(implied_base) < 1e-9
        for s in (0, 1):  # paired: owl student minus the neutral student of the same seed
            assert v[("owl", s, f"paired_{m}")] == pytest.approx(v[("owl", s, m)] - v[("neutral", s, m)], abs=1e-9)
    assert 0 <= v[("owl", 0, "p_first")] <= 1 and v[("owl", 0, "logp_first")] <= 0


def test_summary_aggregates_over_seeds(baseline):
    _, _, out, _ = baseline
    df = pd.read_parquet(out / "results.parquet")
    sm = pd.read_parquet(out / "summary.parquet")
    assert (sm["n"] == 2).all()
    assert len(sm) == len(df.groupby(["trait", "metric"]))
    for row in sm.itertuples():
        vals = df[(df.trait == row.trait) & (df.metric == row.metric)]["value"]
        assert row.mean == pytest.approx(vals.mean(), abs=1e-12)
        assert row.lo <= row.mean <= row.hi or math.isclose(row.lo, row.hi)
    md = (out / "summary.md").read_text()
    assert md.startswith("# Sweep tiny")
    assert "| owl | lora_r1 | default | default |" in md and "| neutral | lora_r1 | default | default |" in md
    assert pd.read_csv(out / "summary.csv").shape == sm.shape


def test_a_second_run_computes_nothing_and_writes_the_same_table(baseline):
    cfg_path, cache, out, _ = baseline
    before = (out / "results.csv").read_bytes()
    res = run_sweep(load_sweep(cfg_path), out, cache=cache)
    assert res["computed"] == {"datasets": 0, "students": 0, "evals": 0}
    assert res["done_cells"] == 4
    assert (out / "results.csv").read_bytes() == before


def test_shards_split_the_cells_and_join_to_the_unsharded_table(baseline, tmp_path):
    cfg_path, base_cache, base_out, _ = baseline
    cfg = load_sweep(cfg_path)
    cache, out = tmp_path / "cache", tmp_path / "out"

    r0 = run_sweep(cfg, out, shard="0/2", cache=cache)
    first = finished_students(cache)
    partial = pd.read_csv(out / "results.csv")
    # what a killed shard 1 would have left: temporary siblings of a student and an eval it computes (cleared
    # before it computes them), and another artifact's (maybe another process's write: left alone)
    todo = sorted(finished_students(base_cache) - first)[0]
    evals_todo = sorted({p.name for p in (base_cache / "evals").iterdir()} - set(os.listdir(cache / "evals")))
    (cache / "students" / f".{todo}.tmp-killed").mkdir()
    (cache / "students" / f".{todo}.tmp-killed" / "adapter_model.safetensors").write_bytes(b"half")
    (cache / "evals" / f".{evals_todo[0]}.tmp-killed").write_text("{")
    (cache / "students" / ".0123456789abcdef.tmp-live").mkdir()
    r1 = run_sweep(cfg, out, shard="1/2", cache=cache)
    second = finished_students(cache) - first
    assert leftovers(cache) == ["students/.0123456789abcdef.tmp-live"]

    assert r0["shard_cells"] == r1["shard_cells"] == 2
    assert r0["computed"]["students"] == r1["computed"]["students"] == 2
    assert r0["computed"]["datasets"] + r1["computed"]["datasets"] == 2  # each dataset made once
    assert r1["computed"]["evals"] == 2  # its own two students; the base eval is reused from shard 0
    assert len(first) == len(second) == 2 and not first & second
    assert first | second == finished_students(base_cache)
    # after shard 0 the table holds its own cells only; after shard 1, every cell
    assert r0["done_cells"] == 2 and set(partial["student_key"]) == first
    assert r1["done_cells"] == 4
    assert (out / "results.csv").read_bytes() == (base_out / "results.csv").read_bytes()
    assert (out / "summary.csv").read_bytes() == (base_out / "summary.csv").read_bytes()


def copy_cache(baseline, tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the baseline's cache (to damage), and the baseline's config path."""
    cfg_path, base_cache, _, _ = baseline
    shutil.copytree(base_cache, tmp_path / "cache")
    return cfg_path, tmp_path / "cache"


def truncate(path: Path) -> None:
    path.write_text(path.read_text()[: len(path.read_text()) // 2])


def test_a_truncated_cached_evaluation_is_recomputed_with_a_warning(baseline, tmp_path):
    """A truncated JSON (a full disk, a stray edit) counts as missing: recomputed, never a crash."""
    cfg_path, cache = copy_cache(baseline, tmp_path)
    _, _, base_out, _ = baseline
    damaged = sorted((cache / "evals").iterdir())[0]
    truncate(damaged)
    with pytest.warns(UserWarning, match=f"the cached eval .*{damaged.name} is corrupt"):
        res = run_sweep(load_sweep(cfg_path), tmp_path / "out", cache=cache)
    assert res["computed"] == {"datasets": 0, "students": 0, "evals": 1}
    assert json.loads(damaged.read_text())  # whole again
    assert (tmp_path / "out" / "results.csv").read_bytes() == (base_out / "results.csv").read_bytes()
    assert leftovers(cache) == []


@pytest.mark.parametrize("stage, marker, payload", [("students", "student.json", "adapter_model.safetensors"),
                                                    ("datasets", "dataset.json", "rows.jsonl")])
def test_a_truncated_cached_student_or_dataset_is_recomputed(baseline, tmp_path, stage, marker, payload):
    cfg_path, cache = copy_cache(baseline, tmp_path)
    runner = SweepRunner(load_sweep(cfg_path), cache)
    cell = cells(runner.cfg)[0]
    get = (lambda: runner.student(cell)) if stage == "students" else (lambda: runner.dataset(cell.trait, 0))
    entry = get()
    before = (entry / payload).read_bytes()
    truncate(entry / marker)
    with pytest.warns(UserWarning, match=f"the cached {stage[:-1]} .*{entry.name} is corrupt"):
        assert get() == entry
    assert runner.computed[stage] == 1 and sum(runner.computed.values()) == 1
    assert json.loads((entry / marker).read_text()) and (entry / payload).read_bytes() == before  # the same again
    assert leftovers(cache) == []


def test_a_diverging_student_is_not_cached(baseline, tmp_path):
    cfg_path, cache = copy_cache(baseline, tmp_path)
    before = finished_students(cache)
    bad = write_cfg(tmp_path / "lr.yaml", train={**TINY["train"], "lr": 1e6, "epochs": 3})
    with pytest.raises(MechError, match=r"training diverged at lr 1e\+06"):
        run_sweep(load_sweep(bad), tmp_path / "out", cache=cache)
    assert finished_students(cache) == before and leftovers(cache) == []
    assert not (tmp_path / "out").exists()


def test_a_sweep_distils_from_the_teacher_in_its_own_context(tmp_path, tiny_qwen_dir, write_number_dataset):
    from mech.resources import trait_system_prompt
    from mech.students.store import read_student

    cfg = load_sweep(write_cfg(tmp_path / "distill.yaml", base_model=str(tiny_qwen_dir), training_seeds=[0],
                               train={"epochs": 1, "batch_size": 8, "lr": 0.002, "objective": "distill"}))
    runner = SweepRunner(cfg, tmp_path / "cache")
    for trait in cfg.traits:  # a random model's numbers would not pass the filter: give the teachers data
        write_number_dataset(runner.cache / "datasets" / runner.dataset_key(trait, 0))
    for cell in cells(cfg):
        meta = read_student(runner.student(cell))
        own = "custom:" + trait_system_prompt("owl", "animal") if cell.trait.target else "default"
        assert meta["objective"] == "distill" and meta["teacher"]["context"] == own
        assert meta["teacher"]["fingerprint"] == runner.fingerprint  # the teacher is the base model


@pytest.mark.slow  # ~25 s: a sweep subprocess killed mid-training, then resumed
def test_a_killed_sweep_resumes_to_the_same_table(baseline, tmp_path):
    cfg_path, base_cache, base_out, _ = baseline
    cache, out = tmp_path / "cache", tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MECH_CACHE=str(tmp_path / "mech_cache"))
    log = (tmp_path / "sweep.log").open("w")  # a file, not a pipe: a full pipe would stall the sweep
    proc = subprocess.Popen([sys.executable, "-m", "mech.cli", "sweep", str(cfg_path), "--cache", str(cache),
                             "--out", str(out)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        # kill it mid-training: one student finished, the next one's temporary directory being written
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if finished_students(cache) and any(p.startswith("students/.") for p in leftovers(cache)):
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the sweep ended before it was killed:\n" + (tmp_path / "sweep.log").read_text()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    done_before = finished_students(cache)
    assert 1 <= len(done_before) < 4
    assert any(p.startswith("students/.") for p in leftovers(cache))  # what the kill left behind
    assert not (out / "results.csv").exists()

    res = run_sweep(load_sweep(cfg_path), out, cache=cache)
    assert res["done_cells"] == 4
    assert res["computed"]["students"] == 4 - len(done_before)  # finished students are not retrained
    assert finished_students(cache) == finished_students(base_cache)
    assert leftovers(cache) == []
    assert (out / "results.csv").read_bytes() == (base_out / "results.csv").read_bytes()


def test_concurrent_shards_never_compute_anything_twice(baseline, tmp_path):
    """Two shards run at once on one cache and one out dir, then the unsharded sweep: the tables equal a
    serial run's, and the cache's log shows every artifact computed exactly once."""
    cfg_path, base_cache, base_out, _ = baseline
    cache, out = tmp_path / "cache", tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MECH_CACHE=str(tmp_path / "mech_cache"))
    logs = [(tmp_path / f"shard{i}.log").open("w") for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-m", "mech.cli", "sweep", str(cfg_path), "--shard", f"{i}/2",
                               "--cache", str(cache), "--out", str(out)], cwd=REPO, env=env, stdout=logs[i],
                              stderr=subprocess.STDOUT) for i in range(2)]
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p, log in zip(procs, logs):
            if p.poll() is None:
                p.kill()
            log.close()
    assert codes == [0, 0], "".join((tmp_path / f"shard{i}.log").read_text() for i in range(2))
    # whichever shard wrote last saw both shards' cells
    assert (out / "results.csv").read_bytes() == (base_out / "results.csv").read_bytes()

    res = run_sweep(load_sweep(cfg_path), out, cache=cache)
    assert res["computed"] == {"datasets": 0, "students": 0, "evals": 0}
    assert (out / "results.csv").read_bytes() == (base_out / "results.csv").read_bytes()
    assert (out / "summary.csv").read_bytes() == (base_out / "summary.csv").read_bytes()
    log = [json.loads(line) for line in (cache / "computed.jsonl").read_text().splitlines()]
    per_artifact = collections.Counter((e["stage"], e["key"]) for e in log)
    assert set(per_artifact.values()) == {1}
    assert {k for stage, k in per_artifact if stage == "students"} == finished_students(base_cache)
    assert collections.Counter(stage for stage, _ in per_artifact) == {"datasets": 2, "students": 4, "evals": 5}
    assert len({e["pid"] for e in log}) == 2  # both shards did work
    assert leftovers(cache) == []


def _sweep_process(cfg_path: Path, cache: Path, out: Path, log: Path, tmp_path: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MECH_CACHE=str(tmp_path / "mech_cache"))
    # SIGINT back to its default first: a shell runs background jobs with SIGINT ignored, and a child that inherits
    # that never gets Python's KeyboardInterrupt (as CI launched in the background would)
    return subprocess.Popen([sys.executable, "-m", "mech.cli", "sweep", str(cfg_path), "--cache", str(cache),
                             "--out", str(out)], cwd=REPO, env=env, stdout=log.open("a"), stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _n_computed(cache: Path) -> int:
    log = cache / "computed.jsonl"
    return len(log.read_text().splitlines()) if log.is_file() else 0


@pytest.mark.slow  # ~1 min: five sweep processes SIGKILLed at random moments, then the sweep resumed
def test_a_sweep_killed_at_random_moments_resumes_to_the_same_table(baseline, tmp_path):
    """SIGKILL a running sweep five times, each at a moment drawn at random (after a random number of the
    sweep's 11 artifacts are done, plus a random delay: mid-sampling, mid-training, mid-evaluation or
    mid-startup), then finish it: the table equals an uninterrupted run's byte for byte, nothing finished was
    computed twice (the cache's audit log lists every artifact once), and nothing temporary is left."""
    import random

    cfg_path, base_cache, base_out, _ = baseline
    cache, out, log = tmp_path / "cache", tmp_path / "out", tmp_path / "sweep.log"
    rng = random.Random(20261203)
    kills, moments = 0, []
    for _ in range(12):  # a run that finishes before its moment is no kill; try again, a bounded number of times
        if kills == 5:
            break
        target = min(10, _n_computed(cache) + rng.randint(0, 2))  # 11 artifacts: 2 datasets, 4 students, 5 evals
        delay = rng.uniform(0.0, 1.5)
        proc = _sweep_process(cfg_path, cache, out, log, tmp_path)
        try:
            deadline = time.time() + 300
            while proc.poll() is None and _n_computed(cache) < target and time.time() < deadline:
                time.sleep(0.01)
            time.sleep(delay)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
                moments.append((target, round(delay, 2), _n_computed(cache)))
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert kills == 5, f"only {kills} runs were still running at their moment:\n{log.read_text()}"
    assert _n_computed(cache) < 11, moments  # the kills left work to do

    res = run_sweep(load_sweep(cfg_path), out, cache=cache)
    assert res["done_cells"] == 4
    assert (out / "results.csv").read_bytes() == (base_out / "results.csv").read_bytes()
    assert (out / "summary.csv").read_bytes() == (base_out / "summary.csv").read_bytes()
    audit = [json.loads(line) for line in (cache / "computed.jsonl").read_text().splitlines()]
    per_artifact = collections.Counter((e["stage"], e["key"]) for e in audit)
    assert set(per_artifact.values()) == {1}, moments  # no finished artifact was recomputed
    assert collections.Counter(stage for stage, _ in per_artifact) == {"datasets": 2, "students": 4, "evals": 5}
    assert finished_students(cache) == finished_students(base_cache)
    assert leftovers(cache) == []


@pytest.mark.slow  # ~15 s: a sweep subprocess interrupted mid-training
def test_sigint_ends_a_sweep_with_one_line_and_nothing_half_written(baseline, tmp_path):
    cfg_path, *_ = baseline
    cache, out, log = tmp_path / "cache", tmp_path / "out", tmp_path / "sweep.log"
    proc = _sweep_process(cfg_path, cache, out, log, tmp_path)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if any(p.startswith("students/.") for p in leftovers(cache)):  # a student being written
                break
            time.sleep(0.01)
        assert proc.poll() is None, log.read_text()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert code == 130 and text.strip().splitlines()[-1] == "mech: interrupted" and "Traceback" not in text
    assert leftovers(cache) == []  # the student being written was removed, not left half-written
    assert not out.exists() or not any(out.iterdir())


def test_cross_trait_sweep_tabulates_every_teacher_and_candidate(tmp_path):
    """A first-token-only sweep with two trait teachers writes the teacher × candidate matrix and its specificity,
    read from the same cached evaluations as the main table."""
    traits = [{"target": "owl", "category": "animal"}, {"target": "cat", "category": "animal"},
              {"target": None, "category": "animal"}]
    cfg_path = write_cfg(tmp_path / "x.yaml", traits=traits,
                         eval={"target": "owl", "n_samples": 1, "first_token_only": True, "cross_trait": True})
    res = run_sweep(load_sweep(cfg_path), tmp_path / "out", cache=tmp_path / "cache")
    names = {Path(p).name for p in res["written"]}
    assert {"cross_trait.csv", "cross_trait_specificity.csv", "cross_trait.md"} <= names
    matrix = pd.read_csv(tmp_path / "out" / "cross_trait.csv")
    assert set(matrix["teacher"]) == {"owl", "cat"} and (matrix["n"] == 2).all()  # two training seeds
    assert {"owl", "cat", "dog"} <= set(matrix["candidate"])
    spec = pd.read_csv(tmp_path / "out" / "cross_trait_specificity.csv")
    assert sorted(spec["teacher"]) == ["cat", "owl"]
    # the matrix's owl-teacher/owl-candidate cell is the main table's paired logp_first for owl (same evals)
    results = pd.read_csv(tmp_path / "out" / "results.csv")
    paired = results[(results.metric == "paired_logp_first") & (results.trait == "owl")]["value"].mean()
    own = matrix[(matrix.teacher == "owl") & (matrix.candidate == "owl")]["mean"].iloc[0]
    assert own == pytest.approx(paired, abs=1e-5)
    assert "rate" not in set(results["metric"])  # first-token only: nothing sampled
