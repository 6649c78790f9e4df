"""Real models end to end: --model everywhere, device / dtype / precision in a sweep, float32 master weights for
full finetuning over a bf16 base (tiny models, CPU)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from mech.errors import MechError
from mech.models.loader import LoadedModel, model_fingerprint
from mech.students.config import LoraSpec, StudentConfig
from mech.students.store import update_norms
from mech.students.train import train_model
from mech.sweep import SweepRunner, cells, load_sweep
from mech.sweep.config import stage_key, student_config, teacher_config

from test_sweep import write_cfg

torch.set_num_threads(1)


def chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}],
            "prompt_seed": 0, "index": 0}


ROWS = [chat(f"Continue the sequence: {i}, {i + 7}, {i + 14}.", f"{i + 21}, {i + 28}, {i + 35}") for i in range(8)]


@pytest.fixture(scope="module")
def bases(make_tiny_lm):
    """The same weights three ways: bf16, and float32 holding exactly the bf16 values."""
    bf16 = make_tiny_lm("qwen2", seed=0).to(torch.bfloat16)
    return bf16, copy.deepcopy(bf16).float()


def _full(lr: float, **kw) -> StudentConfig:
    return StudentConfig(method="full", epochs=1, batch_size=4, lr=lr, warmup_steps=0, **kw)


def test_full_ft_on_bf16_base_keeps_float32_master_weights(bases, organism_tokenizer):
    bf16, fp32 = bases
    # lr 1e-5: each Adam step moves a weight by about 1e-5, below bf16's spacing (~1e-4 at the weights' scale)
    ref = train_model(fp32, organism_tokenizer, ROWS, _full(1e-5))
    auto = train_model(bf16, organism_tokenizer, ROWS, _full(1e-5))
    native = train_model(bf16, organism_tokenizer, ROWS, _full(1e-5, precision="native"))
    assert {p.dtype for p in auto.model.parameters()} == {torch.float32}
    assert {p.dtype for p in native.model.parameters()} == {torch.bfloat16}
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())  # the base is untouched
    n_ref, n_auto, n_native = (update_norms(b, t.model)["global"] for b, t in
                               ((fp32, ref), (bf16, auto), (bf16, native)))
    # master weights keep the update (bf16 autocast changes the gradients slightly, not Adam's step size) ...
    assert abs(n_auto - n_ref) / n_ref < 0.01  # measured 4e-5
    # ... a bf16 optimizer step rounds most of it away
    assert n_native < 0.5 * n_ref  # measured 0.43


def test_lora_runs_on_a_bf16_base(bases, organism_tokenizer):
    bf16, _ = bases
    cfg = StudentConfig(method="lora", epochs=1, batch_size=4, lr=1e-2, warmup_steps=0, lora=LoraSpec(rank=2))
    trained = train_model(bf16, organism_tokenizer, ROWS, cfg)
    lora = {n: p for n, p in trained.model.named_parameters() if "lora_" in n}
    frozen = {p.dtype for n, p in trained.model.named_parameters() if "lora_" not in n}
    assert lora and all(p.dtype == torch.float32 for p in lora.values()) and frozen == {torch.bfloat16}
    assert update_norms(bf16, trained.model)["global"] > 0


def test_precision_keys_leave_existing_students_alone(tmp_path):
    cfg = load_sweep(write_cfg(tmp_path / "s.yaml"))
    s = cfg.students[0]
    sc = student_config(cfg, s, 0, "default")
    assert "precision" not in sc.to_dict()
    # the fields StudentConfig gained after students were cached: absent from every other method's key
    added = ("precision", "matched_loss_reference", "matched_loss_window", "micro_batch_size", "gradient_checkpointing")
    legacy = {k: v for k, v in dataclasses.asdict(sc).items() if k not in added}
    assert stage_key("student", "d", sc.to_dict(), None) == stage_key("student", "d", legacy, None)
    native = load_sweep(write_cfg(tmp_path / "n.yaml", precision="native"))
    assert student_config(native, s, 0, "default").to_dict()["precision"] == "native"


@pytest.mark.parametrize("changes, fault", [
    ({"dtype": "float8"}, "unknown dtype 'float8'"),
    ({"device": "tpu"}, "unknown device 'tpu'"),
    ({"precision": "mixed"}, "precision"),
])
def test_bad_placement_is_one_line(tmp_path, changes, fault):
    with pytest.raises(MechError, match=fault):
        load_sweep(write_cfg(tmp_path / "s.yaml", **changes))


def test_dtype_is_part_of_every_key(bases, organism_tokenizer, tmp_path):
    bf16, fp32 = bases
    cfg = load_sweep(write_cfg(tmp_path / "s.yaml"))
    run32 = SweepRunner(cfg, tmp_path / "c", base=LoadedModel(fp32, organism_tokenizer, "tiny", None))
    run16 = SweepRunner(cfg, tmp_path / "c", base=LoadedModel(bf16, organism_tokenizer, "tiny", None))
    trait, cell = cfg.traits[0], cells(cfg)[0]
    # CPU float32, where every existing cache was made, keeps the plain fingerprint and so its old keys
    assert run32.dataset_key(trait, 0) == stage_key("dataset", model_fingerprint(fp32),
                                                    teacher_config(cfg, trait, 0).to_dict())
    assert model_fingerprint(fp32) == model_fingerprint(bf16)  # the fingerprint alone cannot tell them apart
    assert run16.fingerprint.endswith("-cpu-bfloat16")
    assert run16.dataset_key(trait, 0) != run32.dataset_key(trait, 0)
    assert run16.student_key(cell) != run32.student_key(cell)
    assert run16._eval_path(f"base-{run16.fingerprint}", "default") != run32._eval_path(
        f"base-{run32.fingerprint}", "default")


def test_model_flag_overrides_the_yaml(tmp_path, capsys, tiny_llama_dir):
    from mech.cli import _with_model, main, parser

    cfg = load_sweep(write_cfg(tmp_path / "s.yaml"))
    assert _with_model(cfg, None) is cfg
    assert _with_model(cfg, str(tiny_llama_dir)).base_model == str(tiny_llama_dir)
    for command in (["sweep", "x.yaml"], ["localise", "x.yaml"], ["geometry", "x.yaml", "--students", "full"]):
        assert parser().parse_args(command + ["--model", "smollm2-135m"]).model == "smollm2-135m"
    assert parser().parse_args(["reproduce", "--model", "smollm2-135m"]).model == ["smollm2-135m"]  # one or more
    assert parser().parse_args(["reproduce"]).model is None  # cmd_reproduce: both organisms (DEFAULT_MODELS)
    for command in ("sweep", "localise"):
        code = main([command, str(tmp_path / "s.yaml"), "--model", str(tmp_path / "no" / "such"), "--out",
                     str(tmp_path / "out"), "--cache", str(tmp_path / "cache")])
        _, err = capsys.readouterr()
        assert code == 2 and err.strip().splitlines()[-1].startswith("mech: error: model directory")
        assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


def test_reproduce_skips_the_organism_check_for_other_models(tiny_qwen_dir, tmp_path, monkeypatch):
    """mech reproduce on a model that is not an organism build: no check, a report without check.json (the
    sweep and the battery stubbed out; they are the sweep's and the battery's own tests)."""
    from types import SimpleNamespace

    import mech.interventions.battery as battery
    import mech.organism.check as check
    import mech.report.reproduce as rr
    import mech.sweep as sweep
    from mech.reproduce import run_reproduce

    def no_check(*a, **k):
        raise AssertionError("the organism check ran on a model that is not an organism")

    monkeypatch.setattr(check, "run_check", no_check)
    monkeypatch.setattr(sweep, "SweepRunner", lambda cfg, cache, stage, base: SimpleNamespace(cfg=cfg, base=base))
    monkeypatch.setattr(sweep, "run_shard", lambda runner: {"cells": 0, "computed": {}})
    monkeypatch.setattr(sweep, "select_students", lambda *a: {})
    monkeypatch.setattr(sweep.runner, "select_controls", lambda *a: {})
    from mech.analysis.hypotheses import RESULT_COLUMNS

    planted = dict.fromkeys(RESULT_COLUMNS, float("nan")) | {
        "name": "t", "claim": "full FT transfers", "test": "difference", "arms": "full", "units": "teacher_seed",
        "verdict": "supported", "paper": "C2", "agrees_if": "not supported", "estimate": 0.3, "lo": 0.2, "hi": 0.4,
        "detail": "planted"}
    monkeypatch.setattr(sweep, "finished_tables", lambda runner: {"rows": [], "summary": [], "done_cells": 0,
                                                                 "tests": [planted]})
    seen = []
    monkeypatch.setattr(battery, "compute_localise",
                        lambda *a: seen.append(a[3]) or SimpleNamespace(summary=None, cfg=None))
    more = write_cfg(tmp_path / "more.yaml", name="more")
    rep = run_reproduce(str(tiny_qwen_dir), write_cfg(tmp_path / "s.yaml"), ["lora_r1"], more_sweeps=[more],
                        n_questions=7)
    assert rep.check is None and rep.sweep_cfg.base_model == str(tiny_qwen_dir)
    assert [c.n_questions for c in seen] == [7]  # --n-questions reaches the battery
    # every sweep runs on the reproduced model; each one's declared tests reach the verdicts, labelled by experiment
    assert [cfg.base_model for cfg, _ in rep.more_sweeps] == [str(tiny_qwen_dir)]
    assert [t["experiment"] for t in rep.tests()] == [rep.sweep_cfg.name, "more"]
    assert [e["reading"] for e in rep.evidence()["C2"]] == ["disagrees", "disagrees"]
    for name in ("summary_markdown", "localise_markdown"):
        monkeypatch.setattr(rr, name, lambda *a, **k: "# stub\n")
    monkeypatch.setattr(rr, "write_tables", lambda *a, **k: None)
    monkeypatch.setattr(rr, "write_localise", lambda *a, **k: {"figures": []})
    md = rr.write_reproduce(rep, tmp_path / "report")
    folder = tmp_path / "report" / rr.model_slugs([rep.model])[0]
    assert "Not an organism build" in md and folder.is_dir() and not (folder / "check.json").exists()
    assert not any((folder / "figures").glob("organism_*"))
    assert "model (evidence about the paper)" in md
    assert "| C2: full finetuning does not transfer the trait | **disagrees** (2) |" in md
