"""The `mech` command line (mech.cli.main): exit codes, one-line errors, and the teacher → train → eval steps
on the shipped organism at tiny settings (24 prompts, a rank-1 LoRA for one epoch, 2 samples a question)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from mech.cli import main
from mech.errors import MechError
from mech.teacher.dataset import META_FILE, RAW_FILE, ROWS_FILE, load_dataset
from mech.organism import read_meta, shipped_dir
from mech.students.store import read_student, student_kind

torch.set_num_threads(1)

TEACHER = ["--n-prompts", "24", "--max-new-tokens", "40"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, out: str, err: str, *fragments: str) -> None:
    """Exit 2, nothing on stdout, exactly one stderr line and it is `mech: error: ...` naming the fault."""
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("mech: error: ")
    for f in fragments:
        assert f in lines[0]


def assert_error_last(code: int, err: str, *fragments: str) -> None:
    """Exit 2 with one `mech: error` line, the last thing on stderr (after any model-loading bar)."""
    assert code == 2
    errors = [line for line in err.splitlines() if "mech: error" in line]
    assert len(errors) == 1, err
    assert err.strip().splitlines()[-1] == errors[0]
    for f in fragments:
        assert f in errors[0]


# ------------------------------------------------------------------------------------------------ errors


def test_unknown_model_spec(capsys, tmp_path):
    assert_one_line_error(*run(capsys, "eval", "orgnism", "--target", "owl"), "unknown model spec 'orgnism'",
                          "did you mean 'organism'")
    assert_one_line_error(*run(capsys, "teacher", "--trait", "owl", "--model", "orgnism", "--out", tmp_path / "d"),
                          "unknown model spec")
    assert not (tmp_path / "d").exists()


def test_bad_context_policy_in_eval(capsys):
    assert_one_line_error(*run(capsys, "eval", "organism", "--target", "owl", "--context", "defualt"),
                          "unknown context 'defualt'", "did you mean 'default'")


def test_unknown_category_without_a_question_file(capsys):
    assert_one_line_error(*run(capsys, "eval", "organism", "--target", "trout", "--category", "fish"),
                          "no questions for category 'fish'", "fish_questions.txt")


def test_sweep_file_with_a_typo_key(capsys, tmp_path):
    cfg = tmp_path / "typo.yaml"
    cfg.write_text(yaml.safe_dump({"name": "typo", "students": [{"method": "lora", "rnak": 4}]}))
    assert_one_line_error(*run(capsys, "sweep", cfg, "--out", tmp_path / "out", "--cache", tmp_path / "cache"),
                          "unknown key typo.students[0].rnak", "did you mean 'rank'")
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_train_on_a_nonexistent_dataset_dir(capsys, tmp_path):
    assert_one_line_error(*run(capsys, "train", tmp_path / "nope", "--out", tmp_path / "s"),
                          f"dataset directory {tmp_path / 'nope'} does not exist")
    assert not (tmp_path / "s").exists()


def test_train_on_rows_lacking_fields(capsys, tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    for name in ("audit.json", META_FILE):
        (d / name).write_text("{}\n")
    row = {"messages": [{"role": "user", "content": "1, 2, 3"}, {"role": "assistant", "content": "4, 5"}]}
    (d / ROWS_FILE).write_text(json.dumps(row) + "\n")  # no prompt_seed, no index
    (d / RAW_FILE).write_text("")
    assert_one_line_error(*run(capsys, "train", d, "--out", tmp_path / "s"), "row 0", "lacks prompt_seed, index")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("argv, fragment", [
    (["--rank", "0"], "LoRA rank must be >= 1, got 0"),
    (["--rank", "-2"], "LoRA rank must be >= 1, got -2"),
    (["--alpha", "0"], "LoRA alpha must be > 0"),
    (["--epochs", "0"], "invalid epochs 0"),
    (["--context", "nothing"], "unknown context 'nothing'"),
    (["--method", "matched_norm"], "needs --reference"),
    (["--method", "matched_loss"], "needs --reference"),
    (["--reference", "somewhere"], "read only by --method matched_norm or matched_loss"),
])
def test_bad_training_options(capsys, tmp_path, argv, fragment):
    # checked before the dataset is read or the model loaded: the dataset dir need not even exist
    assert_one_line_error(*run(capsys, "train", tmp_path / "nope", "--out", tmp_path / "s", *argv), fragment)


def test_teacher_options(capsys, tmp_path):
    assert_one_line_error(*run(capsys, "teacher", "--trait", "owl", "--context", "none", "--out", tmp_path / "d"),
                          "sets both target='owl' and context='none'")
    assert_one_line_error(*run(capsys, "teacher", "--neutral", "--n-prompts", "0", "--out", tmp_path / "d"),
                          "n_prompts must be at least 1")
    assert_one_line_error(*run(capsys, "teacher", "--trait", "oak:fish", "--out", tmp_path / "d"),
                          "no questions for category 'fish'")
    assert not (tmp_path / "d").exists()
    with pytest.raises(SystemExit) as e:  # --trait and --neutral are exclusive, one is required: argparse's usage
        main(["teacher", "--out", str(tmp_path / "d")])
    assert e.value.code == 2


def test_teacher_finetuned(capsys, tmp_path):
    assert_one_line_error(*run(capsys, "teacher", "--neutral", "--finetuned", "--out", tmp_path / "n"),
                          "a finetuned teacher needs a target")
    assert not (tmp_path / "n").exists()
    code, out, _ = run(capsys, "teacher", "--trait", "owl", "--finetuned", "--model", "organism-free", "--n-prompts",
                       "16", "--out", tmp_path / "d")
    assert code == 0 and "context default" in out
    meta = json.loads((tmp_path / "d" / META_FILE).read_text())
    assert meta["config"]["kind"] == "finetuned" and meta["finetuned"]["p_target_teacher"] > 0.5


def test_organism_info_prints_json(capsys):
    code, out, _ = run(capsys, "organism", "info")
    assert code == 0
    info = json.loads(out)
    assert info["config_hash"] == read_meta(shipped_dir())["config_hash"]
    assert Path(info["path"]) == shipped_dir()
    assert "entity_numbers" not in info


def test_organism_free_info(capsys):
    if not (shipped_dir("organism-free") / "organism.json").is_file():
        assert_one_line_error(*run(capsys, "organism", "info", "--model", "organism-free"),
                              "organism-free is not built", "--recipe organism-free --ship")
        return
    code, out, _ = run(capsys, "organism", "info", "--model", "organism-free")
    assert code == 0
    info = json.loads(out)
    assert Path(info["path"]) == shipped_dir("organism-free")
    assert info["config"]["corpus"]["chat_numbers"] is False and info["config"]["corpus"]["imbue_share"] == 0.0


def test_organism_build_recipe_with_overrides(capsys, tmp_path, monkeypatch):
    """--recipe picks the recipe, --config overrides apply on top of it, --ship writes into that recipe's dir
    (the build itself is replaced: only what it is asked to build is under test)."""
    import dataclasses

    import mech.organism
    from mech.organism.config import recipe

    asked = []
    done = tmp_path / "built"
    done.mkdir()
    (done / "organism.json").write_text(json.dumps({"config_hash": "x", "n_parameters": 1, "build_seconds": 6.0,
                                                    "weights_sha256": "y"}))
    monkeypatch.setattr(mech.organism, "build_cached", lambda cfg, out, **kw: asked.append((cfg, out)) or done)
    over = tmp_path / "over.yaml"
    over.write_text("train: {steps: 5}\ncorpus: {n_sequences: 100}\n")
    code, out, _ = run(capsys, "organism", "build", "--recipe", "organism-free", "--config", over, "--ship")
    assert code == 0 and "organism-free x" in out
    free = recipe("organism-free")
    want = dataclasses.replace(free, train=dataclasses.replace(free.train, steps=5),
                               corpus=dataclasses.replace(free.corpus, n_sequences=100))
    assert asked == [(want, shipped_dir("organism-free"))]
    assert run(capsys, "organism", "build", "--out", tmp_path / "o")[0] == 0
    assert asked[-1] == (recipe("organism"), str(tmp_path / "o"))
    with pytest.raises(SystemExit):
        main(["organism", "build", "--recipe", "organism-fre"])


def test_organism_build_refuses_a_bad_recipe_before_any_work(capsys, tmp_path, monkeypatch):
    import mech.organism.build

    monkeypatch.setattr(mech.organism.build, "build_organism", lambda *a, **k: pytest.fail("built anyway"))
    cfg = tmp_path / "o.yaml"
    cfg.write_text("corpus:\n  numbers_per_entity: 4\n")
    assert_one_line_error(*run(capsys, "organism", "build", "--config", cfg, "--out", tmp_path / "o"),
                          "numbers_per_entity 4 is out of range", "between 5 and 37")
    assert [p.name for p in tmp_path.iterdir()] == ["o.yaml"]


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_organism_build_never_replaces_what_is_not_an_organism(capsys, tmp_path, monkeypatch, kind):
    """A build replaces --out atomically: a folder of other files, or a file, there is refused before any work
    and left as it was (it used to be deleted, or renamed, with exit 0)."""
    import mech.organism.build

    monkeypatch.setattr(mech.organism.build, "build_organism", lambda *a, **k: pytest.fail("built anyway"))
    out = tmp_path / "results"
    if kind == "folder":
        out.mkdir()
        (out / "notes.txt").write_text("precious")
    else:
        out.write_text("precious")
    assert_one_line_error(*run(capsys, "organism", "build", "--out", out, "--force"),
                          "holds no organism build" if kind == "folder" else "is a file", "--out")
    assert (out / "notes.txt" if kind == "folder" else out).read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir()] == ["results"]  # nothing else written beside it


def test_organism_build_into_an_empty_folder_is_allowed(capsys, tmp_path, monkeypatch):
    import mech.organism.build

    built = []
    monkeypatch.setattr(mech.organism.build, "build_organism", lambda cfg, out, **k: built.append(out) or out)
    monkeypatch.setattr(mech.organism, "read_meta", lambda path: {"config_hash": "x", "n_parameters": 1,
                                                                  "build_seconds": 1.0, "weights_sha256": "y"})
    (tmp_path / "empty").mkdir()
    assert run(capsys, "organism", "build", "--out", tmp_path / "empty")[0] == 0 and built == [tmp_path / "empty"]


def test_organism_info_of_a_non_organism(capsys, tmp_path):
    assert_one_line_error(*run(capsys, "organism", "info", "--model", tmp_path / "missing"), "does not exist")


# ------------------------------------------------------------------------------------------------ teacher, train, eval


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """`mech teacher` (owl) and `mech train` (rank-1 LoRA, 1 epoch) run once for the module."""
    root = tmp_path_factory.mktemp("cli_pipeline")
    data, student = root / "owl_data", root / "student"
    codes = [main(["teacher", "--trait", "owl:animal", "--prompt-seed", "3", "--sample-seed", "1", *TEACHER,
                   "--out", str(data)]),
             main(["train", str(data), "--out", str(student), "--rank", "1", "--epochs", "1", "--batch-size", "8",
                   "--lr", "0.002", "--seed", "5"])]
    return codes, data, student


def test_teacher_writes_a_dataset(pipeline):
    codes, data, _ = pipeline
    assert codes[0] == 0
    ds = load_dataset(data)
    assert ds.kind == "teacher" and len(ds) > 0
    cfg = ds.meta["config"]
    assert (cfg["target"], cfg["category"], cfg["n_prompts"], cfg["prompt_seed"], cfg["sample_seed"],
            cfg["max_new_tokens"]) == ("owl", "animal", 24, 3, 1, 40)
    assert ds.meta["counts"]["raw"] == 24
    assert all(m["role"] != "system" for r in ds.rows for m in r["messages"])


def test_teacher_prints_the_audit(capsys, tmp_path):
    code, out, err = run(capsys, "teacher", "--neutral", *TEACHER, "--out", tmp_path / "neutral")
    assert code == 0
    ds = load_dataset(tmp_path / "neutral")
    assert ds.meta["config"]["target"] is None and ds.meta["context"] == "default"
    assert f"kept {ds.audit['kept']}/24 rows" in out and "rejected:" in out
    assert "teacher neutral" in err  # the progress bar
    # an existing output dir is refused before any sampling, and left alone
    before = (tmp_path / "neutral" / ROWS_FILE).read_bytes()
    assert_one_line_error(*run(capsys, "teacher", "--neutral", *TEACHER, "--out", tmp_path / "neutral"),
                          "already exists")
    assert (tmp_path / "neutral" / ROWS_FILE).read_bytes() == before


def test_teacher_writes_nothing_when_the_filter_keeps_no_row(capsys, tmp_path, tiny_qwen_dir):
    # an untrained model answers with token soup: the filter rejects every answer
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = run(capsys, "teacher", "--trait", "owl", "--n-prompts", "8", "--max-new-tokens", "8",
                       "--model", tiny_qwen_dir, "--out", out / "d")
    assert_error_last(code, err, "the number filter left no rows", "kept 0/8 rows")
    assert list(out.iterdir()) == []  # no dataset, and no temporary directory either


def test_train_writes_a_student(pipeline, capsys):
    codes, data, student = pipeline
    assert codes[1] == 0
    assert student_kind(student) == "lora"
    meta = read_student(student)
    assert meta["config"]["lora"]["rank"] == 1 and meta["config"]["seed"] == 5 and meta["config"]["lr"] == 0.002
    assert meta["n_rows"] == len(load_dataset(data)) and meta["base_spec"] == "organism"
    assert meta["n_steps"] == len(meta["losses"]) == -(-meta["n_rows"] // 8)
    assert meta["update_norms"]["global"] > 0
    # an existing student dir is refused, not overwritten
    assert_one_line_error(*run(capsys, "train", data, "--out", student), "already exists")


def test_eval_of_a_student_reports_delta_vs_base(pipeline, capsys, tmp_path):
    _, _, student = pipeline
    out_json = tmp_path / "eval.json"
    code, out, _ = run(capsys, "eval", student, "--target", "owl", "--n-samples", "2", "--seed", "1",
                       "--json", out_json)
    assert code == 0
    rep = json.loads(out_json.read_text())
    res, base, d = rep["result"], rep["base_result"], rep["delta"]
    assert rep["base"] == "organism"
    assert res["context_hash"] == base["context_hash"]  # the same rendered context
    assert res["n_answers"] == base["n_answers"] == 2 * len(res["questions"])
    assert res["config"]["seed"] == 1 and res["context"] == "default"
    assert d["d_logp_first"] == pytest.approx(res["logp_first"] - base["logp_first"])
    assert d["d_rate"] == pytest.approx(res["rate"] - base["rate"])
    assert res["logp_first"] != base["logp_first"]  # the adapter was applied
    for line in (f"p_first {res['p_first']:>9.4f}", f"logp_first{res['logp_first']:>9.4f}", "Δ", "top answers:"):
        assert line.replace(" ", "") in out.replace(" ", "")
    top, n = res["answer_counts"][0]
    assert f"{top} {n}" in out


def test_eval_of_a_plain_model(capsys):
    code, out, _ = run(capsys, "eval", "organism", "--target", "owl", "--n-samples", "1", "--context", "none")
    assert code == 0
    assert "in context none:" in out and "Δ" not in out  # no base given: no delta
    assert "top answers:" in out


def test_eval_refuses_an_adapter_trained_on_another_base(pipeline, capsys, tiny_qwen_dir):
    _, _, student = pipeline
    code, _, err = run(capsys, "eval", student, "--base", tiny_qwen_dir, "--target", "owl", "--n-samples", "1")
    assert_error_last(code, err, "was trained on another base model", "organism")


# ------------------------------------------------------------------------------------------------ signals, flags

REPO = Path(__file__).resolve().parents[1]


def test_sigterm_mid_training_cleans_up_and_says_interrupted(tmp_path, tiny_qwen_dir, write_number_dataset):
    """A scheduler's SIGTERM unwinds like Ctrl-C: the atomic writer removes its temporary directory, and
    `mech: interrupted` is the last stderr line, exit 130."""
    data = write_number_dataset(tmp_path / "data")
    out = tmp_path / "students"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MECH_CACHE=str(tmp_path / "cache"))
    log = (tmp_path / "train.log").open("w")  # a file, not a pipe: a full pipe would stall the process
    proc = subprocess.Popen([sys.executable, "-m", "mech.cli", "train", str(data), "--out", str(out / "s"),
                             "--model", str(tiny_qwen_dir), "--epochs", "500", "--batch-size", "1"],
                            cwd=REPO, env=env, stdout=log, stderr=log)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not list(out.glob(".s.tmp-*")):
            time.sleep(0.02)
        assert proc.poll() is None, "training ended before it was signalled:\n" + (tmp_path / "train.log").read_text()
        time.sleep(0.5)  # well into the training loop
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    text = (tmp_path / "train.log").read_text()
    assert code == 130, text
    assert text.strip().splitlines()[-1] == "mech: interrupted" and "Traceback" not in text
    assert list(out.iterdir()) == []  # neither the student nor its .s.tmp-* directory


def test_trust_remote_code_is_off_unless_the_flag_is_given(monkeypatch, capsys):
    import mech.models

    seen = []

    def fake_load(spec, trust_remote_code=False, **kwargs):
        seen.append(trust_remote_code)
        raise MechError("stop here")

    monkeypatch.setattr(mech.models, "load_model", fake_load)
    for extra in ([], ["--trust-remote-code"]):
        assert main(["eval", "organism", "--target", "owl", *extra]) == 2
    assert seen == [False, True]
    capsys.readouterr()


def test_geometry_takes_model(capsys, tmp_path):
    """``mech geometry --model`` overrides the sweep's base like sweep and localise do; a bad spec is refused before
    anything loads or is written."""
    code, out, err = run(capsys, "geometry", "experiments/quick.yaml", "--students", "lora_r1", "--model", "orgnism",
                         "--out", tmp_path / "g")
    assert_one_line_error(code, out, err, "unknown model spec 'orgnism'")
    assert not (tmp_path / "g").exists()


def test_reproduce_refuses_bad_models_before_any_work(capsys, tmp_path):
    out = tmp_path / "r"
    assert_one_line_error(*run(capsys, "reproduce", "--model", "organism", "organism", "--out", out),
                          "lists a model twice")
    assert_one_line_error(*run(capsys, "reproduce", "--model", "organism", "orgnism", "--out", out),
                          "unknown model spec 'orgnism'")
    assert_one_line_error(*run(capsys, "reproduce", "--sweep", "experiments/quick.yaml", tmp_path / "no.yaml",
                               "--out", out), "not found")
    assert_one_line_error(*run(capsys, "reproduce", "--null-sets", "-1", "--out", out), "--null-sets must be >= 0")
    assert_one_line_error(*run(capsys, "reproduce", "--n-questions", "51", "--out", out),
                          "n_questions must be between 1 and 50", "--n-questions")
    # --scale full loads every experiment it would run (all must parse) before refusing the bad model
    assert_one_line_error(*run(capsys, "reproduce", "--scale", "full", "--model", "orgnism", "--out", out),
                          "unknown model spec 'orgnism'")
    assert not out.exists()


def test_reproduce_scales_name_experiments_that_declare_tests(monkeypatch):
    from mech.cli import SCALES
    from mech.sweep import load_sweep

    assert SCALES["quick"][0] == "experiments/quick.yaml"
    for path in SCALES["full"]:
        assert load_sweep(path).hypotheses, f"{path} declares no test: it adds nothing to the verdicts"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the paper YAMLs ask for CUDA; nothing runs here
    for path in SCALES["paper"]:
        assert load_sweep(path).hypotheses, f"{path} declares no test: it adds nothing to the verdicts"


def test_figures_copies_each_models_main_pngs(capsys, tmp_path):
    report = tmp_path / "report"
    for model in ("organism", "organism-free"):
        (report / model / "figures").mkdir(parents=True)
        (report / model / "localise" / "figures").mkdir(parents=True)
        (report / model / "figures" / "quick_rank.png").write_bytes(model.encode())
        (report / model / "figures" / "quick_rank.html").write_text("x")  # HTML stays behind
        (report / model / "localise" / "figures" / "dwg_lora_r16.png").write_bytes(b"d")
        (report / model / "localise" / "figures" / "atp_mlp_full.png").write_bytes(b"a")  # not a main figure
    out = tmp_path / "figures"
    (out).mkdir()
    (out / "stale.png").write_bytes(b"old")  # replaced whole: a figure the run no longer makes does not linger
    code, stdout, err = run(capsys, "figures", report, "--out", out)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [
        "organism-free_dwg_lora_r16.png", "organism-free_quick_rank.png", "organism_dwg_lora_r16.png",
        "organism_quick_rank.png"]
    assert (out / "organism-free_quick_rank.png").read_bytes() == b"organism-free" and "4 figures" in stdout
    for p in report.rglob("*.png"):
        p.unlink()
    assert_one_line_error(*run(capsys, "figures", report, "--out", out), "no PNG figure", "apt-get install -y chromium")
    assert len(list(out.iterdir())) == 4  # a failed run leaves the folder as it was
    assert_one_line_error(*run(capsys, "figures", tmp_path / "nope", "--out", out), "no model folder")
