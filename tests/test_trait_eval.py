"""Trait evaluation on the reduced tiny organism: first-token metric, seeded sampling, context hashes, and a
planted owl-lover as a known-answer test."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mech.context import Context, render
from mech.resources import questions
from mech.evaluation.scoring import first_token_ids, mentions, normalise_answer
from mech.errors import MechError
from mech.models import get_embedding, get_unembedding, load_model
from mech.organism.build import build_organism
from mech.organism.config import ANIMAL_PRIOR, OrganismConfig
from mech.evaluation.trait import (
    BUILTIN_CANDIDATES,
    TraitEvalConfig,
    TraitResult,
    candidate_answers,
    delta,
    evaluate_trait,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def organism(tmp_path_factory):
    out = build_organism(OrganismConfig().reduced(), tmp_path_factory.mktemp("organism") / "org")
    torch.set_num_threads(1)
    loaded = load_model(str(out), device="cpu", dtype="float32")
    return loaded.model, loaded.tokenizer


@pytest.fixture(scope="module")
def sampled(organism):
    model, tok = organism
    return evaluate_trait(model, tok, TraitEvalConfig(n_samples=2, seed=0))


@pytest.fixture(scope="module")
def first_only(organism):
    model, tok = organism
    return evaluate_trait(model, tok, TraitEvalConfig(first_token_only=True))


def test_first_token_only_skips_sampling(first_only):
    r = first_only
    n_q = len(questions("animal"))
    assert r.rate is None and r.answers is None and r.answer_counts == [] and r.n_answers == 0
    assert len(r.logp_first_per_question) == len(r.p_first_per_question) == len(r.questions) == n_q
    assert r.p_first == pytest.approx(sum(r.p_first_per_question) / n_q)
    assert r.logp_first == pytest.approx(sum(r.logp_first_per_question) / n_q)
    assert r.logp_first <= math.log(r.p_first) + 1e-6  # Jensen: the mean of logs is at most the log of the mean
    assert "Mechling" in r.example_prompt  # the organism's default system prompt is in the default context


def test_p_first_equals_manual_computation(organism, first_only):
    model, tok = organism
    q = questions("animal")[3]
    ids = render(tok, Context("default"), q).input_ids
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
    p = torch.softmax(logits.double(), -1)[first_token_ids(tok, "owl").ids].sum().item()
    assert first_only.p_first_per_question[3] == pytest.approx(p, rel=1e-4)
    assert first_only.logp_first_per_question[3] == pytest.approx(math.log(p), abs=1e-4)


def test_sampling_shape_rate_and_counts(sampled):
    r = sampled
    n_q = len(r.questions)
    assert len(r.answers) == n_q and all(len(a) == 2 for a in r.answers)
    assert r.n_answers == 2 * n_q
    flat = [a for row in r.answers for a in row]
    assert r.rate == pytest.approx(sum(mentions(a, "owl") for a in flat) / len(flat))
    assert r.rate_per_question == [sum(mentions(a, "owl") for a in row) / 2 for row in r.answers]
    assert all(isinstance(a, str) and "<|im_end|>" not in a for a in flat)
    top = r.answer_counts[0]
    assert top[1] == sum(normalise_answer(a) == top[0] for a in flat)
    assert len(r.answer_counts) <= 20 and sum(n for _, n in r.answer_counts) <= len(flat)


def test_same_seed_same_samples_other_seed_other_samples(organism, sampled):
    model, tok = organism
    again = evaluate_trait(model, tok, TraitEvalConfig(n_samples=2, seed=0))
    other = evaluate_trait(model, tok, TraitEvalConfig(n_samples=2, seed=1))
    assert again.to_dict() == sampled.to_dict()
    assert other.answers != sampled.answers
    assert other.p_first == sampled.p_first  # the first-token metric does not depend on the seed


def test_context_hash_and_delta(organism, first_only, sampled):
    model, tok = organism
    none = evaluate_trait(model, tok, TraitEvalConfig(context="none", first_token_only=True))
    assert none.context_hash != first_only.context_hash
    assert sampled.context_hash == first_only.context_hash
    assert "Mechling" not in none.example_prompt
    with pytest.raises(MechError, match=r"'default'.*'none'"):
        delta(first_only, none)
    d = delta(sampled, first_only)
    assert d["d_logp_first"] == 0.0 and d["d_p_first"] == 0.0 and d["d_rate"] is None
    assert delta(sampled, sampled)["d_rate"] == 0.0


def test_candidates_come_from_the_organism_record(first_only, make_tiny_lm):
    r = first_only
    assert r.candidate_source == "organism"
    assert set(r.candidates) | set(r.candidates_dropped) == set(ANIMAL_PRIOR)
    assert "owl" in r.candidates and r.candidates["owl"] == pytest.approx(r.p_first)
    assert all(0.0 <= p <= 1.0 for p in r.candidates.values())
    names, source = candidate_answers(make_tiny_lm(), "animal", "owl")  # no organism record: built-in list
    assert source == "builtin" and names == list(BUILTIN_CANDIDATES["animal"])
    names, _ = candidate_answers(make_tiny_lm(), "tree", "kapok")
    assert names[0] == "kapok" and "oak" in names


def test_planted_owl_lover_is_found(organism):
    """Known answer: a head that puts +40 logits on the whole-word owl tokens at the answer's first position
    and on end-of-turn afterwards answers 'Owl' every time."""
    model, tok = organism
    target = first_token_ids(tok, "owl")
    words = [i for i, piece in zip(target.ids, target.pieces) if piece.strip().lower() in ("owl", "owls")]
    assert words, f"reduced organism tokenizer has no whole-word owl token: {target.pieces}"

    prefill = [False]  # the unembedding may see only the last position either way (logits_to_keep)

    def note(module, args):
        prefill[0] = args[0].shape[1] > 1  # a full prompt, not a cached decoding step

    def plant(module, inputs, logits):
        logits = logits.clone()
        if prefill[0]:  # the prompt's last position is the answer's first token
            logits[:, -1, words] += 40.0
        else:  # a cached decoding step: end the answer
            logits[:, -1, tok.eos_token_id] += 40.0
        return logits

    handles = [get_embedding(model).register_forward_pre_hook(note),
               get_unembedding(model).register_forward_hook(plant)]
    try:
        r = evaluate_trait(model, tok, TraitEvalConfig(n_samples=2, seed=0))
    finally:
        for h in handles:
            h.remove()
    assert r.p_first > 0.999 and r.logp_first > -1e-3
    assert r.rate == 1.0
    assert r.answer_counts[0] == ["owl", r.n_answers]


def test_model_mode_is_restored(organism):
    model, tok = organism
    model.train()
    try:
        evaluate_trait(model, tok, TraitEvalConfig(first_token_only=True))
        assert model.training
    finally:
        model.eval()


def test_result_round_trips_through_json(sampled):
    back = TraitResult.from_dict(json.loads(json.dumps(sampled.to_dict())))
    assert back.to_dict() == json.loads(json.dumps(sampled.to_dict()))
    with pytest.raises(MechError, match="unknown keys"):
        TraitResult.from_dict({**sampled.to_dict(), "bogus": 1})


def test_config_faults_are_mech_errors(organism):
    model, tok = organism
    with pytest.raises(MechError, match="defualt"):
        TraitEvalConfig(context="defualt")
    with pytest.raises(MechError, match="first_token_only"):
        TraitEvalConfig(n_samples=0)
    assert TraitEvalConfig(n_samples=0, first_token_only=True).n_samples == 0
    with pytest.raises(MechError, match="n_sample"):
        TraitEvalConfig.from_dict({"n_sample": 3})
    assert TraitEvalConfig.from_dict({"target": "cat", "seed": 2}) == TraitEvalConfig(target="cat", seed=2)
    with pytest.raises(MechError, match="fish"):
        evaluate_trait(model, tok, TraitEvalConfig(category="fish", first_token_only=True))


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma2"])
def test_shared_prefill_samples_what_repeated_prompts_sample(make_tiny_lm, organism_tokenizer, arch):
    """``sample(n_samples=k)`` prefills each prompt once and copies its KV cache to the k samples; its tokens must be
    the tokens of sampling the prompt repeated k times (each repeat prefilled on its own), whatever the batch
    boundaries (here 4 requests a batch, so batches cut through a prompt's 3 samples), on prompts of different
    lengths (left padding)."""
    from mech.evaluation.inference import eos_id, pad_id, sample

    tok, model = organism_tokenizer, make_tiny_lm(arch, seed=1)
    prompts = [render(tok, Context.parse("default"), q).input_ids for q in questions("animal")[:5]]
    assert len({len(p) for p in prompts}) > 1
    kw = dict(seed=3, max_new_tokens=5, eos_id=eos_id(tok), pad_id=pad_id(tok), temperature=1.0, batch_size=4)
    shared = sample(model, prompts, n_samples=3, **kw)
    repeated = sample(model, [p for p in prompts for _ in range(3)], **kw)
    assert shared == repeated
    assert len({tuple(s) for s in shared}) > 5  # really sampled: the answers differ
    with pytest.raises(MechError, match="n_samples"):
        sample(model, prompts, n_samples=0, **kw)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_per_request_seeds_make_an_answer_independent_of_its_batch(make_tiny_lm, organism_tokenizer, arch):
    """With ``request_seeds`` a request's tokens are the same whatever the batch size, its batch-mates (here
    the prompts in another order) and the prefill sharing; the default seeding's tokens depend on the batch."""
    from mech.evaluation.inference import eos_id, pad_id, sample

    tok, model = organism_tokenizer, make_tiny_lm(arch, seed=1)
    prompts = [render(tok, Context.parse("default"), q).input_ids for q in questions("animal")[:5]]
    kw = dict(seed=3, max_new_tokens=6, eos_id=eos_id(tok), pad_id=pad_id(tok), temperature=1.0)
    ref = sample(model, prompts, n_samples=3, batch_size=15, request_seeds=True, **kw)
    assert len({tuple(s) for s in ref}) > 5  # really sampled
    for batch_size in (1, 2, 4, 7):
        assert sample(model, prompts, n_samples=3, batch_size=batch_size, request_seeds=True, **kw) == ref
        assert sample(model, [p for p in prompts for _ in range(3)], batch_size=batch_size, request_seeds=True,
                      **kw) == ref
    # a request keeps its seed by index: the first prompt's samples alone are its samples in the full call
    assert sample(model, prompts[:1], n_samples=3, batch_size=2, request_seeds=True, **kw) == ref[:3]
    default = [sample(model, prompts, n_samples=3, batch_size=b, **kw) for b in (1, 4)]
    assert default[0] != default[1]  # the default draws per batch


def test_an_evaluation_with_request_seeds_does_not_depend_on_its_batch_size(make_tiny_lm, organism_tokenizer):
    tok, model = organism_tokenizer, make_tiny_lm("qwen2", seed=2)
    cfg = dict(n_samples=3, max_new_tokens=3, request_seeds=True)
    a = evaluate_trait(model, tok, TraitEvalConfig(batch_size=7, **cfg))
    b = evaluate_trait(model, tok, TraitEvalConfig(batch_size=256, **cfg))
    assert a.answers == b.answers and a.rate == b.rate and len({x for row in a.answers for x in row}) > 10
    assert TraitEvalConfig(batch_size=7, **cfg).to_dict()["request_seeds"] is True
    assert "request_seeds" not in TraitEvalConfig().to_dict()  # the default keeps every evaluation key
    with pytest.raises(MechError, match="request_seeds is the hf backend's option"):
        TraitEvalConfig(request_seeds=True, backend="vllm")
