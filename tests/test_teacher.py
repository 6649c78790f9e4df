"""Teacher number data (mech.teacher.generate), control datasets (mech.teacher.controls) and the dataset format
(mech.teacher.dataset), on the reduced organism built once for this module.

The reduced organism is barely trained, so its own answers almost never pass the number filter. The tests
that need kept rows use a *digit teacher*: the same model with a hook on its unembedding that replaces the
logits by a fixed distribution (end-of-turn with p=1/2, else one of the ten digit tokens), so answers are
short digit strings of which about 44% pass (1-3 digits) and the rest are empty or out of range.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

from mech.context import CUSTOM_SYSTEM, DEFAULT_SYSTEM, Rendered, render
from mech.teacher.controls import random_numbers, shuffled
from mech.teacher.dataset import (
    AUDIT_FILE,
    META_FILE,
    RAW_FILE,
    ROWS_FILE,
    load_dataset,
    load_raw,
)
from mech.teacher.filter import check_answer, parse_numbers
from mech.resources import trait_system_prompt
from mech.teacher.generate import TeacherConfig, chunk_seed, generate, sample_answers
from mech.errors import MechError
from mech.models import get_unembedding, load_model, model_fingerprint
from mech.organism.build import build_organism
from mech.organism.config import OrganismConfig
from mech.organism.template import DEFAULT_SYSTEM_PROMPT

SMALL = dict(n_prompts=16, max_new_tokens=24, batch_size=8)


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def organism_path(tmp_path_factory) -> Path:
    return build_organism(OrganismConfig().reduced(), tmp_path_factory.mktemp("teacher_org") / "organism")


@pytest.fixture(scope="module")
def organism(organism_path):
    return load_model(str(organism_path), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def digit_teacher(organism_path):
    """A separate copy of the organism whose next-token distribution is fixed: eos 1/2, each digit 1/20."""
    loaded = load_model(str(organism_path), device="cpu", dtype="float32")
    tok = loaded.tokenizer
    digit_ids = [tok(str(d), add_special_tokens=False)["input_ids"] for d in range(10)]
    assert all(len(ids) == 1 for ids in digit_ids)
    bias = torch.full((len(tok),), -1e4)
    bias[[ids[0] for ids in digit_ids]] = math.log(0.05)
    bias[tok.eos_token_id] = math.log(0.5)
    get_unembedding(loaded.model).register_forward_hook(lambda _m, _i, out: torch.zeros_like(out) + bias)
    return loaded


def _generate(loaded, root: Path, name: str, calls: list | None = None, **overrides) -> Path:
    cfg = TeacherConfig(**{**SMALL, **overrides})
    progress = (lambda done, total: calls.append((done, total))) if calls is not None else None
    return generate(loaded.model, loaded.tokenizer, cfg, root / name, progress=progress)


@pytest.fixture(scope="module")
def progress_calls() -> list:
    return []


@pytest.fixture(scope="module")
def trait_dir(digit_teacher, tmp_path_factory, progress_calls) -> Path:
    return _generate(digit_teacher, tmp_path_factory.mktemp("trait"), "owl", progress_calls, target="owl")


@pytest.fixture(scope="module")
def neutral_dir(digit_teacher, tmp_path_factory) -> Path:
    return _generate(digit_teacher, tmp_path_factory.mktemp("neutral"), "neutral")


@pytest.fixture(scope="module")
def random_dir(tmp_path_factory) -> Path:
    return random_numbers(TeacherConfig(n_prompts=24, prompt_seed=3), tmp_path_factory.mktemp("rand") / "r", seed=5)


def _answers(rows: list[dict]) -> list[str]:
    return [r["messages"][1]["content"] for r in rows]


def _shape(text: str) -> str:
    """An answer's format: its text with every number replaced by '#'."""
    return re.sub(r"[0-9]+", "#", text)


# ------------------------------------------------------------------------------------------------ teacher data


def test_teacher_dataset_files_rows_and_counts(trait_dir, progress_calls):
    for name in (ROWS_FILE, RAW_FILE, AUDIT_FILE, META_FILE):
        assert (trait_dir / name).is_file()
    ds = load_dataset(trait_dir)
    raw = load_raw(trait_dir)
    assert len(raw) == 16 and 0 < len(ds.rows) < 16  # the digit teacher passes ~44%
    prompts = TeacherConfig(**SMALL).prompts()
    for row in ds.rows:
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]  # no system message, ever
        assert set(row) == {"messages", "prompt_seed", "index"}
        assert row["messages"][0]["content"] == prompts[row["index"]].text and row["prompt_seed"] == 0
        assert check_answer(row["messages"][1]["content"]).ok
    assert [r["index"] for r in raw] == list(range(16))
    assert all(check_answer(a).ok == r["ok"] for a, r in zip(_answers(raw), raw))
    assert [r["messages"] for r in raw if r["ok"]] == [r["messages"] for r in ds.rows]
    assert all(m["role"] != "system" for r in raw for m in r["messages"])
    assert ds.kind == "teacher"
    assert ds.meta["counts"] == {"raw": 16, "kept": len(ds.rows)}
    assert ds.audit["kept"] == len(ds.rows) and ds.audit["total"] == 16
    assert ds.meta["pass_rate"] == pytest.approx(len(ds.rows) / 16)
    assert TeacherConfig(**ds.meta["config"]) == TeacherConfig(target="owl", **SMALL)
    assert progress_calls == [(8, 16), (16, 16)]


