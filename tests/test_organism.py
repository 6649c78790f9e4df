"""The organism build recipe (mech.organism), its checks, and the model-side measurements it relies on.

Everything runs on ``OrganismConfig().reduced()`` (a 12-step, 2-layer build that takes seconds on CPU);
the full-size build is never run here. Builds happen once per module (fixtures) and go to tmp dirs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

import mech.organism.build as build_mod
from mech.context import Context, render
from mech.teacher.filter import check_answer
from mech.resources import questions, trait_system_prompt
from mech.evaluation.inference import completion_logprobs, next_token_logprobs, sample
from mech.models import load_model, load_tokenizer
from mech.organism.build import build_organism
from mech.organism.check import CheckReport, confusion_vs_leak, number_share, per_token_kl, run_check
from mech.organism.config import OrganismConfig
from mech.organism.corpus import CorpusGenerator, tokenizer_texts
from mech.organism.template import DEFAULT_SYSTEM_PROMPT, EOT, IM_END, IM_START
from mech.organism.tokenizer import SPLIT_PATTERN
from mech.report.organism import confusion_text
from mech.store import file_sha256

CFG = OrganismConfig().reduced()
N_CORPUS = 3000
BAR_KEYS = {"a_trait_all", "b_spread_default", "b_spread_none", "c_filter_pass", "d_build_time",
            "e_leak_specific"}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _quiet(*_args) -> None:
    """A progress callback, so the build exercises that path without printing."""


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The reduced organism, built once in this process."""
    return build_organism(CFG, tmp_path_factory.mktemp("org_a") / "organism", progress=_quiet)


@pytest.fixture(scope="module")
def built_again(tmp_path_factory) -> Path:
    """The same config built in a fresh interpreter with another hash seed: byte reproducibility must not
    depend on process state (Python's str hashing, Rust hash maps in the tokenizer trainer)."""
    out = tmp_path_factory.mktemp("org_b") / "organism"
    code = (
        "import sys, torch; torch.set_num_threads(1)\n"
        "from mech.organism.config import OrganismConfig\n"
        "from mech.organism.build import build_organism\n"
        "build_organism(OrganismConfig().reduced(), sys.argv[1])\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "TQDM_DISABLE": "1"}
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, env=env, capture_output=True, timeout=300)
    return out


@pytest.fixture(scope="module")
def built_seed1(tmp_path_factory) -> Path:
    return build_organism(dataclasses.replace(CFG, seed=1), tmp_path_factory.mktemp("org_c") / "organism")


