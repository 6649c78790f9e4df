"""The `paper` scale (`mech reproduce --scale paper`, experiments/paper/): the paper's sizes as declared, the
tests each YAML states, and the early failures on a machine without the model or without a GPU. No hub, no GPU:
CUDA is faked where a YAML asks for it, and the Hugging Face cache is an empty (or hand-made) tmp dir."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mech.cli import PAPER_STUDENTS, SCALES, main
from mech.errors import MechError
from mech.resources import questions
from mech.sweep import load_sweep
from mech.sweep.config import cells, student_config, teacher_config

QWEN = "Qwen/Qwen2.5-7B-Instruct"
RANKS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cuda(monkeypatch):
    """A GPU node, as far as loading a YAML goes: nothing here reaches a device."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


@pytest.fixture
def hf_cache(monkeypatch, tmp_path):
    """An empty Hugging Face cache (the hub stays offline: tests/conftest.py)."""
    import huggingface_hub.constants

    cache = tmp_path / "hf"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def paper(name: str):
    return load_sweep(ROOT / "experiments" / "paper" / f"{name}.yaml")


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, out: str, err: str, *fragments: str) -> str:
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mech: error: "), err
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------------------ the YAMLs


def test_paper_scale_lists_the_paper_yamls_rank_sweep_first():
    assert SCALES["paper"] == ("experiments/paper/rank_sweep.yaml", "experiments/paper/context_grid.yaml",
                               "experiments/paper/full_ft.yaml")
    assert SCALES["quick"] == ("experiments/quick.yaml",)  # the default scale is untouched


def test_every_paper_yaml_has_the_papers_sizes(cuda):
    names = set()
    for path in SCALES["paper"]:
        cfg = load_sweep(ROOT / path)
        names.add(cfg.name)
        assert cfg.name == "paper_" + Path(path).stem  # runs/<name> never collides with an organism experiment
        assert (cfg.base_model, cfg.device, cfg.dtype, cfg.precision) == (QWEN, "cuda", "bfloat16", "auto")
        assert [t.label for t in cfg.traits] == ["owl", "neutral"]
        assert cfg.teacher_seeds == (0, 1, 2) and cfg.training_seeds == (0,)
        assert (cfg.teacher.n_prompts, cfg.teacher.context, cfg.teacher.constrained) == (30000, "default", False)
        t = cfg.train
        assert (t.max_rows, t.epochs, t.batch_size, t.lr, t.full_lr) == (10000, 3, 66, 2e-4, 2e-5)
        assert t.batch_students == 1
        assert (cfg.eval.target, cfg.eval.n_samples, cfg.eval.first_token_only) == ("owl", 100, False)
    assert len(names) == 3
    assert len(questions("animal")) == 50  # x 100 samples: the paper's evaluation


def test_every_paper_yaml_declares_tests_with_the_claims_they_bear_on(cuda):
    for path in SCALES["paper"]:
        hyps = load_sweep(ROOT / path).hypotheses
        assert hyps, f"{path} declares no test"
        assert all(h.metric == "paired_rate" and h.alpha == 0.05 for h in hyps)
        assert all(h.paper is not None for h in hyps if h.test != "trend")
    text = "".join((ROOT / p).read_text() for p in SCALES["paper"])
    assert text.count("Declared before any run (none has run)") == 3


def test_rank_sweep_runs_ranks_1_to_512_and_tests_the_inverted_u(cuda):
    cfg = paper("rank_sweep")
    assert [(s.method, s.rank, s.alpha) for s in cfg.students] == [("lora", r, None) for r in RANKS]
    arms = [f"lora_r{r}" for r in RANKS]
    tests = {h.name: h for h in cfg.hypotheses}
    assert tests["rank_inverted_u"].test == "inverted_u" and list(tests["rank_inverted_u"].arms) == arms
    assert (tests["rank_inverted_u"].paper, tests["rank_inverted_u"].agrees_if) == ("C1", "supported")
    assert tests["rank_trend"].test == "trend" and list(tests["rank_trend"].arms) == arms
    assert len(cells(cfg)) == len(RANKS) * 2 * 3
    lora8 = student_config(cfg, cfg.students[3], 0, "default")
    assert (lora8.lora.rank, lora8.lora.lora_alpha, lora8.lr, lora8.epochs, lora8.batch_size) == (8, 8.0, 2e-4, 3, 66)


def test_full_ft_runs_full_finetuning_at_2e5_and_both_controls(cuda):
    cfg = paper("full_ft")
    by_name = {c.labels()["student"]: c.student for c in cells(cfg)}
    assert set(by_name) == {"full", "matched_norm_r8_module", "matched_norm_r8_global", "matched_loss_r8", "lora_r8"}
    for name in ("full", "matched_norm_r8_module", "matched_norm_r8_global", "matched_loss_r8"):
        sc = student_config(cfg, by_name[name], 0, "default")
        assert (sc.lr, sc.epochs, sc.batch_size) == (2e-5, 3, 66), name
    assert {h.paper for h in cfg.hypotheses} == {"C2", "R1"}
    assert all(h.margin == 0.05 for h in cfg.hypotheses)


def test_context_grid_crosses_default_and_none(cuda):
    cfg = paper("context_grid")
    assert cfg.train_contexts == ("default", "none") and cfg.eval_contexts == ("default", "none")
    assert {h.paper for h in cfg.hypotheses} == {"C3"}


