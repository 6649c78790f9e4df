"""Build the organism: corpus → tokenizer → Qwen2ForCausalLM pretraining → a normal HF model directory.

Deterministic on CPU: every draw is seeded from the config and the thread count is part of the config, so
the same config gives the same weight bytes. The output directory is written atomically.
"""

from __future__ import annotations

import math
import platform
import random
import time
from pathlib import Path
from typing import Callable

import torch

from mech.evaluation.inference import device_of, pad_id
from mech.organism.config import OrganismConfig
from mech.organism.corpus import CorpusGenerator, tokenizer_texts
from mech.organism.corpus import Example as CorpusExample
from mech.organism.template import IM_END
from mech.organism.tokenizer import as_transformers_tokenizer, train_tokenizer
from mech.store import atomic_dir, atomic_write_json, file_sha256
from mech.students.encoding import IGNORE_INDEX, Example, collate
from mech.students.loop import sparse_completion_loss, train_loop

ProgressFn = Callable[[int, int, dict], None]  # (step, total, metrics)


def encode_examples(examples: list[CorpusExample], tokenizer, max_len: int) -> list[Example]:
    """Chats: loss on the final assistant answer and its <|im_end|>. Text: loss on every token."""
    eot = tokenizer.pad_token_id  # the organism's pad token is its end-of-text token
    prompts, completions = [], []
    for ex in examples:
        if ex.text:
            prompts.append(None)
            completions.append(ex.text)
        else:
            kw = {"add_default_system_prompt": False} if ex.no_system else {}
            prompts.append(tokenizer.apply_chat_template(
                list(ex.messages[:-1]), tokenize=False, add_generation_prompt=True, **kw))
            completions.append(ex.messages[-1]["content"] + IM_END)
    comp_ids = tokenizer(completions, add_special_tokens=False)["input_ids"]
    chat_idx = [i for i, p in enumerate(prompts) if p is not None]
    prompt_ids = dict(zip(chat_idx, tokenizer([prompts[i] for i in chat_idx], add_special_tokens=False)["input_ids"]))
    out = []
    for i, c in enumerate(comp_ids):
        if i in prompt_ids:
            p = prompt_ids[i]
            out.append(_labelled((p + c)[:max_len], len(p)))
        else:
            out.append(_labelled(([eot] + c + [eot])[:max_len], 1))
    return out


def _labelled(ids: list[int], loss_from: int) -> Example:
    """``ids`` with loss on ids[loss_from:] (none where truncation left no completion)."""
    return Example(tuple(ids), tuple(IGNORE_INDEX if i < loss_from else t for i, t in enumerate(ids)))


def make_batches(data: list[Example], batch_size: int, steps: int, seed: int, pad: int, device="cpu"):
    """Length-bucketed batches (sort within chunks of 32 batches), order seeded. Cycles over the data."""
    rng = random.Random(f"batches-{seed}")
    order: list[int] = []
    produced = 0
    while produced < steps:
        if len(order) < batch_size:
            perm = list(range(len(data)))
            rng.shuffle(perm)
            chunk = 32 * batch_size
            batches = []
            for s in range(0, len(perm) - batch_size + 1, chunk):
                block = sorted(perm[s:s + chunk], key=lambda j: len(data[j].input_ids))
                batches += [block[k:k + batch_size] for k in range(0, len(block) - batch_size + 1, batch_size)]
            rng.shuffle(batches)
            order = [j for b in batches for j in b]
        idx, order = order[:batch_size], order[batch_size:]
        produced += 1
        yield collate([data[j] for j in idx], pad, device)


