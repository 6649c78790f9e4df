"""Students trained elsewhere (issue 11 item 8): `mech localise` and `mech geometry` on student directories given
with their base (--student DIR --model BASE), not only on a sweep's cached students.

Known answer: the cached students of a tiny sweep, copied elsewhere and given as directories, give the numbers the
sweep path gives. The sweep runs on a random tiny Qwen2 with hand-written teacher datasets (no sampling), so the
whole module takes seconds."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from mech.cli import main
from mech.sweep import SweepRunner, cells, load_sweep

torch.set_num_threads(1)

LOCALISE = ["--n-questions", "2", "--null-sets", "3"]
GEOMETRY = ["--n-questions", "2", "--n-rows", "4", "--ks", "0", "1", "2", "--alphas", "0", "1"]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, out: str, err: str, *fragments: str) -> None:
    """Exit 2, nothing on stdout, one stderr line `mech: error: ...` naming the fault (checked before any load)."""
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1 and lines[0].startswith("mech: error: "), err
    for f in fragments:
        assert f in lines[0], lines[0]


def assert_error_last(code: int, err: str, *fragments: str) -> None:
    """Exit 2 and one `mech: error` line, the last on stderr (after the base model loaded)."""
    errors = [line for line in err.splitlines() if "mech: error" in line]
    assert code == 2 and len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    for f in fragments:
        assert f in errors[0], errors[0]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_qwen_dir, write_number_dataset):
    """A tiny sweep's cache (LoRA r2 and full FT, 2 seeds, owl and neutral teachers) and copies of its students
    elsewhere, as a researcher would hold published ones: {(student, trait, seed): dir}."""
    root = tmp_path_factory.mktemp("direct")
    cfg_path = root / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "name": "direct", "base_model": str(tiny_qwen_dir),
        "traits": [{"target": "owl", "category": "animal"}, {"target": None, "category": "animal"}],
        "students": [{"method": "lora", "rank": 2}, {"method": "full"}], "training_seeds": [0, 1],
        "teacher": {"n_prompts": 8}, "train": {"epochs": 1, "batch_size": 8, "lr": 0.05, "full_lr": 0.002},
        "eval": {"target": "owl", "n_samples": 1}}))
    runner = SweepRunner(load_sweep(cfg_path), root / "cache")
    for trait in runner.cfg.traits:  # a random model's numbers would not pass the filter: hand-written data,
        n = 32 if trait.target else 16  # different for the two teachers, so the paired effects are not zero
        write_number_dataset(runner.cache / "datasets" / runner.dataset_key(trait, 0), n=n)
    copies = {}
    for c in cells(runner.cfg):
        key = (c.labels()["student"], c.trait.target or "neutral", c.training_seed)
        copies[key] = Path(shutil.copytree(runner.student(c), root / "elsewhere" / "_".join(map(str, key))))
    return cfg_path, root / "cache", copies


def _dirs(copies, student: str, trait: str) -> list[Path]:
    return [copies[(student, trait, s)] for s in (0, 1)]


def _both_ways(capsys, command: str, sweep, model_dir, tmp_path, extra) -> tuple[Path, Path, str]:
    """Run ``command`` on the sweep's lora_r2 students, then on copies of their dirs (with their neutral
    controls): (sweep output dir, directory output dir, the second run's stdout)."""
    cfg_path, cache, copies = sweep
    via_sweep, direct = tmp_path / "sweep", tmp_path / "direct"
    code, _, err = run(capsys, command, cfg_path, "--students", "lora_r2", "--cache", cache, "--out", via_sweep,
                       *extra)
    assert code == 0, err
    code, out, err = run(capsys, command, "--student", *_dirs(copies, "lora_r2", "owl"),
                         "--control", *_dirs(copies, "lora_r2", "neutral"), "--model", model_dir,
                         "--target", "owl", "--name", "lora_r2", "--out", direct, *extra)
    assert code == 0, err
    return via_sweep, direct, out


def _same_csv(a: Path, b: Path, drop: tuple[str, ...] = (), where: dict | None = None) -> None:
    """The two tables hold the same values (exactly: same base, same students, same code)."""
    x, y = pd.read_csv(a), pd.read_csv(b)
    for k, v in (where or {}).items():
        x, y = x[x[k] == v], y[y[k] == v]
    x, y = x.drop(columns=list(drop)).reset_index(drop=True), y.drop(columns=list(drop)).reset_index(drop=True)
    assert len(x) > 0
    pd.testing.assert_frame_equal(x, y, check_exact=True)


# ------------------------------------------------------------------------------------------------ localise


def test_localise_from_dirs_gives_the_sweep_paths_numbers(sweep, tiny_qwen_dir, tmp_path, capsys):
    via_sweep, direct, out = _both_ways(capsys, "localise", sweep, tiny_qwen_dir, tmp_path, LOCALISE)
    copies = sweep[2]
    assert "# Localisation of the owl trait" in out
    for table in ("localise.csv", "localise_tests.csv", "localise_null.csv"):
        _same_csv(via_sweep / table, direct / table)
    _same_csv(via_sweep / "localise_students.csv", direct / "localise_students.csv", drop=("student_dir",))
    assert (direct / "localise.md").read_text() == (via_sweep / "localise.md").read_text()
    assert sorted(p.name for p in (direct / "figures").iterdir()) == sorted(
        p.name for p in (via_sweep / "figures").iterdir())
    assert set(pd.read_csv(direct / "localise_students.csv")["student_dir"]) == {
        str(d) for d in _dirs(copies, "lora_r2", "owl")}


def test_localise_unpaired_full_dir_is_named_after_it(sweep, tiny_qwen_dir, tmp_path, capsys):
    """One full-FT dir and no --control: effects vs the base (no paired tests), the group named after the dir."""
    _, _, copies = sweep
    student = copies[("full", "owl", 0)]
    out = tmp_path / "o"
    code, _, err = run(capsys, "localise", "--student", student, "--model", tiny_qwen_dir, "--target", "owl",
                       "--out", out, "--n-questions", "2", "--null-sets", "0")
    assert code == 0, err
    rows = pd.read_csv(out / "localise.csv")
    assert set(rows["group"]) == {student.name} and set(rows["n"]) == {1}
    assert (out / "figures" / f"dwg_{student.name}.html").is_file()


def test_an_adapter_of_another_base_fails_before_any_computation(sweep, tiny_llama_dir, tmp_path, capsys):
    _, _, copies = sweep
    out = tmp_path / "o"
    code, _, err = run(capsys, "localise", "--student", *_dirs(copies, "lora_r2", "owl"), "--model", tiny_llama_dir,
                       "--target", "owl", "--out", out, *LOCALISE)
    assert_error_last(code, err, "was trained on another base model", str(copies[("lora_r2", "owl", 0)]))
    assert not out.exists()


def test_a_control_of_another_base_fails_too(sweep, tiny_qwen_dir, make_tiny_lm, tmp_path, capsys):
    """A PEFT adapter saved on another base (a random Qwen2 of another seed: same shapes, other weights) and stamped
    as train_student stamps one: refused by its recorded fingerprint, even as the second control."""
    from mech.models.loader import record_adapter_base
    from mech.students.config import LoraSpec
    from mech.students.train import with_lora

    _, _, copies = sweep
    other = make_tiny_lm("qwen2", seed=1)
    foreign = tmp_path / "foreign"
    with_lora(copy.deepcopy(other), LoraSpec(rank=2), 0).save_pretrained(str(foreign))
    record_adapter_base(foreign, other)
    out = tmp_path / "o"
    code, _, err = run(capsys, "localise", "--student", *_dirs(copies, "lora_r2", "owl"),
                       "--control", copies[("lora_r2", "neutral", 0)], foreign, "--model", tiny_qwen_dir,
                       "--target", "owl", "--out", out, *LOCALISE)
    assert_error_last(code, err, f"adapter {foreign} was trained on another base model")
    assert not out.exists()


def test_a_full_model_dir_of_another_architecture_fails(sweep, tiny_llama_dir, tmp_path, capsys):
    """A full finetune from elsewhere records no base (no student.json): its architecture is checked instead."""
    _, _, copies = sweep
    published = Path(shutil.copytree(copies[("full", "owl", 0)], tmp_path / "published"))
    (published / "student.json").unlink()
    out = tmp_path / "o"
    for command, extra in (("localise", LOCALISE), ("geometry", GEOMETRY[:2])):
        code, _, err = run(capsys, command, "--student", published, "--model", tiny_llama_dir, "--target", "owl",
                           "--out", out, *extra)
        assert_error_last(code, err, f"student {published} is not a finetune of this base", "model_type qwen2 vs llama")
        assert not out.exists()


@pytest.mark.parametrize("argv, fragments", [
    ([], ("names no students", "--student DIR")),
    (["SWEEP", "--student", "S0"], ("got both a sweep", "--student dirs")),
    (["--student", "S0", "S1", "--control", "N0"], ("--control gives 1 dir for 2 dirs of --student",
                                                    "one neutral-teacher control per student")),
    (["--student", "S0", "--control", "N0", "--unpaired"], ("--unpaired and --control contradict",)),
    (["--student", "S0", "S0"], ("is given twice",)),
    (["--student", "NOPE"], ("is not a directory",)),
    (["--student", "S0", "--students", "lora_r2"], ("--students picks students from a sweep's cache",)),
    (["SWEEP", "--target", "owl"], ("--target goes with --student",)),
    (["--student", "S0", "--eval-context", "defualt"], ("unknown context 'defualt'",)),
    (["--student", "S0", "--train-context", "nothing"], ("unknown context 'nothing'",)),
    (["--student", "S0", "--category", "fish"], ("no questions for category 'fish'",)),
])
def test_localise_refuses_bad_inputs_before_the_base_loads(sweep, tiny_qwen_dir, tmp_path, capsys, monkeypatch,
                                                           argv, fragments):
    import mech.models

    monkeypatch.setattr(mech.models, "load_model", lambda *a, **k: pytest.fail("the base loaded"))
    cfg_path, _, copies = sweep
    names = {"SWEEP": cfg_path, "S0": copies[("lora_r2", "owl", 0)], "S1": copies[("lora_r2", "owl", 1)],
             "N0": copies[("lora_r2", "neutral", 0)], "NOPE": tmp_path / "nope"}
    base = [] if not argv or argv[0] == "SWEEP" else ["--model", tiny_qwen_dir, "--target", "owl"]
    out = tmp_path / "o"
    assert_one_line_error(*run(capsys, "localise", *(names.get(x, x) for x in argv), *base, "--out", out),
                          *fragments)
    assert not out.exists()


def test_student_needs_model_and_target(sweep, capsys):
    _, _, copies = sweep
    s0 = copies[("lora_r2", "owl", 0)]
    for command in ("localise", "geometry"):
        assert_one_line_error(*run(capsys, command, "--student", s0, "--target", "owl"), "--student needs --model")
        assert_one_line_error(*run(capsys, command, "--student", s0, "--model", "organism"), "--student needs --target")


# ------------------------------------------------------------------------------------------------ geometry


def test_geometry_from_dirs_gives_the_sweep_paths_numbers(sweep, tiny_qwen_dir, tmp_path, capsys):
    """Spectra, overlaps, the trait-specific share, truncation and the readout's alignment agree exactly; the
    steering-vector tables need teacher data and stay empty for directories."""
    via_sweep, direct, out = _both_ways(capsys, "geometry", sweep, tiny_qwen_dir, tmp_path, GEOMETRY)
    for table in ("geometry", "geometry_summary", "overlaps", "overlap_summary", "trait_specific", "truncation",
                  "truncation_summary"):
        _same_csv(via_sweep / f"{table}.csv", direct / f"{table}.csv")
    _same_csv(via_sweep / "alignment.csv", direct / "alignment.csv", where={"direction": "readout"})
    assert set(pd.read_csv(direct / "alignment.csv")["direction"]) == {"readout"}
    for table in ("cosines", "sufficiency", "necessity", "directions"):
        assert (direct / f"{table}.csv").read_text().strip() == ""
    assert "steering vectors are read on teacher data" in out
    figures = {p.stem for p in (direct / "figures").glob("*.html")}
    assert figures == {"spectra_effective_rank", "overlaps", "alignment", "truncation"}


def test_geometry_of_one_unpaired_dir_is_vs_the_base(sweep, tiny_qwen_dir, tmp_path, capsys):
    """No --control: truncation is vs the base, its spectra are the paired run's trait arm, nothing to overlap."""
    _, _, copies = sweep
    student = copies[("full", "owl", 0)]
    out = tmp_path / "o"
    code, md, err = run(capsys, "geometry", "--student", student, "--model", tiny_qwen_dir, "--target", "owl",
                        "--out", out, *GEOMETRY)
    assert code == 0, err
    assert "Trait effects are vs the base" in md
    trunc = pd.read_csv(out / "truncation.csv")
    whole = trunc[(trunc["mode"] == "remove") & (trunc["k"] == 0)].iloc[0]
    assert whole["paired"] == whole["student_paired"] == pytest.approx(whole["delta_trait"], abs=1e-6)
    assert (out / "overlaps.csv").read_text().strip() == "" and not (out / "figures" / "overlaps.html").exists()
    assert set(pd.read_csv(out / "geometry.csv")["student"]) == {student.name}


def test_geometry_refuses_what_directories_cannot_give(sweep, tiny_qwen_dir, tiny_llama_dir, tmp_path, capsys):
    cfg_path, cache, copies = sweep
    s0, out = copies[("lora_r2", "owl", 0)], tmp_path / "o"
    direct = ["--student", s0, "--model", tiny_qwen_dir, "--target", "owl", "--out", out]
    assert_one_line_error(*run(capsys, "geometry", "--out", out), "names no students")
    assert_one_line_error(*run(capsys, "geometry", cfg_path, *direct), "got both a sweep")
    assert_one_line_error(*run(capsys, "geometry", *direct, "--control", s0, s0), "--control gives 2 dirs for 1 dir")
    assert_one_line_error(*run(capsys, "geometry", *direct, "--n-samples", "2"), "--n-samples", "teacher data")
    assert_one_line_error(*run(capsys, "geometry", cfg_path, "--students", "lora_r2", "--eval-context", "none",
                               "--out", out), "--eval-context goes with --student")
    assert_one_line_error(*run(capsys, "geometry", cfg_path, "--out", out), "pass --students NAMES")
    code, _, err = run(capsys, "geometry", "--student", s0, "--model", tiny_llama_dir, "--target", "owl",
                       "--out", out, *GEOMETRY)
    assert_error_last(code, err, "was trained on another base model")
    assert not out.exists()