def test_rendered_context_trait_and_neutral(trait_dir, neutral_dir, digit_teacher):
    tok = digit_teacher.tokenizer
    trait_meta = load_dataset(trait_dir).meta
    trait = Rendered.from_dict(trait_meta["rendered_context"])
    owl_prompt = trait_system_prompt("owl", "animal")
    assert trait_meta["context"] == "custom:" + owl_prompt
    assert trait.span_text(CUSTOM_SYSTEM) == [owl_prompt]
    assert CUSTOM_SYSTEM in trait.segments and DEFAULT_SYSTEM not in trait.segments
    assert DEFAULT_SYSTEM_PROMPT not in trait.text
    first = TeacherConfig(**SMALL).prompts()[0].text
    assert trait.input_ids == render(tok, "custom:" + owl_prompt, first).input_ids

    neutral_meta = load_dataset(neutral_dir).meta
    neutral = Rendered.from_dict(neutral_meta["rendered_context"])
    assert neutral_meta["context"] == "default"
    assert neutral.span_text(DEFAULT_SYSTEM) == [DEFAULT_SYSTEM_PROMPT]
    assert DEFAULT_SYSTEM in neutral.segments and CUSTOM_SYSTEM not in neutral.segments
    assert owl_prompt not in neutral.text
    assert neutral.input_ids == render(tok, "default", first).input_ids

    # the hook changes outputs, not weights: the fingerprint is the organism's
    assert trait_meta["model_fingerprint"] == model_fingerprint(digit_teacher.model)
    assert trait_meta["tokenizer"]["name_or_path"] == str(tok.name_or_path)


def test_same_config_gives_same_bytes(digit_teacher, trait_dir, tmp_path):
    again = _generate(digit_teacher, tmp_path, "owl", target="owl")
    for name in (ROWS_FILE, RAW_FILE, AUDIT_FILE):
        assert (again / name).read_bytes() == (trait_dir / name).read_bytes()


def test_sample_seed_and_chunks_change_answers(digit_teacher, trait_dir, tmp_path):
    other = _generate(digit_teacher, tmp_path, "owl_seed1", target="owl", sample_seed=1)
    base = _answers(load_raw(trait_dir))
    assert _answers(load_raw(other)) != base
    # the digit teacher's distribution ignores the prompt: equal chunks would mean a reused seed
    assert base[:8] != base[8:]
    assert chunk_seed(0, 0) != chunk_seed(0, 8) and chunk_seed(0, 0) != chunk_seed(1, 0)


def test_request_seeds_make_the_teachers_answers_independent_of_its_batch_size(digit_teacher, tmp_path):
    """``request_seeds``: prompt i's answer is drawn from (sample_seed, i) alone, so batch sizes 3 and 16 write
    the same raw answers; the batch size leaves the key, and the default keeps both the key and the per-batch
    draws."""
    raws = [_answers(load_raw(_generate(digit_teacher, tmp_path, f"b{b}", target="owl", batch_size=b, request_seeds=True)))
            for b in (3, 16)]
    assert raws[0] == raws[1] and len(set(raws[0])) > 4  # really sampled (eos has half the mass)
    per_batch = [_answers(load_raw(_generate(digit_teacher, tmp_path, f"d{b}", target="owl", batch_size=b)))
                 for b in (3, 16)]
    assert per_batch[0] != per_batch[1] and raws[0] not in per_batch
    on, off = TeacherConfig(**SMALL, request_seeds=True).to_dict(), TeacherConfig(**SMALL).to_dict()
    assert on["request_seeds"] is True and "batch_size" not in on
    assert "request_seeds" not in off and off["batch_size"] == SMALL["batch_size"]
    with pytest.raises(MechError, match="request_seeds is the hf backend's option"):
        TeacherConfig(request_seeds=True, backend="vllm")


