"""The bad-input corpus: every way a user can get an input wrong answers with one line that names the fault and
the fix, exits 2 and leaves nothing on disk.

Each CLI case runs ``mech.cli.main`` in a fresh folder (the working directory, ``$MECH_CACHE``, ``--cache`` and
``--out`` all inside it) and asserts: exit code 2; exactly one ``mech: error:`` line, the last stderr line (after
any progress bar), holding every expected fragment; no traceback; and the folder exactly as the case left it
(no cache entry, no output folder, no temporary sibling). Cases marked ``loads`` are the only ones allowed to
load a model; every other case must fail before any model is loaded (loading one fails the test).

Masks, positions and contexts have no command of their own (a context reaches the CLI only as ``--context``),
so their cases call the Python API and assert a one-line MechError naming the fault, with nothing written.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml

from mech.cli import main
from mech.errors import MechError
from mech.teacher.dataset import ROWS_FILE

SWEEP = {
    "name": "bad",
    "traits": [{"target": "owl"}, {"target": None}],
    "students": [{"method": "lora", "rank": 1}],
    "training_seeds": [0],
    "teacher": {"n_prompts": 8},
    "train": {"epochs": 1},
    "eval": {"n_samples": 1},
}


@dataclass(frozen=True)
class Case:
    """``setup(root, inputs)`` prepares files under ``root`` and returns the argv; the error line must hold
    every fragment of ``expect``. ``loads``: the case may load a model before it fails."""

    setup: Callable[[Path, "Inputs"], list]
    expect: tuple[str, ...]
    loads: bool = False


@dataclass(frozen=True)
class Inputs:
    """Inputs shared by the cases, built once: a valid dataset dir and a tiny model dir."""

    dataset: Path
    tiny: Path


def sweep_yaml(root: Path, text: str | bytes | None = None, **changes) -> Path:
    """SWEEP with top-level ``changes`` as YAML, or the raw ``text``, written to ``root/sweep.yaml``."""
    path = root / "sweep.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text if text is not None else yaml.safe_dump({**SWEEP, **changes}, sort_keys=False))
    return path


def sweep(**changes) -> Callable[[Path, Inputs], list]:
    return lambda root, _: ["sweep", sweep_yaml(root, **changes), "--cache", root / "cache", "--out", root / "out"]


def sweep_text(text: str | bytes) -> Callable[[Path, Inputs], list]:
    return lambda root, _: ["sweep", sweep_yaml(root, text), "--cache", root / "cache", "--out", root / "out"]


def localise(*argv, **changes) -> Callable[[Path, Inputs], list]:
    return lambda root, _: ["localise", sweep_yaml(root, **changes), "--students", "lora_r1", "--cache",
                            root / "cache", "--out", root / "out", *argv]


def a_file(root: Path, name: str = "taken") -> Path:
    (root / name).write_text("not a directory\n")
    return root / name


def a_dir(root: Path, name: str = "empty") -> Path:
    (root / name).mkdir()
    return root / name


def train(*argv) -> Callable[[Path, Inputs], list]:
    return lambda root, inp: ["train", inp.dataset, "--out", root / "student", *argv]


def model_dir(root: Path, tiny: Path, keep: tuple[str, ...], config: dict | None = None) -> Path:
    """A copy of the tiny model dir with only the files ``keep``, and ``config`` merged into its config.json."""
    d = root / "model"
    d.mkdir()
    for name in keep:
        (d / name).write_bytes((tiny / name).read_bytes())
    cfg = json.loads((tiny / "config.json").read_text()) | (config or {})
    (d / "config.json").write_text(json.dumps(cfg))
    return d


TOKENIZER = ("tokenizer.json", "tokenizer_config.json")


def pickled_model(root: Path, inp: Inputs) -> list:
    # a pickle beside an unrelated .safetensors file: once, enough for the pickle to be loaded
    d = model_dir(root, inp.tiny, TOKENIZER)
    (d / "pytorch_model.bin").write_bytes(b"\0")
    (d / "extra.safetensors").write_bytes((inp.tiny / "model.safetensors").read_bytes())
    return ["eval", d, "--target", "owl"]


def remote_code_model(root: Path, inp: Inputs) -> list:
    d = model_dir(root, inp.tiny, ("model.safetensors", *TOKENIZER),
                  {"model_type": "mech_custom", "auto_map": {"AutoConfig": "custom.Config",
                                                             "AutoModelForCausalLM": "custom.Model"}})
    # were it run, the code would leave a file behind (and the test's tree check would see it)
    (d / "custom.py").write_text("import pathlib\npathlib.Path(__file__).with_suffix('.ran').write_text('ran')\n")
    return ["eval", d, "--target", "owl"]


def pickled_adapter(root: Path, _: Inputs) -> list:
    d = root / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1, "target_modules": ["q_proj"]}))
    (d / "adapter_model.bin").write_bytes(b"\0")
    return ["eval", d, "--target", "owl"]


def corrupt_rows(root: Path, inp: Inputs) -> list:
    d = root / "data"
    d.mkdir()
    for p in inp.dataset.iterdir():
        (d / p.name).write_bytes(p.read_bytes())
    (d / ROWS_FILE).write_text('{"messages": [\n')
    return ["train", d, "--out", root / "student"]


def unwritable_out(root: Path, _: Inputs) -> list:
    locked = root / "locked"
    locked.mkdir()
    return ["sweep", sweep_yaml(root), "--cache", root / "cache", "--out", locked / "out"]


CASES: dict[str, Case] = {
    # ---- sweep YAML: types (coercion is strict: bool is not an int, float is not an int, str is not a number)
    "yaml-rank-word": Case(sweep(students=[{"rank": "eight"}]), ("sweep.students[0].rank", "expected an integer",
                                                                  "'eight'")),
    "yaml-rank-float": Case(sweep(students=[{"rank": 4.0}]), ("sweep.students[0].rank", "expected an integer", "4.0")),
    "yaml-rank-bool": Case(sweep(students=[{"rank": True}]), ("sweep.students[0].rank", "True")),
    "yaml-contexts-int": Case(sweep(train_contexts=1), ("sweep.train_contexts", "expected a list")),
    "yaml-contexts-null": Case(sweep(eval_contexts=None), ("sweep.eval_contexts", "expected a list")),
    "yaml-context-item-int": Case(sweep(train_contexts=[1]), ("sweep.train_contexts[0]", "expected a string")),
    "yaml-seed-word": Case(sweep(teacher_seeds=["zero"]), ("sweep.teacher_seeds[0]", "expected an integer")),
    "yaml-seed-half": Case(sweep(teacher_seeds=[0.5]), ("sweep.teacher_seeds[0]", "expected an integer", "0.5")),
    "yaml-lr-string": Case(sweep(train={"lr": "0.1"}), ("sweep.train.lr", "expected a number", "'0.1'")),
    "yaml-trait-null": Case(sweep(traits=[None]), ("sweep.traits[0]", "got null")),
    "yaml-typo-key": Case(sweep(students=[{"rnak": 4}]), ("unknown key sweep.students[0].rnak", "did you mean 'rank'")),
    # ---- sweep YAML: the decisive-science design (data seeds, controls, declared tests)
    "yaml-data-and-teacher-seeds": Case(sweep(data_seeds=[0], teacher_seeds=[0]),
                                        ("both data_seeds and teacher_seeds",)),
    "yaml-control-typo": Case(sweep(traits=[{"target": "owl", "control": "shufled_within"}, {"target": None}]),
                              ("unknown control 'shufled_within'",)),
    "yaml-hypothesis-typo": Case(sweep(hypotheses=[{"name": "h", "claim": "c", "tset": "trend"}]),
                                 ("unknown key", "tset", "did you mean 'test'")),
    "yaml-hypothesis-arm": Case(sweep(hypotheses=[{"name": "h", "claim": "c", "test": "difference",
                                                  "arms": ["lora_r1", "full"]}]), ("arm 'full' is no student",)),
    # ---- sweep YAML: duplicates
    "yaml-seed-twice": Case(sweep(training_seeds=[0, 0]), ("sweep.training_seeds[1] repeats training_seeds[0]",)),
    "yaml-trait-twice": Case(sweep(traits=[{"target": "owl"}, {"target": None}, {"target": "owl"}]),
                             ("sweep.traits[2] repeats traits[0]", "owl")),
    "yaml-student-twice": Case(sweep(students=[{"rank": 2}, {"rank": 2}]), ("sweep.students[1] repeats", "lora_r2")),
    "yaml-context-twice": Case(sweep(eval_contexts=["none", "default", "none"]), ("sweep.eval_contexts[2] repeats",)),
    "yaml-duplicate-key": Case(sweep_text("name: a\ntraining_seeds: [0]\nname: b\n"),
                               ("key 'name' is given twice", "line 3")),
    # ---- sweep YAML: the file itself
    "yaml-empty": Case(sweep_text(""), ("is empty",)),
    "yaml-comments-only": Case(sweep_text("# nothing yet\n"), ("is empty",)),
    "yaml-not-utf8": Case(sweep_text(b"name: caf\xe9\n"), ("is not UTF-8",)),
    "yaml-syntax": Case(sweep_text("traits: [\n"), ("is not valid YAML",)),
    "yaml-a-list": Case(sweep_text("- 1\n- 2\n"), ("must be a mapping",)),
    "yaml-is-a-directory": Case(lambda root, _: ["sweep", root, "--cache", root / "cache"], ("is a directory",)),
    "yaml-missing": Case(lambda root, _: ["sweep", root / "nope.yaml"], ("not found",)),
    # ---- sweep YAML: absurd sizes and names
    "yaml-rank-huge": Case(sweep(students=[{"rank": 5000}]), ("sweep.students[0].rank", "<= 4096", "5000")),
    "yaml-prompts-huge": Case(sweep(teacher={"n_prompts": 10**8}), ("n_prompts", "at most 10,000,000")),
    "yaml-max-rows-zero": Case(sweep(train={"max_rows": 0}), ("sweep.train.max_rows must be >= 1",)),
    "yaml-micro-batch-too-big": Case(sweep(train={"batch_size": 4, "micro_batch_size": 8}),
                                     ("sweep.train.micro_batch_size must be between 1 and train.batch_size (4)",
                                      "got 8")),
    "yaml-micro-batch-zero": Case(sweep(train={"micro_batch_size": 0}), ("micro_batch_size must be between 1",)),
    "yaml-checkpointing-not-bool": Case(sweep(train={"gradient_checkpointing": "yes"}),
                                        ("gradient_checkpointing", "true or false")),
    "yaml-lr-inf": Case(sweep_text("name: x\ntrain: {lr: .inf}\n"), ("invalid lr inf",)),
    "yaml-name-escapes": Case(sweep(name="../escaped"), ("sweep.name '../escaped' is not a plain file name",)),
    "yaml-name-path": Case(sweep(name="a/b"), ("is not a plain file name",)),
    "yaml-name-dots": Case(sweep(name=".."), ("is not a plain file name",)),
    "yaml-unknown-method": Case(sweep(students=[{"method": "lorra"}]), ("unknown training method 'lorra'",)),
    # ---- CLI flags: output paths, checked before any work
    "sweep-out-file": Case(lambda root, _: ["sweep", sweep_yaml(root), "--cache", root / "c", "--out", a_file(root)],
                           ("--out", "is a file")),
    "sweep-out-under-file": Case(lambda root, _: ["sweep", sweep_yaml(root), "--cache", root / "c", "--out",
                                                  a_file(root) / "sub"], ("which is a file",)),
    "sweep-out-unwritable": Case(unwritable_out, ("is not writable",)),
    "sweep-bad-shard": Case(lambda root, _: ["sweep", sweep_yaml(root), "--shard", "2/2", "--cache", root / "c"],
                            ("bad --shard '2/2'",)),
    "train-out-file": Case(lambda root, inp: ["train", inp.dataset, "--out", a_file(root)], ("--out", "is a file")),
    "train-out-exists": Case(lambda root, inp: ["train", inp.dataset, "--out", root], ("already exists",)),
    "teacher-out-file": Case(lambda root, _: ["teacher", "--neutral", "--out", a_file(root)], ("is a file",)),
    "teacher-prompts-huge": Case(lambda root, _: ["teacher", "--neutral", "--n-prompts", "100000000", "--out",
                                                  root / "d"], ("n_prompts must be at most",)),
    "eval-json-dir": Case(lambda root, _: ["eval", "organism", "--target", "owl", "--json", root],
                          ("--json", "is a directory")),
    "train-lr-inf": Case(train("--lr", "inf"), ("invalid lr inf",)),
    "train-lr-nan": Case(train("--lr", "nan"), ("invalid lr nan",)),
    "train-rank-huge": Case(train("--rank", "5000"), ("LoRA rank must be <= 4096",)),
    "train-micro-batch-too-big": Case(train("--batch-size", "4", "--micro-batch-size", "5"),
                                      ("invalid micro_batch_size 5", "between 1 and batch_size (4)")),
    "train-diverges": Case(lambda root, inp: ["train", inp.dataset, "--out", root / "student", "--model", inp.tiny,
                                              "--lr", "1e6", "--epochs", "3"],
                           ("training diverged at lr 1e+06", "lower the lr"), loads=True),
    "localise-questions-zero": Case(localise("--n-questions", "0"), ("n_questions must be between 1 and", "got 0")),
    "localise-questions-negative": Case(localise("--n-questions", "-1"), ("got -1",)),
    "localise-questions-too-many": Case(localise("--n-questions", "100000"), ("got 100000", "animal questions")),
    "localise-target-not-a-trait": Case(localise(eval={"target": "cat"}), ("no trait with target 'cat'",)),
    "localise-unknown-student": Case(lambda root, _: ["localise", sweep_yaml(root), "--students", "lora_r4",
                                                      "--cache", root / "c", "--out", root / "o"],
                                     ("no student named lora_r4", "choose from lora_r1")),
    "localise-out-file": Case(lambda root, _: ["localise", sweep_yaml(root), "--students", "lora_r1", "--cache",
                                               root / "c", "--out", a_file(root)], ("--out", "is a file")),
    # ---- model specs
    "spec-typo": Case(lambda root, _: ["eval", "orgnism", "--target", "owl"], ("unknown model spec 'orgnism'",)),
    "spec-missing-dir": Case(lambda root, _: ["eval", root / "nope" / "model", "--target", "owl"],
                             ("does not exist",)),
    "spec-pickle-beside-safetensors": Case(pickled_model, ("has no model.safetensors", "pytorch_model.bin",
                                                           "never loaded")),
    "spec-remote-code": Case(remote_code_model, ("--trust-remote-code",), loads=True),
    # ---- adapters
    "adapter-pickled": Case(pickled_adapter, ("adapter_model.bin", "only safetensors adapters"), loads=True),
    # ---- datasets
    "dataset-is-a-file": Case(lambda root, _: ["train", a_file(root, "rows.jsonl"), "--out", root / "s"],
                              ("is a file, not a dataset directory",)),
    "dataset-missing": Case(lambda root, _: ["train", root / "nope", "--out", root / "s"], ("does not exist",)),
    "dataset-incomplete": Case(lambda root, _: ["train", a_dir(root), "--out", root / "s"],
                               ("not a complete dataset directory",)),
    "dataset-corrupt-rows": Case(corrupt_rows, ("line 1 is not JSON",)),
    # ---- contexts through the CLI
    "context-typo": Case(lambda root, _: ["eval", "organism", "--target", "owl", "--context", "defualt"],
                         ("unknown context 'defualt'", "did you mean 'default'")),
    "context-empty-custom": Case(train("--context", "custom:"), ("custom context needs non-empty text",)),
    "context-yaml-typo": Case(sweep(train_contexts=["sytem"]), ("unknown context 'sytem'",)),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_qwen_dir, write_number_dataset) -> Inputs:
    return Inputs(dataset=write_number_dataset(tmp_path_factory.mktemp("bad_inputs") / "data"), tiny=tiny_qwen_dir)


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_and_writes_nothing(name, inputs, tmp_path, monkeypatch, capsys):
    case = CASES[name]
    monkeypatch.chdir(tmp_path)  # `runs/<name>` and any relative path land in the case's own folder
    monkeypatch.setenv("MECH_CACHE", str(tmp_path / "mech_cache"))
    if not case.loads:
        import mech.models.loader as loader

        def no_load(*args, **kwargs):
            raise AssertionError(f"case {name} loaded a model before failing: validate first")

        monkeypatch.setattr(loader, "_from_pretrained", no_load)
    if name == "sweep-out-unwritable":
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: Path(p).name != "locked" and real_access(p, mode))
    argv = [str(a) for a in case.setup(tmp_path, inputs)]
    before = tree(tmp_path)
    code = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    errors = [line for line in lines if "mech: error:" in line]
    assert code == 2, err
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert "Traceback" not in err and out == ""
    for fragment in case.expect:
        assert fragment in errors[0], errors[0]
    assert tree(tmp_path) == before  # no cache entry, no output folder, no temporary sibling


# ------------------------------------------------------------------------------------------------ the Python API


def _rendered(policy: str):
    from mech.context import Context, render
    from mech.models import load_tokenizer
    from mech.organism import shipped_dir

    return render(load_tokenizer(str(shipped_dir())), Context.parse(policy), "What is your favourite animal?")


def _mask(**kwargs):
    from mech.interventions.mask import Mask

    return lambda: Mask(**kwargs)


def _positions(spec, policy: str | int = "none", **kwargs):
    from mech.interventions.positions import resolve_positions

    return lambda: resolve_positions(spec, policy if isinstance(policy, int) else _rendered(policy), **kwargs)


def _context(spec):
    from mech.context import Context

    return lambda: Context.parse(spec)


API_CASES: dict[str, tuple[Callable[[], object], tuple[str, ...]]] = {
    "mask-position-typo": (_mask(positions="shraed"), ("unknown position spec 'shraed'", "did you mean 'shared'")),
    "mask-position-bool": (_mask(positions=True), ("invalid position spec True",)),
    "mask-position-floats": (_mask(positions=(1.5, 2)), ("invalid position list",)),
    "mask-mode-typo": (_mask(positions="all", mode="suficiency"), ("unknown mask mode 'suficiency'",)),
    "mask-component-unknown": (_mask(positions="all", components="xyz"), ("xyz",)),
    "mask-empty-substring": (_mask(positions="substring:"), ("empty substring",)),
    "positions-out-of-range": (_positions(7, 3), ("position 7 is outside the prompt", "3 tokens")),
    "positions-need-rendering": (_positions("user", 5), ("needs the rendered prompt",)),
    "positions-shared-without-training": (_positions("shared"), ("needs the training context's rendering",)),
    "positions-substring-absent": (_positions("substring:zebra crossing"), ("not found in the rendered prompt",)),
    "positions-segment-absent": (_positions("default_system", "none"), ("'default_system' is absent",)),
    "context-policy-typo": (_context("defualt"), ("unknown context 'defualt'", "did you mean 'default'")),
    "context-raw-text": (_context("You love owls."), ("needs the custom: prefix",)),
    "context-empty-custom": (_context("custom:"), ("custom context needs non-empty text",)),
}


@pytest.mark.parametrize("name", list(API_CASES))
def test_bad_api_input_is_one_line_mech_error(name, tmp_path, monkeypatch):
    call, expect = API_CASES[name]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MechError) as e:
        call()
    msg = str(e.value)
    assert "\n" not in msg
    for fragment in expect:
        assert fragment in msg, msg
    assert list(tmp_path.iterdir()) == []