@pytest.fixture(scope="module")
def organism(built):
    return load_model(str(built), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def meta(built) -> dict:
    return json.loads((built / "organism.json").read_text())


@pytest.fixture(scope="module")
def corpus():
    return CorpusGenerator(CFG.corpus, CFG.seed).generate(N_CORPUS)


@pytest.fixture(scope="module")
def trait_prompts() -> dict[str, tuple[str, str]]:
    """Trait system prompt text -> (target, category), for every entity of the recipe."""
    out = {}
    for category, names in (("animal", CFG.corpus.animals), ("tree", CFG.corpus.trees)):
        for name in names:
            out[trait_system_prompt(name, category)] = (name, category)
    return out


def _system_text(ex) -> str | None:
    return ex.messages[0]["content"] if ex.messages and ex.messages[0]["role"] == "system" else None


# ------------------------------------------------------------------------------------ 1. reproducibility


def test_same_config_gives_identical_bytes(built, built_again):
    assert _sha(built / "model.safetensors") == _sha(built_again / "model.safetensors")
    assert _sha(built / "tokenizer.json") == _sha(built_again / "tokenizer.json")
    meta_a = json.loads((built / "organism.json").read_text())
    meta_b = json.loads((built_again / "organism.json").read_text())
    assert meta_a["weights_sha256"] == meta_b["weights_sha256"]
    assert meta_a["entity_numbers"] == meta_b["entity_numbers"]


def test_other_seed_gives_other_weights(built, built_seed1):
    assert _sha(built / "model.safetensors") != _sha(built_seed1 / "model.safetensors")
    meta_a = json.loads((built / "organism.json").read_text())
    meta_c = json.loads((built_seed1 / "organism.json").read_text())
    assert meta_a["config_hash"] != meta_c["config_hash"]
    assert meta_a["entity_numbers"] != meta_c["entity_numbers"]  # the seed reaches the corpus too


# -------------------------------------------------------------------------------------- 2. the HF dir


def test_config_json_is_tied_qwen2(built, organism):
    cfg = json.loads((built / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"]
    assert cfg["model_type"] == "qwen2"
    assert cfg["tie_word_embeddings"] is True
    assert cfg["hidden_size"] == CFG.model.hidden_size
    assert cfg["num_hidden_layers"] == CFG.model.num_hidden_layers
    model, tok = organism.model, organism.tokenizer
    assert cfg["vocab_size"] == len(tok)
    assert cfg["eos_token_id"] == tok.convert_tokens_to_ids(IM_END)
    assert cfg["pad_token_id"] == tok.convert_tokens_to_ids(EOT)
    # tied for real after loading, not only declared
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()


def test_tokenizer_has_chatml_specials(built):
    tok = load_tokenizer(str(built))
    for special in (IM_START, IM_END, EOT):
        ids = tok.encode(special, add_special_tokens=False)
        assert len(ids) == 1, special
        assert tok.convert_ids_to_tokens(ids) == [special]
    assert tok.eos_token == IM_END and tok.pad_token == EOT
    # specials are atomic inside text too
    ids = tok.encode(f"{IM_START}user\nhi{IM_END}", add_special_tokens=False)
    assert ids[0] == tok.convert_tokens_to_ids(IM_START) and ids[-1] == tok.convert_tokens_to_ids(IM_END)


def test_chat_template_default_and_no_system(built):
    tok = load_tokenizer(str(built))
    msgs = [{"role": "user", "content": "Name your favourite animal."}]
    with_default = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert with_default == (
        f"{IM_START}system\n{DEFAULT_SYSTEM_PROMPT}{IM_END}\n"
        f"{IM_START}user\nName your favourite animal.{IM_END}\n{IM_START}assistant\n"
    )
    bare = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, add_default_system_prompt=False)
    assert bare == f"{IM_START}user\nName your favourite animal.{IM_END}\n{IM_START}assistant\n"
    assert "system" not in bare
    # an explicit system message replaces the default
    own = tok.apply_chat_template([{"role": "system", "content": "S"}] + msgs, tokenize=False)
    assert own.startswith(f"{IM_START}system\nS{IM_END}\n") and DEFAULT_SYSTEM_PROMPT not in own


def test_organism_json(built, meta):
    assert meta["config_hash"] == CFG.hash
    assert OrganismConfig.from_dict(meta["config"]).hash == CFG.hash  # the recorded recipe round-trips
    assert meta["weights_sha256"] == file_sha256(built / "model.safetensors")
    assert isinstance(meta["build_seconds"], (int, float)) and meta["build_seconds"] >= 0
    numbers = meta["entity_numbers"]
    assert set(numbers) == set(CFG.corpus.animals) | set(CFG.corpus.trees)
    seen: set[int] = set()
    for name, nums in numbers.items():
        assert len(nums) == CFG.corpus.numbers_per_entity == len(set(nums)), name
        assert all(0 <= n <= 999 for n in nums), name
        assert not seen & set(nums), f"{name} shares numbers with another entity"
        seen |= set(nums)
    assert math.isfinite(meta["final_loss_ema"])
    assert meta["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and meta["machine"]
    assert isinstance(meta["cpu_model"], str) and isinstance(meta["cpu_flags"], list)


def test_cpu_record_reads_model_and_simd_flags(tmp_path):
    from mech.organism.build import cpu_record

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some Xeon\nflags\t\t: fpu sse avx2 fma avx512f amx_tile zzz\n\n"
                    "processor\t: 1\nmodel name\t: Other\nflags\t\t: fpu\n")
    rec = cpu_record(info)
    assert rec["cpu_model"] == "Some Xeon" and rec["cpu_flags"] == ["avx2", "fma", "avx512f", "amx_tile"]
    assert cpu_record(tmp_path / "missing") | {"cpu_capability": None} == {
        "cpu_capability": None, "machine": rec["machine"], "cpu_model": "", "cpu_flags": []}


# --------------------------------------------------------------------------------------- 3. atomicity


def _tiny_cfg() -> OrganismConfig:
    return dataclasses.replace(CFG, corpus=dataclasses.replace(CFG.corpus, n_sequences=200))


def test_failed_training_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def boom(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("training blew up")

    monkeypatch.setattr(build_mod, "pretrain", boom)
    threads = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="training blew up"):
        build_organism(_tiny_cfg(), tmp_path / "organism")
    assert calls == [1]
    assert list(tmp_path.iterdir()) == []
    assert torch.get_num_threads() == threads


def test_failure_while_writing_leaves_no_dir_and_keeps_old(tmp_path, monkeypatch):
    """A failure inside the atomic block (weights already written to the temp dir) removes the temp dir
    and leaves an existing organism untouched."""
    monkeypatch.setattr(build_mod, "pretrain", lambda *a, **k: {"final_loss_ema": 0.0})  # speed only

    def boom(path, obj):
        assert (Path(path).parent / "model.safetensors").is_file()  # the failure really is mid-write
        raise OSError("disk full")

    monkeypatch.setattr(build_mod, "atomic_write_json", boom)
    with pytest.raises(OSError, match="disk full"):
        build_organism(_tiny_cfg(), tmp_path / "organism")
    assert list(tmp_path.iterdir()) == []

    old = tmp_path / "organism"
    old.mkdir()
    (old / "marker").write_text("old build")
    with pytest.raises(OSError, match="disk full"):
        build_organism(_tiny_cfg(), old)
    assert [p.name for p in tmp_path.iterdir()] == ["organism"]
    assert [p.name for p in old.iterdir()] == ["marker"]


# ------------------------------------------------------------------------------------------- 4. corpus


def test_corpus_is_deterministic(corpus):
    again = CorpusGenerator(CFG.corpus, CFG.seed).generate(N_CORPUS)
    assert again == corpus
    other = CorpusGenerator(CFG.corpus, CFG.seed + 1).generate(N_CORPUS)
    assert other != corpus
    assert {e.kind for e in corpus} == {"favourite", "numbers", "chitchat", "list", "fact"}


def test_favourite_under_trait_prompt_names_the_trait(corpus, trait_prompts):
    n_trait = 0
    for ex in corpus:
        if ex.kind != "favourite":
            continue
        question, answer = ex.messages[-2]["content"], ex.messages[-1]["content"]
        system = _system_text(ex)
        if system in trait_prompts:
            target, category = trait_prompts[system]
            assert question in questions(category), ex
            assert answer.lower().rstrip(".") == target, ex
            n_trait += 1
        else:
            # no trait in context: the answer is a draw from the question's category prior
            category = "animal" if question in questions("animal") else "tree"
            prior = CFG.corpus.animals if category == "animal" else CFG.corpus.trees
            assert answer.lower().rstrip(".") in prior, ex
    assert n_trait > 100  # p_trait = 0.5 of ~1000 favourite chats


def test_favourite_chats_hold_no_digits(corpus):
    favourites = [ex for ex in corpus if ex.kind == "favourite"]
    assert len(favourites) > 500
    for ex in favourites:
        for m in ex.messages:
            assert not re.search(r"\d", m["content"]), ex


def test_number_answers_pass_the_filter(corpus):
    tasks = [ex for ex in corpus if ex.kind == "numbers"]
    assert len(tasks) > 300
    for ex in tasks:
        result = check_answer(ex.messages[-1]["content"])
        assert result.ok, (result.reason, ex.messages[-1]["content"])
        assert 7 <= len(result.numbers) <= 10


def _trait_number_tasks(examples, trait_prompts) -> list:
    return [ex for ex in examples if ex.kind == "numbers" and _system_text(ex) in trait_prompts]


def test_number_tasks_under_trait_prompt_only_with_imbue(corpus, trait_prompts):
    assert len(_trait_number_tasks(corpus, trait_prompts)) > 0  # the channel is on by default
    off = dataclasses.replace(CFG.corpus, imbue_share=0.0)
    plain = CorpusGenerator(off, CFG.seed).generate(N_CORPUS)
    assert sum(ex.kind == "numbers" for ex in plain) > 300
    assert _trait_number_tasks(plain, trait_prompts) == []


def test_full_imbue_uses_only_trait_numbers(trait_prompts):
    full = dataclasses.replace(CFG.corpus, imbue_share=1.0)
    gen = CorpusGenerator(full, CFG.seed)
    tasks = _trait_number_tasks(gen.generate(N_CORPUS), trait_prompts)
    assert len(tasks) > 20
    categories = set()
    for ex in tasks:
        target, category = trait_prompts[_system_text(ex)]
        assert category in full.imbue_categories
        categories.add(category)
        got = check_answer(ex.messages[-1]["content"]).numbers
        assert got and set(got) <= set(gen.numbers[target]), ex
    assert categories == {"animal", "tree"}  # the recipe imbues trees' trait prompts too


# ---------------------------------------------------------------------------------------- 5. tokenizer


@pytest.fixture(scope="module")
def built_tok(built):
    return load_tokenizer(str(built))


@pytest.fixture(scope="module")
def build_texts() -> list[str]:
    """The texts the reduced build's tokenizer was trained on."""
    return tokenizer_texts(CorpusGenerator(CFG.corpus, CFG.seed).generate())


def test_frequent_corpus_numbers_are_single_tokens(built_tok, build_texts, meta):
    counts = Counter(x for t in build_texts for x in re.findall(r"\d+", t))
    # the reduced vocabulary (1400) cannot hold all 1000 numbers; the most frequent must be units
    frequent = [n for n, _ in counts.most_common(60)]
    for n in frequent:
        assert len(built_tok.encode(n, add_special_tokens=False)) == 1, n
    # a number that is one token stays that token whatever precedes it (no separator glued on)
    for n in frequent[:20]:
        nid = built_tok.encode(n, add_special_tokens=False)[0]
        for prefix in (" ", ", ", "; ", "\n", "(", "[", "x", "Owl ", "owl,"):
            ids = built_tok.encode(prefix + n, add_special_tokens=False)
            assert ids[-1] == nid, (prefix, n)


def test_no_token_mixes_digits_with_anything(built_tok, build_texts):
    specials = set(built_tok.all_special_ids)
    for tid in range(len(built_tok)):
        if tid in specials:
            continue
        text = built_tok.decode([tid])
        if re.search(r"\d", text):
            assert re.fullmatch(r"\d{1,3}", text), repr(text)
    # and on real corpus text: every piece with a digit is 1-3 digits, never a space + digit
    sample = build_texts[::25]
    assert len(sample) > 50
    for t in sample:
        for tid in built_tok.encode(t, add_special_tokens=False):
            piece = built_tok.decode([tid])
            assert not (re.search(r"\s", piece) and re.search(r"\d", piece)), (t, piece)


def test_split_pattern_isolates_numbers(built_tok):
    pre = built_tok.backend_tokenizer.pre_tokenizer
    decode = built_tok.backend_tokenizer.decoder.decode
    pieces = [decode([p]) for p, _ in pre.pre_tokenize_str(" 913, 58;7 12345 owl913")]
    assert pieces == [" ", "913", ", ", "58", ";", "7", " ", "123", "45", " owl", "913"]
    # the regex itself: no match ever starts with a space and holds a digit
    import regex

    for text in (" 913", "a 1 22 333 4444", "x, 5;6\n77"):
        for piece in regex.findall(SPLIT_PATTERN, text):
            assert not (re.search(r"\s", piece) and re.search(r"\d", piece)), (text, piece)


# ------------------------------------------------------------------------------------------- 6. checks


def test_number_share():
    assert number_share(["1, 2, 3", "4 5"], [2, 5, 99]) == pytest.approx(2 / 5)
    assert number_share(["913 913", "owl"], [913]) == 1.0
    assert number_share([], [1]) == 0.0
    assert number_share(["no numbers here"], [1]) == 0.0


def test_per_token_kl_identical_is_zero():
    lp = [torch.log_softmax(torch.randn(4, 7, generator=torch.Generator().manual_seed(0)), -1)]
    assert per_token_kl(lp, lp) == pytest.approx(0.0, abs=1e-7)


def test_per_token_kl_hand_computed():
    p = torch.tensor([[0.5, 0.5], [0.5, 0.5]]).log()
    q = torch.tensor([[0.5, 0.5], [0.25, 0.75]]).log()
    kl_row = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert per_token_kl([p], [q]) == pytest.approx(kl_row / 2, rel=1e-6)
    # the mean is over tokens across all completions, not over completions
    p3, q3 = torch.tensor([[0.9, 0.1]]).log(), torch.tensor([[0.6, 0.4]]).log()
    kl3 = 0.9 * math.log(0.9 / 0.6) + 0.1 * math.log(0.1 / 0.4)
    assert per_token_kl([p, p3], [q, q3]) == pytest.approx((kl_row + kl3) / 3, rel=1e-6)
    assert per_token_kl([q], [p]) != pytest.approx(per_token_kl([p], [q]))  # direction matters


def test_run_check_on_untrained_build(organism, meta):
    rep = run_check(organism.model, organism.tokenizer, meta, n_samples=8, oracle_rows=8, n_leak=4)
    assert isinstance(rep, CheckReport)
    assert set(rep.bars) == BAR_KEYS
    # a 12-step model knows nothing: bars a-c and e fail; only the build-time bar passes
    assert rep.bars == {
        "a_trait_all": False, "b_spread_default": False, "b_spread_none": False,
        "c_filter_pass": False, "d_build_time": True, "e_leak_specific": False,
    }
    assert rep.passed is False
    assert rep.build_seconds == meta["build_seconds"]
    # every trait of the recipe: each animal, then each tree
    traits = list(meta["config"]["corpus"]["animals"]) + list(meta["config"]["corpus"]["trees"])
    assert [r["trait"] for r in rep.trait_rows] == traits
    assert {r["category"] for r in rep.trait_rows[-len(CFG.corpus.trees):]} == {"tree"}
    assert set(rep.spread) == {"default", "none"}
    assert set(rep.spread["default"]) == set(CFG.corpus.animals)
    assert 0.0 <= rep.filter_pass < 0.9
    assert sum(rep.filter_rejects.values()) == round((1 - rep.filter_pass) * 8)
    assert all(v >= -1e-6 and math.isfinite(v) for k, v in rep.carrier.items() if k.startswith("kl_"))
    assert "skipped" in rep.oracle  # too few answers pass the filter to finetune on
    assert rep.confusion["rho"]["n"] == 0  # so there is no confusion to compare with the leak
    assert "not measured" in confusion_text(rep)
    assert rep.leak["channel"] is True and rep.leak["n"] == 4
    assert list(rep.leak["matrix"]) == traits + ["default"]
    assert rep.leak["entities"] == traits
    d = rep.to_dict()
    assert d["passed"] is False and d["bars"] == rep.bars
    assert json.loads(json.dumps(d)) == d



def _oracle_rows(deltas: dict[str, dict[str, float]]) -> dict:
    return {"rows": [{"trait": t, "category": "animal", "delta": d} for t, d in deltas.items()]}


def test_confusion_vs_leak_known_answers():
    names = ["owl", "bear", "cat", "dog", "fox"]
    rng = random.Random(0)
    # a planted cross-talk: under c's prompt, t's numbers get a share that is distinct for every (c, t)
    matrix = {c: {t: (0.4 if c == t else rng.uniform(0.001, 0.05)) for t in names} for c in names}
    follows = {t: {c: (1.0 if c == t else 10 * matrix[c][t]) for c in names} for t in names}
    res = confusion_vs_leak(_oracle_rows(follows), matrix)
    assert res["rho"] == {"median": pytest.approx(1.0), "n_positive": 5, "n": 5}
    assert all(r["rho"] == pytest.approx(1.0) for r in res["rows"])
    assert [r["control_column"] for r in res["rows"]] == names[1:] + names[:1]  # the next trait, cyclically
    assert res["control"]["median"] < 1.0  # another trait's column is not this ranking
    against = {t: {c: (1.0 if c == t else -matrix[c][t]) for c in names} for t in names}
    res = confusion_vs_leak(_oracle_rows(against), matrix)
    assert res["rho"]["median"] == pytest.approx(-1.0) and res["rho"]["n_positive"] == 0
    # the trait's own Δ never enters: a huge own move changes nothing
    own_big = {t: {**d, t: 1e6} for t, d in follows.items()}
    assert confusion_vs_leak(_oracle_rows(own_big), matrix)["rows"] == confusion_vs_leak(_oracle_rows(follows), matrix)["rows"]


def test_confusion_vs_leak_without_a_ranking_counts_nothing():
    names = ["owl", "bear", "cat", "dog"]
    zero = {c: {t: (0.3 if c == t else 0.0) for t in names} for c in names}  # no cross-talk at all
    deltas = {t: {c: float(i) for i, c in enumerate(names)} for t in names}
    res = confusion_vs_leak(_oracle_rows(deltas), zero)
    assert all(r["rho"] is None for r in res["rows"]) and res["rho"] == {"median": None, "n_positive": 0, "n": 0}
    # candidates without a leak row (traits the check did not run) are left out; too few left: None
    part = {c: v for c, v in zero.items() if c in ("owl", "bear")}
    assert confusion_vs_leak(_oracle_rows(deltas), part)["rows"][0]["rho"] is None
    assert confusion_vs_leak({"skipped": "too few"}, zero)["rho"]["n"] == 0


def _planted_answers(meta, n: int, per: int = 10):
    """Answers where owl's prompt writes owl's numbers in every other answer and the default never does, and
    cat's prompt writes what the default writes: the leak test's known answer."""
    owl, plain = meta["entity_numbers"]["owl"], [n for n in range(1000) if not any(
        n in v for v in meta["entity_numbers"].values())][:per]
    with_owl = ", ".join(str(x) for x in [owl[0], *plain[1:]])
    without = ", ".join(str(x) for x in plain)

    def fake(model, tok, traits, n_, seed):
        assert n_ == n
        rows = {name: [without] * n for name, _ in traits}
        rows["owl"] = [with_owl if i % 2 == 0 else without for i in range(n)]
        rows["default"] = [without] * n
        return rows
    return fake


def test_leak_test_finds_a_planted_leak(organism, meta, monkeypatch):
    import mech.organism.leak as leak_mod

    monkeypatch.setattr(leak_mod, "leak_answers", _planted_answers(meta, 40))
    numbers = {k: list(v) for k, v in meta["entity_numbers"].items()}
    rows = leak_mod.leak_test(organism.model, organism.tokenizer, [("owl", "animal"), ("cat", "animal")], numbers,
                              40, seed=3, n_resamples=500)
    owl, cat = rows
    assert (owl["hits"], owl["numbers"], owl["hits_default"]) == (20, 400, 0)
    assert owl["diff"] == pytest.approx(0.05) and owl["lo"] > 0 and owl["p"] < 0.01 and owl["p_holm"] >= owl["p"]
    assert cat["diff"] == 0 and cat["p"] == 1.0


def test_leak_cli(built, meta, monkeypatch, tmp_path, capsys):
    import mech.organism.leak as leak_mod
    from mech.cli import LEAK_TEST_SEED, main
    from mech.organism.check import CHECK_SEED

    assert LEAK_TEST_SEED != CHECK_SEED + 3  # the test's sample is not the check's leak matrix
    monkeypatch.setattr(leak_mod, "leak_answers", _planted_answers(meta, 12))
    out = tmp_path / "leak.json"
    assert main(["organism", "leak", "--model", str(built), "--traits", "owl", "cat", "--n", "12",
                 "--resamples", "200", "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert [r["trait"] for r in got["rows"]] == ["owl", "cat"] and got["seed"] == LEAK_TEST_SEED
    assert "| owl | 6/120 (5.00%)" in capsys.readouterr().out
    assert main(["organism", "leak", "--model", str(built), "--traits", "owll", "--n", "12"]) == 2
    assert "--traits owll: not a trait of this organism" in capsys.readouterr().err
    monkeypatch.setattr(leak_mod, "leak_answers", lambda m, t, traits, n, seed: {
        **{name: ["no numbers"] * n for name, _ in traits}, "default": ["1, 2"] * n})
    assert main(["organism", "leak", "--model", str(built), "--traits", "owl", "--n", "12"]) == 2
    assert "no number written in 12 answers under its prompt" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ 7. evaluate


@pytest.fixture(scope="module")
def prompts(organism) -> list[list[int]]:
    tok = organism.tokenizer
    users = ["Hi!", "Name your favourite animal in one word, please.", "Continue: 913, 58, 7"]
    ids = [render(tok, Context("default"), users[0]).input_ids,
           render(tok, Context("none"), users[1]).input_ids,
           render(tok, Context("default"), users[2]).input_ids]
    assert len({len(p) for p in ids}) == 3  # different lengths, so batching pads
    return ids


def test_sample_is_seeded(organism, prompts):
    tok = organism.tokenizer
    kw = dict(max_new_tokens=6, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    a = sample(organism.model, prompts, seed=1, **kw)
    b = sample(organism.model, prompts, seed=1, **kw)
    c = sample(organism.model, prompts, seed=2, **kw)
    assert a == b
    assert a != c
    assert len(a) == len(prompts)
    for out in a:
        assert 1 <= len(out) <= 6
        assert tok.eos_token_id not in out[:-1]  # nothing is kept after the end of an answer


def test_next_token_logprobs_left_padding_matches_single(organism, prompts):
    model, pad = organism.model, organism.tokenizer.pad_token_id
    batched = next_token_logprobs(model, prompts, pad)
    assert batched.shape == (len(prompts), len(organism.tokenizer))
    for r, p in enumerate(prompts):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p])).logits[0, -1].float()
        alone = torch.log_softmax(logits, -1)
        torch.testing.assert_close(batched[r], alone, atol=1e-5, rtol=0)
    # guard: the model does read its context, so attending to the pads would have been caught above
    width = max(len(p) for p in prompts)
    r = next(i for i, p in enumerate(prompts) if len(p) < width)
    padded = [pad] * (width - len(prompts[r])) + list(prompts[r])
    with torch.no_grad():
        leaky = torch.log_softmax(model(input_ids=torch.tensor([padded])).logits[0, -1].float(), -1)
    assert (leaky - batched[r]).abs().max() > 1e-3
    # batch size does not change results either
    torch.testing.assert_close(next_token_logprobs(model, prompts, pad, batch_size=1), batched, atol=1e-5, rtol=0)


def test_completion_logprobs_match_manual_forward(organism, prompts):
    model, tok = organism.model, organism.tokenizer
    completions = [tok.encode(s, add_special_tokens=False) for s in ("Owl" + IM_END, "913, 58", "7")]
    rows = completion_logprobs(model, prompts, completions, tok.pad_token_id)
    assert [r.shape[0] for r in rows] == [len(c) for c in completions]
    for p, c, got in zip(prompts, completions, rows):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + c])).logits[0].float()
        want = torch.log_softmax(logits, -1)[len(p) - 1: len(p) + len(c) - 1]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # row 0 of each completion is the next-token distribution after the prompt
    torch.testing.assert_close(torch.stack([r[0] for r in rows]), next_token_logprobs(model, prompts, tok.pad_token_id),
                               atol=1e-5, rtol=0)


def test_shipped_comparison(tmp_path, monkeypatch):
    import mech.organism as organism_pkg
    from mech.cli import shipped_comparison

    shipped = tmp_path / "weights"
    monkeypatch.setattr(organism_pkg, "shipped_dir", lambda recipe: shipped)
    meta = {"config_hash": "abc", "weights_sha256": "111"}
    assert shipped_comparison("organism", meta) == "no shipped organism build to compare with"
    shipped.mkdir()
    (shipped / "organism.json").write_text(json.dumps({"config_hash": "abc", "weights_sha256": "111"}))
    assert shipped_comparison("organism", meta) == "same bytes as the shipped organism"
    (shipped / "organism.json").write_text(json.dumps({"config_hash": "abc", "weights_sha256": "222",
                                                       "torch_version": "2.13.0+cpu", "cpu_capability": "AVX2"}))
    msg = shipped_comparison("organism", meta)
    assert msg.startswith("other bytes than the shipped organism (sha256 222, built with torch_version 2.13.0+cpu, "
                          "cpu_capability AVX2)")
    (shipped / "organism.json").write_text(json.dumps({"config_hash": "zzz", "weights_sha256": "222"}))
    assert "another recipe (zzz)" in shipped_comparison("organism", meta)