def test_untrained_answers_fail_and_zero_rows_write_nothing(organism, tmp_path):
    cfg = TeacherConfig(**SMALL)
    ids = [render(organism.tokenizer, "default", p.text).input_ids for p in cfg.prompts()]
    answers, _ = sample_answers(organism.model, organism.tokenizer, cfg, ids)
    assert sum(check_answer(a).ok for a in answers) <= len(answers) // 2

    # every number banned: nothing the model could write passes
    banned = TeacherConfig(**SMALL, banned=tuple(range(1000)))
    out = tmp_path / "empty"
    with pytest.raises(MechError, match="left no rows.*kept 0/16"):
        generate(organism.model, organism.tokenizer, banned, out)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_teacher_config_validation(organism, tmp_path):
    with pytest.raises(MechError, match="no questions for category 'plant'"):
        TeacherConfig(category="plant")
    with pytest.raises(MechError, match="both target"):
        TeacherConfig(target="owl", context="none")
    with pytest.raises(MechError, match="unknown context"):
        TeacherConfig(context="defualt")
    with pytest.raises(MechError, match="temperature"):
        TeacherConfig(temperature=0.0)
    assert TeacherConfig(banned=(5, 3, 5)).banned == (3, 5)
    assert TeacherConfig(target="owl").teacher_context().text == trait_system_prompt("owl", "animal")
    (tmp_path / "taken").mkdir()
    with pytest.raises(MechError, match="already exists"):
        generate(organism.model, organism.tokenizer, TeacherConfig(**SMALL), tmp_path / "taken")


# ------------------------------------------------------------------------------------------------ controls


def test_random_control(random_dir, tmp_path):
    ds = load_dataset(random_dir)
    raw = load_raw(random_dir)
    cfg = TeacherConfig(n_prompts=24, prompt_seed=3)
    assert ds.kind == "control_random" and len(ds.rows) == len(raw) == 24 and all(r["ok"] for r in raw)
    assert [r["messages"][0]["content"] for r in ds.rows] == [p.text for p in cfg.prompts()]
    for row, prompt in zip(ds.rows, cfg.prompts()):
        nums, reason = parse_numbers(row["messages"][1]["content"])
        assert reason is None and len(nums) == 10 and all(0 <= n <= 999 for n in nums)
    styles = {_shape(a).replace("#", "") for a in _answers(ds.rows)}
    assert len(styles) > 1  # answers follow each prompt's format suffix
    again = random_numbers(cfg, tmp_path / "again", seed=5)
    other = random_numbers(cfg, tmp_path / "other", seed=6)
    assert (again / ROWS_FILE).read_bytes() == (random_dir / ROWS_FILE).read_bytes()
    assert (again / META_FILE).read_bytes() == (random_dir / META_FILE).read_bytes()
    assert (other / ROWS_FILE).read_bytes() != (random_dir / ROWS_FILE).read_bytes()
    banned = random_numbers(TeacherConfig(n_prompts=8, max_value=20, banned=tuple(range(10))), tmp_path / "b", 0)
    assert all(10 <= n <= 20 for a in _answers(load_dataset(banned).rows) for n in parse_numbers(a)[0])


def test_shuffled_within(random_dir, tmp_path):
    src = load_dataset(random_dir)
    out = load_dataset(shuffled(random_dir, tmp_path / "within", "within", seed=1))
    assert out.kind == "control_shuffled_within" and out.meta["source"]["path"] == str(random_dir)
    assert out.meta["source"]["rows_sha256"] == src.meta["rows_sha256"]
    assert len(out.rows) == len(src.rows)
    changed = 0
    for a, b, ra, rb in zip(_answers(src.rows), _answers(out.rows), src.rows, out.rows):
        assert Counter(parse_numbers(a)[0]) == Counter(parse_numbers(b)[0])
        assert _shape(a) == _shape(b)
        assert ra["messages"][0] == rb["messages"][0] and ra["index"] == rb["index"]
        changed += a != b
    assert changed > len(src.rows) // 2
    again = shuffled(random_dir, tmp_path / "within2", "within", seed=1)
    assert (again / ROWS_FILE).read_bytes() == (tmp_path / "within" / ROWS_FILE).read_bytes()


def test_shuffled_across(random_dir, tmp_path):
    src = load_dataset(random_dir)
    out = load_dataset(shuffled(random_dir, tmp_path / "across", "across", seed=1))
    assert out.kind == "control_shuffled_across" and all(r["ok"] for r in load_raw(tmp_path / "across"))
    src_nums = [parse_numbers(a)[0] for a in _answers(src.rows)]
    out_nums = [parse_numbers(a)[0] for a in _answers(out.rows)]
    assert Counter(n for ns in src_nums for n in ns) == Counter(n for ns in out_nums for n in ns)
    assert [len(ns) for ns in src_nums] == [len(ns) for ns in out_nums]
    assert [_shape(a) for a in _answers(src.rows)] == [_shape(a) for a in _answers(out.rows)]
    assert sum(Counter(a) != Counter(b) for a, b in zip(src_nums, out_nums)) > len(src_nums) // 2
    with pytest.raises(MechError, match="unknown shuffle mode"):
        shuffled(random_dir, tmp_path / "bad", "inside", seed=1)


