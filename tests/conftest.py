"""Shared fixtures: a tiny trained tokenizer and tiny random Qwen2 / Llama models saved as HF dirs.

Everything is built from configs in tmp dirs in well under a couple of seconds; nothing is downloaded.
"""

from __future__ import annotations

import os

# Set before anything imports huggingface_hub / transformers (they read these once, at import): no test may
# reach for the network, and one that tries fails at once instead of hanging on a timeout.
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_var] = "1"
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # subprocesses the tests start inherit it
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import random  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# the test machines are shared and small
torch.set_num_threads(1)
try:
    torch.set_num_interop_threads(1)
except RuntimeError:  # already set, or inter-op work already started (a plugin imported torch first)
    pass

ANIMALS = ("owl", "cat", "dog", "eagle", "dolphin", "wolf", "lion", "panda", "tiger", "elephant")
TINY_DIMS = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)


def synthetic_chat_texts(n: int = 300, seed: int = 0) -> list[str]:
    """Short ChatML chats mixing animal words, numbers 0-999 and punctuation."""
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        animal = rng.choice(ANIMALS)
        nums = ", ".join(str(rng.randrange(1000)) for _ in range(rng.randint(3, 8)))
        question = rng.choice(
            [
                f"Continue the sequence: {nums}.",
                "What is your favourite animal? Answer in one word!",
                f"Name an animal; then list numbers like {nums}",
                "Which animal do you love most?",
            ]
        )
        answer = rng.choice([f"{animal.capitalize()}.", nums, f"I love the {animal} (it's {i % 1000})!"])
        texts.append(
            f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n"
        )
    # every number appears at least once, so digits and short numbers get merged tokens
    texts.extend(" ".join(str(k) for k in range(j, j + 50)) for j in range(0, 1000, 50))
    return texts


@pytest.fixture(scope="session")
def organism_tokenizer():
    """A ~600-token byte-level BPE trained on synthetic chats, as a transformers tokenizer with chat template."""
    from mech.organism.tokenizer import as_transformers_tokenizer, train_tokenizer

    return as_transformers_tokenizer(train_tokenizer(synthetic_chat_texts(), vocab_size=600))


def _tiny_config(arch: str, tokenizer, **overrides):
    import transformers

    config_cls = {
        "qwen2": transformers.Qwen2Config,
        "llama": transformers.LlamaConfig,
        "gemma2": transformers.Gemma2Config,
    }[arch]
    dims = {**TINY_DIMS, **overrides}
    if arch == "gemma2":
        dims.setdefault("head_dim", dims["hidden_size"] // dims["num_attention_heads"])
    return config_cls(
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **dims,
    )


def _tiny_model(arch: str, tokenizer, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_tiny_config(arch, tokenizer, **overrides))
    return model.eval()


@pytest.fixture(scope="session")
def make_tiny_lm(organism_tokenizer) -> Callable[..., torch.nn.Module]:
    """Factory: ``make_tiny_lm("qwen2" | "llama" | "gemma2", seed=0, **config_overrides)`` -> a random
    eval-mode causal LM (float32, CPU) sized to ``organism_tokenizer``. Fresh on every call."""

    def make(arch: str = "qwen2", seed: int = 0, **overrides):
        return _tiny_model(arch, organism_tokenizer, seed=seed, **overrides)

    return make


def _save_tiny(arch: str, tokenizer, root: Path) -> Path:
    model = _tiny_model(arch, tokenizer)
    model.save_pretrained(root, safe_serialization=True)
    tokenizer.save_pretrained(root)
    return root


@pytest.fixture(scope="session")
def tiny_qwen_dir(organism_tokenizer, tmp_path_factory) -> Path:
    """A normal HF dir: random Qwen2ForCausalLM (hidden 32, 2 layers, tied) + organism_tokenizer, seed 0."""
    return _save_tiny("qwen2", organism_tokenizer, tmp_path_factory.mktemp("tiny_qwen"))


@pytest.fixture(scope="session")
def tiny_llama_dir(organism_tokenizer, tmp_path_factory) -> Path:
    """A normal HF dir: random LlamaForCausalLM (SmolLM2's architecture), same sizes as tiny_qwen_dir."""
    return _save_tiny("llama", organism_tokenizer, tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def write_number_dataset() -> Callable[..., Path]:
    """Factory: ``write_number_dataset(path, n=32)`` writes a valid dataset dir of ``n`` number rows
    ("Continue: i, i+1, i+2." -> "i+3, i+4, i+5") without sampling a teacher, and returns ``path``."""
    from mech.teacher.dataset import make_row, write_dataset
    from mech.teacher.filter import filter_rows

    def write(path: Path, n: int = 32) -> Path:
        candidates = [{"answer": f"{i + 3}, {i + 4}, {i + 5}",
                       "row": make_row(f"Continue: {i}, {i + 1}, {i + 2}.", f"{i + 3}, {i + 4}, {i + 5}", 0, i)}
                      for i in range(n)]
        kept, audit = filter_rows(candidates)
        raw = [c["row"] | {"ok": True, "reason": None} for c in candidates]
        return write_dataset(path, raw, [c["row"] for c in kept], audit, {"kind": "teacher"})

    return write


# the tiny Qwen2 base and the organism tokenizer that the training tests share (a module may define its own)
@pytest.fixture
def base(make_tiny_lm):
    return make_tiny_lm("qwen2", seed=0)


@pytest.fixture
def tok(organism_tokenizer):
    return organism_tokenizer
