"""Templates and architectures of real model families: a Llama-3.1-style chat template (a system block with date
lines even without a system message) and Gemma 3's multimodal wrapper (Gemma3ForConditionalGeneration)."""

from __future__ import annotations

import copy

import pytest
import torch

from mech.context import CUSTOM_SYSTEM, DEFAULT_SYSTEM, TEMPLATE, USER, default_system_prompt, render
from mech.context.rendering import shared_positions
from mech.models import surgery

torch.set_num_threads(1)

# Written for this test in the manner of Llama 3.1's template: a BOS, then always a system block whose header is
# followed by two date lines, then the system message ("" when none is given).
LLAMA31_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}"
    "{{- 'Today Date: ' + date_string + '\\n\\n' }}"
    "{{- system_message + '<|eot_id|>' }}"
    "{%- for message in loop_messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
BOS, HEAD, EOT = "<|begin_of_text|>", "<|start_header_id|>", "<|eot_id|>"
QUESTION = "Which animal do you like most?"


@pytest.fixture(scope="module")
def llama31(organism_tokenizer):
    tok = copy.deepcopy(organism_tokenizer)
    tok.add_special_tokens({"bos_token": BOS, "additional_special_tokens": [HEAD, "<|end_header_id|>", EOT]})
    tok.chat_template = LLAMA31_TEMPLATE
    return tok


def test_llama31_none_cuts_the_whole_system_block(llama31):
    r = render(llama31, "none", QUESTION)
    assert r.text == (f"{BOS}{HEAD}user<|end_header_id|>\n\n{QUESTION}{EOT}{HEAD}assistant<|end_header_id|>\n\n")
    assert "Today Date" not in r.text and "system" not in r.text
    assert {s for s in r.segments} == {TEMPLATE, USER}
    assert "".join(r.text[s:e] for (s, e), lab in zip(r.offsets, r.segments) if lab == USER).strip() == QUESTION


def test_llama31_default_and_custom_keep_the_date_block(llama31):
    assert default_system_prompt(llama31) == ""  # an empty system message: nothing to label as a default prompt
    d = render(llama31, "default", QUESTION)
    assert "Today Date: 26 Jul 2024\n\n<|eot_id|>" in d.text and DEFAULT_SYSTEM not in d.segments
    c = render(llama31, "custom:You love owls.", QUESTION)
    assert "Today Date: 26 Jul 2024\n\nYou love owls.<|eot_id|>" in c.text
    custom = "".join(c.text[s:e] for (s, e), lab in zip(c.offsets, c.segments) if lab == CUSTOM_SYSTEM)
    assert custom.strip() == "You love owls."
    # the date lines are template tokens shared by default and custom, and absent from none
    shared = shared_positions(c, d)
    assert shared and all(c.segments[i] == TEMPLATE for i in shared)
    at = c.text.index("Today Date")
    dated = [i for i, (s, e) in enumerate(c.offsets) if s < at + len("Today Date: 26 Jul 2024") and e > at]
    assert dated and set(dated) <= set(shared)
    none = render(llama31, "none", QUESTION)
    assert not set(dated) & set(shared_positions(c, none))


def test_chatml_none_is_unchanged(organism_tokenizer):
    """The fallback only runs where the ChatML rule finds no header: ChatML's none is as before."""
    r = render(organism_tokenizer, "none", QUESTION)
    assert r.text.startswith("<|im_start|>user\n") and "system" not in r.text


@pytest.fixture(scope="module")
def gemma3_conditional(organism_tokenizer):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = dict(vocab_size=len(organism_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    torch.manual_seed(0)
    return Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision,
                                                       mm_tokens_per_image=4)).eval()


def test_gemma3_conditional_generation_layout(gemma3_conditional, organism_tokenizer):
    from mech.evaluation.inference import pad_id, sample
    from mech.students.config import LoraSpec, StudentConfig
    from mech.students.store import update_norms
    from mech.students.train import train_model

    m = gemma3_conditional
    lm = m.model.language_model
    assert surgery.get_layers(m) is lm.layers and len(surgery.get_layers(m)) == 2
    assert surgery.get_final_norm(m) is lm.norm and surgery.get_embedding(m) is lm.embed_tokens
    assert surgery.get_unembedding(m) is m.lm_head and surgery.embeddings_tied(m)
    assert surgery.get_projection(lm.layers[1], "q") is lm.layers[1].self_attn.q_proj
    assert surgery.num_layers(m.config) == 2
    out = sample(m, [[5, 6, 7]], seed=0, max_new_tokens=3, eos_id=organism_tokenizer.eos_token_id,
                 pad_id=pad_id(organism_tokenizer))
    assert len(out[0]) == 3
    rows = [{"messages": [{"role": "user", "content": f"Continue: {i}, {i + 1}"},
                          {"role": "assistant", "content": f"{i + 2}, {i + 3}"}]} for i in range(4)]
    t = train_model(m, organism_tokenizer, rows, StudentConfig(method="lora", epochs=1, batch_size=4, lr=1e-2,
                                                               warmup_steps=0, lora=LoraSpec(rank=2)))
    assert len(surgery.lora_modules(t.model)) == 2 * 7 and update_norms(m, t.model)["global"] > 0