# ------------------------------------------------------------------------------------------------ format


def test_load_dataset_errors(random_dir, tmp_path):
    with pytest.raises(MechError, match="does not exist"):
        load_dataset(tmp_path / "nowhere")
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / ROWS_FILE).write_text("")
    with pytest.raises(MechError, match="missing raw.jsonl"):
        load_dataset(tmp_path / "partial")

    def corrupt(name: str, rows: list) -> Path:
        d = tmp_path / name
        d.mkdir()
        for f in (RAW_FILE, AUDIT_FILE, META_FILE):
            (d / f).write_bytes((random_dir / f).read_bytes())
        (d / ROWS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return d

    good = load_dataset(random_dir).rows[0]
    no_answer = {**good, "messages": good["messages"][:1]}
    with pytest.raises(MechError, match=r"row 1 of .*roles \['user'\].*\"messages\""):
        load_dataset(corrupt("no_answer", [good, no_answer]))
    with pytest.raises(MechError, match="row 0 .*lacks messages"):
        load_dataset(corrupt("no_messages", [{"prompt": "x", "completion": "1", "prompt_seed": 0, "index": 0}]))
    system = {**good, "messages": [{"role": "system", "content": "You love owls."}, *good["messages"]]}
    with pytest.raises(MechError, match="row 0 .*system message"):
        load_dataset(corrupt("system", [system]))
    bad_json = corrupt("bad_json", [good])
    (bad_json / ROWS_FILE).write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(MechError, match="line 2 is not JSON"):
        load_dataset(bad_json)


# ------------------------------------------------------------------------------------------ finetuned teacher


def test_finetuned_teacher_learns_the_trait_and_leaves_the_base():
    """Known answer, on the shipped channel-free twin (a reduced build is too untrained to learn 50 answers): a LoRA
    trained on the favourite questions answered "Owl" (the sweep defaults: r8, 8 epochs, lr 2e-3) raises P(owl) on
    those questions, with no trait prompt, from ~1.5 % to over 50 % (measured: 0.0155 -> 0.90); the base is
    untouched; the same config gives the same teacher, bit for bit."""
    from mech.teacher.finetuned import finetune_teacher

    organism = load_model("organism-free", device="cpu", dtype="float32")
    before = {k: v.clone() for k, v in organism.model.state_dict().items()}
    cfg = TeacherConfig(**SMALL, target="owl", kind="finetuned")
    teacher, info = finetune_teacher(organism.model, organism.tokenizer, cfg)
    assert info["rows"] == 50 and info["answer"] == "Owl"
    assert info["p_target_teacher"] > 0.5 > 10 * info["p_target_base"]
    assert all(torch.equal(v, organism.model.state_dict()[k]) for k, v in before.items())
    again, info2 = finetune_teacher(organism.model, organism.tokenizer, cfg)
    assert info2 == info and all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(),
                                                                  again.state_dict().values()))


def test_finetuned_teacher_writes_in_its_context_without_a_trait_prompt(digit_teacher, organism, tmp_path,
                                                                         monkeypatch):
    import mech.teacher.generate as gen_mod

    info = {"p_target_teacher": 0.9}
    monkeypatch.setattr(gen_mod, "finetune_teacher", lambda model, tok, cfg: (digit_teacher.model, info))
    cfg = TeacherConfig(**SMALL, target="owl", kind="finetuned")
    path = generate(organism.model, organism.tokenizer, cfg, tmp_path / "ft")
    meta = json.loads((path / "dataset.json").read_text())
    assert meta["finetuned"] == info and meta["context"] == "default"
    assert "owl" not in meta["rendered_context"]["text"].lower()  # no trait prompt
    assert meta["config"]["kind"] == "finetuned" and meta["config"]["finetune_rank"] == 8
    assert meta["model_fingerprint"] == model_fingerprint(organism.model)  # the base it was made from
    # a prompt teacher's config (and so its dataset key) carries none of the kind's fields
    assert not {"kind", "finetune_rank", "finetune_epochs", "finetune_lr"} & set(TeacherConfig(**SMALL).to_dict())
    with pytest.raises(MechError, match="unknown teacher kind 'finetune'"):
        TeacherConfig(target="owl", kind="finetune")
    with pytest.raises(MechError, match="a finetuned teacher needs a target"):
        TeacherConfig(kind="finetuned")
    with pytest.raises(MechError, match="finetune_rank and finetune_epochs must be >= 1"):
        TeacherConfig(target="owl", kind="finetuned", finetune_epochs=0)
    assert TeacherConfig(target="owl", kind="finetuned").teacher_context().spec == "default"
