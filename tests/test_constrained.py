"""Format-constrained teacher sampling (mech.teacher.constrained) through the one decode loop.

A random tiny model is the hard case: unconstrained, it writes almost any token; constrained, every token it
writes must decode to digits, ',' ';', whitespace, or end the turn.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from mech.cli import parser
from mech.evaluation.inference import pad_id, sample
from mech.sweep import load_sweep
from mech.sweep.config import stage_key, teacher_config
from mech.teacher.constrained import allowed_text, complete, format_mask, number_grammar, valid_prefix
from mech.teacher.filter import check_answer
from mech.context import render
from mech.teacher.generate import TeacherConfig, sample_answers

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(make_tiny_lm, organism_tokenizer):
    return make_tiny_lm("qwen2", seed=3), organism_tokenizer


def _prompts(tok, n: int = 8) -> list[list[int]]:
    return [tok(f"Give me numbers {i}:", add_special_tokens=False)["input_ids"] for i in range(n)]


def _sample(model, tok, **kw) -> list[list[int]]:
    return sample(model, _prompts(tok), seed=7, max_new_tokens=16, eos_id=tok.eos_token_id, pad_id=pad_id(tok),
                  batch_size=4, **kw)


def test_allowed_text():
    assert allowed_text("12") and allowed_text(", ") and allowed_text("\n") and allowed_text(";")
    for bad in ("", "a", "1.", "-3", "[", "owl", "\x0b", "<|im_end|>", "\ufffd"):
        assert not allowed_text(bad), bad


def test_mask_is_the_vocabulary_scan(tiny):
    _, tok = tiny
    mask = format_mask(tok)
    texts = [tok.decode([i]) for i in range(len(tok))]
    for i, text in enumerate(texts):
        assert bool(mask.allowed[i]) == (allowed_text(text) or i in mask.stops), (i, text)
    assert tok.eos_token_id in mask.stops and mask.allowed[tok.eos_token_id]
    assert all(mask.allowed[tok.convert_tokens_to_ids(d)] for d in "0123456789")
    assert not mask.allowed[tok.convert_tokens_to_ids("<|im_start|>")]
    assert 10 < mask.n_allowed < len(tok) // 2  # digits, numbers and whitespace; not the words
    # a model whose vocabulary is padded past the tokenizer's: the padding is never sampled
    logits = torch.zeros(2, len(tok) + 5)
    out = mask(logits)
    assert torch.isinf(out[:, len(tok):]).all() and torch.isfinite(out[:, tok.eos_token_id]).all()


def test_constrained_samples_decode_to_number_text(tiny):
    model, tok = tiny
    mask = format_mask(tok)
    free = _sample(model, tok)
    constrained = _sample(model, tok, process=mask)
    tokens = [t for row in constrained for t in row]
    assert tokens and all(bool(mask.allowed[t]) for t in tokens)
    for row in constrained:
        body = [t for t in row if t not in mask.stops]
        assert all(allowed_text(tok.decode([t])) for t in body)
    # the random model, left alone, does write other tokens: the mask is what keeps them out
    assert any(not mask.allowed[t] for row in free for t in row)


def test_grammar_prefixes():
    for ok in ("", "1", "12, 3", "12, 3, ", "12, 3,", "1;2", "1\n2\n", "007", "1 , 2"):
        assert valid_prefix(ok, 10, 999), ok
    for bad in ("1, 2; 3", "1000", "1,2, 3", " 1", "1, 2,,", "a", "1.5", "1\n\n\n\n2", "1, 2, 3, ", "-1"):
        assert not valid_prefix(bad, 3 if bad == "1, 2, 3, " else 10, 999), bad
    assert complete("1, 2", 10, 999) and not complete("1, ", 10, 999) and not complete("", 10, 999)
    assert complete("1, 2, 3", 3, 999) and not valid_prefix("1, 2, 3, 4", 3, 999)
    assert not valid_prefix("50", 10, 42) and valid_prefix("42", 10, 42)


def test_grammar_answers_all_pass_the_filter(tiny):
    """The known answer: every finished grammar-constrained answer is one the filter keeps; unconstrained, the
    same random model writes almost nothing it keeps."""
    model, tok = tiny
    cfg = TeacherConfig(n_prompts=24, max_new_tokens=24, batch_size=8, answer_count=3, constrained=True)
    prompts = [render(tok, cfg.teacher_context(), p.text).input_ids for p in cfg.prompts()]
    answers, finished = sample_answers(model, tok, cfg, prompts)
    assert all(finished)  # three numbers of at most three digits, then only end of turn is left
    assert all(check_answer(a, 3, 999).ok for a in answers), [a for a in answers if not check_answer(a, 3, 999).ok]
    free, _ = sample_answers(model, tok, dataclasses.replace(cfg, constrained=False), prompts)
    assert sum(check_answer(a, 3, 999).ok for a in free) < len(free) // 2
    grammar = number_grammar(tok, 3, 999)
    assert grammar(torch.zeros(1, len(tok)), [[]]).isfinite().sum() < format_mask(tok).n_allowed


def test_unconstrained_sampling_is_unchanged(tiny):
    model, tok = tiny
    plain = _sample(model, tok)
    assert _sample(model, tok, process=None) == plain
    assert _sample(model, tok, process=lambda logits, tokens: logits) == plain


def test_teacher_option_in_config_key_and_answers(tiny):
    model, tok = tiny
    off, on = TeacherConfig(n_prompts=6, max_new_tokens=12, batch_size=3), None
    on = dataclasses.replace(off, constrained=True)
    assert "constrained" not in off.to_dict() and on.to_dict()["constrained"] is True
    # off, the dict (and so every existing dataset key) is what it was before the option existed
    # (the fields that existed before any option: a later option, e.g. kind, must leave them alone too)
    before = ("target", "category", "context", "n_prompts", "prompt_seed", "sample_seed", "max_new_tokens",
              "batch_size", "temperature", "answer_count", "max_value", "banned")
    legacy = {k: v for k, v in dataclasses.asdict(off).items() if k in before}
    assert stage_key("dataset", "fp", off.to_dict()) == stage_key("dataset", "fp", legacy)
    assert stage_key("dataset", "fp", on.to_dict()) != stage_key("dataset", "fp", off.to_dict())
    prompts = [r.input_ids for r in (render(tok, on.teacher_context(), p.text) for p in on.prompts())]
    answers, _ = sample_answers(model, tok, on, prompts)
    assert all(allowed_text(a) or a == "" for a in answers) and any(any(c.isdigit() for c in a) for a in answers)
    free, _ = sample_answers(model, tok, off, prompts)
    assert not all(allowed_text(a) or a == "" for a in free)


def test_sweep_and_cli_expose_the_option(tmp_path):
    data = yaml.safe_load((Path(__file__).resolve().parents[1] / "experiments" / "quick.yaml").read_text())
    data["teacher"] = {**data.get("teacher", {}), "constrained": True}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    cfg = load_sweep(tmp_path / "c.yaml")
    trait = cfg.traits[0]
    assert teacher_config(cfg, trait, 0).constrained
    plain = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, constrained=False))
    assert teacher_config(plain, trait, 0).to_dict() != teacher_config(cfg, trait, 0).to_dict()
    args = parser().parse_args(["teacher", "--trait", "owl", "--constrained", "--out", str(tmp_path / "t")])
    assert args.constrained is True
    assert parser().parse_args(["teacher", "--neutral", "--out", "x"]).constrained is False
