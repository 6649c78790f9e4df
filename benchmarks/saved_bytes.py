"""Activation memory of a training step, measured on CPU: the bytes autograd saves for the backward, per token and
per decoder layer, for a LoRA and a full-FT student of a model with Qwen2.5-7B's shapes (random weights, bf16 base:
LoRA adapters and full-FT master weights in float32, as mech trains them), with and without activation
checkpointing. One layer's share is the difference of a 2- and a 1-layer model, the per-token share the
difference of two row lengths (so the bf16 casts of full-FT master weights, saved once a step, drop out).

    python benchmarks/saved_bytes.py [--tokens 128]

Weights (and views of them) are not counted. Under checkpointing the backward also
recomputes one layer at a time, holding that layer's activations (the unchecked per-layer figure, for the rows of
one micro-batch) while it runs. Not a timing: it runs anywhere in a minute or two.
"""

from __future__ import annotations

import argparse

import torch


def _model(layers: int):
    import transformers

    cfg = transformers.Qwen2Config(vocab_size=1000, hidden_size=3584, intermediate_size=18944,
                                   num_hidden_layers=layers, num_attention_heads=28, num_key_value_heads=4,
                                   max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()


def saved(layers: int, method: str, checkpointing: bool, tokens: int) -> float:
    from mech.students.config import LoraSpec, StudentConfig
    from mech.students.train import _checkpointing, _compute_precision, _trainable_copy

    base = _model(layers)
    cfg = StudentConfig(method=method, lora=LoraSpec(rank=8), gradient_checkpointing=checkpointing)
    model, _ = _trainable_copy(base, cfg)
    seen = {p.untyped_storage().data_ptr() for p in model.parameters()}
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return t

    ids = torch.randint(3, 1000, (1, tokens))
    model.train()
    with _compute_precision(base, cfg), _checkpointing(model, cfg), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return total


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=128)
    a = p.parse_args(argv)
    print("| student | checkpointing | KB saved per token and layer |")
    print("|---|---|---|")
    for method in ("lora", "full"):
        for ckpt in (False, True):
            layer = [saved(2, method, ckpt, t) - saved(1, method, ckpt, t) for t in (a.tokens, 2 * a.tokens)]
            print(f"| {method} | {'on' if ckpt else 'off'} | {(layer[1] - layer[0]) / a.tokens / 1024:.1f} |")


if __name__ == "__main__":
    main()