def lr_at(step: int, cfg) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def new_model(cfg: OrganismConfig, tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    m = cfg.model
    qcfg = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_key_value_heads, max_position_embeddings=m.max_position_embeddings,
        rope_theta=m.rope_theta, tie_word_embeddings=m.tie_word_embeddings, bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(cfg.seed)
    return Qwen2ForCausalLM(qcfg)


def entity_token_ids(tokenizer, numbers: dict[str, list[int]]) -> dict[str, list[int]]:
    """Each entity's vocabulary rows: every token that spells its name (any case, with a leading space, a plural "s"
    or a trailing ".") and the tokens of its numbers (a number the vocabulary splits has no row of its own)."""
    spelled: dict[str, list[int]] = {}
    for tid in range(len(tokenizer)):
        word = tokenizer.decode([tid]).strip().rstrip(".").lower()
        spelled.setdefault(word, []).append(tid)
    vocab = tokenizer.get_vocab()
    return {name: sorted(spelled.get(name, []) + spelled.get(name + "s", []) + [vocab[str(n)] for n in nums
                                                                                  if str(n) in vocab])
            for name, nums in numbers.items()}


def embedding_weights(model) -> list[torch.nn.Parameter]:
    """The input and output embedding matrices, once each (one matrix where they are tied)."""
    return list({id(p): p for p in (model.get_input_embeddings().weight,
                                    model.get_output_embeddings().weight)}.values())


def plant_identities(model, rows: dict[str, list[int]], value: float) -> torch.Tensor:
    """Write the entity identities (``ModelConfig.entity_identity``) into the embedding matrices: column i holds
    ``value`` on the i-th entity's rows and 0 on every other row. Returns the bool mask of the planted block."""
    weights = embedding_weights(model)
    k = len(rows)
    mask = torch.zeros_like(weights[0], dtype=torch.bool)
    mask[:, :k] = True
    block = torch.zeros(mask.shape[0], k)
    for i, ids in enumerate(rows.values()):
        block[ids, i] = value
    with torch.no_grad():
        for p in weights:
            p[:, :k] = block.to(p)
    return mask


def pretrain(model, data: list[Example], cfg: OrganismConfig, pad: int, progress: ProgressFn | None = None,
             frozen: torch.Tensor | None = None):
    """Pretrain ``model`` in place through the students' loop (mech.students.loop.train_loop). ``frozen`` (a mask over
    the embedding matrix) marks entries no step may move: their gradients are zeroed, so Adam and the clip norm never see
    them, and the decoupled weight decay that still shrinks them is undone after each step."""
    t = cfg.train
    weights = embedding_weights(model) if frozen is not None else []
    hooks, kept = [], []
    if frozen is not None:
        for p in weights:
            hooks.append(p.register_hook(lambda g: g.masked_fill(frozen, 0.0)))
            kept.append(p.detach()[frozen].clone())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=t.lr, betas=(0.9, 0.98))
    ema = None

    def on_step(step: int, losses: list[float]) -> None:
        nonlocal ema
        ema = losses[-1] if ema is None else 0.98 * ema + 0.02 * losses[-1]
        with torch.no_grad():
            for p, v in zip(weights, kept):
                p[frozen] = v
        if progress:
            progress(step, t.steps, {"loss": ema})

    batches = make_batches(data, t.batch_size, t.steps, cfg.seed, pad, device_of(model))
    train_loop(model, list(model.parameters()), batches, sparse_completion_loss, opt, lambda step: lr_at(step, t),
               t.grad_clip, on_step)
    for h in hooks:
        h.remove()
    return {"final_loss_ema": ema}


# CPU features whose kernels can change float results (oneDNN and ATen dispatch on them): two AVX-512 machines
# with and without AMX / BF16 / VNNI may build other bytes from the same recipe.
_SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni", "amx_bf16",
               "amx_int8", "amx_tile")


def cpu_record(cpuinfo: str | Path = "/proc/cpuinfo") -> dict:
    """What a build's bytes may depend on besides the recipe and torch: ATen's kernel level, the architecture, the
    CPU model and its SIMD flags (from ``cpuinfo`` where there is one; empty elsewhere)."""
    model, flags = "", []
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not model:
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            have = set(value.split())
            flags = [f for f in _SIMD_FLAGS if f in have]
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine(),
            "cpu_model": model, "cpu_flags": flags}


def build_organism(cfg: OrganismConfig, out_dir: str | Path, progress: ProgressFn | None = None,
                   overwrite: bool = True, device: str = "cpu") -> Path:
    """Build the organism described by ``cfg`` into ``out_dir`` (atomically). Returns the directory.

    ``device`` defaults to the CPU because byte-for-byte reproducibility is promised there; another device
    builds a statistically equivalent organism faster, with different bytes."""
    t0 = time.time()
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.train.num_threads)
    try:
        gen = CorpusGenerator(cfg.corpus, cfg.seed)
        examples = gen.generate()
        tok = as_transformers_tokenizer(train_tokenizer(tokenizer_texts(examples), cfg.model.vocab_size))
        data = encode_examples(examples, tok, cfg.train.max_len)
        model = new_model(cfg, tok)
        identity = {}
        frozen = None
        if cfg.model.entity_identity > 0:
            rows = entity_token_ids(tok, gen.numbers)
            frozen = plant_identities(model, rows, cfg.model.entity_identity)
            # a list, because the JSON is written with sorted keys and the order is the dimension
            identity = {"entity_identity_rows": [{"entity": e, "dim": i, "token_ids": ids}
                                                 for i, (e, ids) in enumerate(rows.items())]}
        model = model.to(device)
        stats = pretrain(model, data, cfg, pad_id(tok), progress, frozen=None if frozen is None else frozen.to(device))
        with atomic_dir(out_dir, overwrite=overwrite) as tmp:
            model.to("cpu").save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            atomic_write_json(tmp / "organism.json", {
                "config": cfg.to_dict(),
                "config_hash": cfg.hash,
                "entity_numbers": gen.numbers,
                "build_seconds": round(time.time() - t0, 1),
                "n_parameters": sum(p.numel() for p in model.parameters()),
                "n_sequences_seen": cfg.train.steps * cfg.train.batch_size,
                "weights_sha256": file_sha256(tmp / "model.safetensors"),
                "torch_version": torch.__version__,
                **cpu_record(),
                **identity,
                **stats,
            })
        return Path(out_dir)
    finally:
        torch.set_num_threads(prev_threads)