def test_the_paper_yamls_share_datasets_and_lora_r8_students(cuda):
    """Same teacher and training blocks: the cache computes each dataset and each LoRA r8 student once."""
    cfgs = [load_sweep(ROOT / p) for p in SCALES["paper"]]
    for trait in cfgs[0].traits:
        assert len({json.dumps(teacher_config(c, trait, 1).to_dict(), sort_keys=True) for c in cfgs}) == 1
    lora8 = [next(s for s in c.students if s.method == "lora" and s.rank == 8) for c in cfgs]
    keys = {(json.dumps(student_config(c, s, 0, "default").to_dict(), sort_keys=True), c.train.max_rows)
            for c, s in zip(cfgs, lora8)}
    assert len(keys) == 1


def test_the_localised_students_are_in_the_first_paper_sweep(cuda):
    from mech.sweep.runner import student_cells

    first = load_sweep(ROOT / SCALES["paper"][0])
    assert set(student_cells(first, list(PAPER_STUDENTS))) == set(PAPER_STUDENTS) == {"lora_r8"}


# ------------------------------------------------------------------------------------------ early failures


def test_reproduce_paper_without_the_model_fails_at_once(capsys, tmp_path, cuda, hf_cache):
    """On a GPU node with no network and nothing downloaded: one line naming the model and the download command,
    before any model loads; nothing written (report, sweep cache, HF cache)."""
    out, cache = tmp_path / "r", tmp_path / "cache"
    for model in ((), ("--model", QWEN)):
        line = one_line_error(*run(capsys, "reproduce", "--scale", "paper", *model, "--out", out, "--cache", cache),
                              f"model {QWEN} is not in the local Hugging Face cache", f"hf download {QWEN}",
                              "HF_HUB_OFFLINE=0")
        assert "\n" not in line
    # any other hub id is checked the same way: --model replaces the YAMLs' base_model
    one_line_error(*run(capsys, "reproduce", "--scale", "paper", "--model", "meta-llama/Llama-3.1-8B-Instruct",
                        "--out", out, "--cache", cache), "model meta-llama/Llama-3.1-8B-Instruct is not in the local",
                   "hf download meta-llama/Llama-3.1-8B-Instruct")
    # mech sweep on a paper YAML, no --model: the YAML's own hub id
    one_line_error(*run(capsys, "sweep", ROOT / SCALES["paper"][0], "--out", out, "--cache", cache),
                   f"model {QWEN} is not in the local Hugging Face cache")
    assert not out.exists() and not cache.exists() and not hf_cache.exists()


def test_reproduce_paper_refuses_a_student_its_first_sweep_lacks(capsys, tmp_path, cuda, hf_cache):
    one_line_error(*run(capsys, "reproduce", "--scale", "paper", "--students", "full", "--out", tmp_path / "r"),
                   "no student named full in experiments/paper/rank_sweep.yaml", "lora_r8")
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_reproduce_paper_without_a_gpu_fails_at_once(capsys, tmp_path):
    one_line_error(*run(capsys, "reproduce", "--scale", "paper", "--out", tmp_path / "r", "--cache", tmp_path / "c"),
                   "device 'cuda' asked for but CUDA is not available", "set device: auto")
    assert not (tmp_path / "r").exists() and not (tmp_path / "c").exists()


def test_default_models_and_students_are_unchanged_for_other_scales(capsys, tmp_path):
    """Without --model, quick and full still mean both organisms: a bad --students is refused naming quick.yaml's
    students (lora_r16 and full exist there), before anything loads."""
    one_line_error(*run(capsys, "reproduce", "--students", "lora_r8", "--out", tmp_path / "r"),
                   "no student named lora_r8 in experiments/quick.yaml")
    from mech.cli import DEFAULT_MODELS, DEFAULT_STUDENTS

    assert DEFAULT_MODELS == ("organism", "organism-free") and DEFAULT_STUDENTS == ("lora_r16", "full")


# ------------------------------------------------------------------------------------ the HF cache check


def _snapshot(cache: Path, repo: str, files: dict[str, str]) -> Path:
    root = cache / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, text in files.items():
        (snap / name).write_text(text)
    return snap


def test_hub_cache_check_wants_every_shard(hf_cache):
    from mech.models import check_hub_cached

    index = json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                       "b": "model-00002-of-00002.safetensors"}})
    snap = _snapshot(hf_cache, QWEN, {"config.json": "{}", "tokenizer.json": "{}",
                                      "model.safetensors.index.json": index,
                                      "model-00001-of-00002.safetensors": ""})
    with pytest.raises(MechError, match=r"only partly .* missing model-00002-of-00002.safetensors\).*hf download"):
        check_hub_cached(QWEN)
    (snap / "model-00002-of-00002.safetensors").write_text("")
    check_hub_cached(QWEN)  # complete: passes, loads nothing


def test_hub_cache_check_leaves_other_specs_and_an_online_hub_alone(hf_cache, monkeypatch):
    import huggingface_hub.constants

    from mech.models import check_hub_cached, hub_offline

    check_hub_cached("organism")
    assert hub_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    assert not hub_offline()
    check_hub_cached(QWEN)  # online, from_pretrained downloads it: nothing to check
    assert not hf_cache.exists()


def test_the_paper_batch_of_66_is_six_micro_batches_of_11(cuda):
    """Gradient accumulation keeps the paper's 66 rows a step in a fraction of the memory: one optimizer step,
    six forwards; the same in every paper YAML, so they still share students."""
    for path in SCALES["paper"]:
        t = load_sweep(ROOT / path).train
        assert (t.batch_size, t.micro_batch_size, t.gradient_checkpointing) == (66, 11, False)
        sc = student_config(load_sweep(ROOT / path), load_sweep(ROOT / path).students[0], 0, "default")
        assert sc.micro_batch_size == 11 and sc.to_dict()["micro_batch_size"] == 11
