"""Model-side measurements on rendered token ids: next-token distributions, seeded sampling, and
teacher-forced completion distributions. Contexts are rendered by the caller (mech.context), so a
base-vs-student comparison always runs on the very same token ids.
"""

from __future__ import annotations

from typing import Sequence

import torch

Ids = Sequence[int]


def _cache_kw(model) -> str:
    """transformers 5.2x renamed ``past_key_values`` to ``cache``; accept either so hub-era and local
    installs (e.g. a GPU box with an older 5.x) run the same code."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _left_pad(prompts: Sequence[Ids], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        attn[r, width - len(p):] = 1
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), attn.to(device), pos.to(device)


@torch.no_grad()
def next_token_logprobs(model, prompts: Sequence[Ids], pad_id: int = 0, batch_size: int = 64) -> torch.Tensor:
    """log P(next token | prompt) for each prompt: a float32 CPU tensor [n_prompts, vocab]."""
    out = []
    for s in range(0, len(prompts), batch_size):
        ids, attn, pos = _left_pad(prompts[s:s + batch_size], pad_id, _device(model))
        logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, -1]
        out.append(torch.log_softmax(logits.float(), -1).cpu())
    return torch.cat(out)


def mass(logprobs: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
    """Probability mass on a set of token ids, per row."""
    return logprobs[:, list(token_ids)].exp().sum(-1)


@torch.no_grad()
def sample(model, prompts: Sequence[Ids], *, seed: int, max_new_tokens: int, eos_id: int, pad_id: int,
           temperature: float = 1.0, batch_size: int = 64) -> list[list[int]]:
    """Ancestral sampling with a KV cache, plain softmax at ``temperature`` (no top-k/top-p), batched with
    left padding. Each batch draws from its own generator seeded from (seed, batch start): the same call
    gives the same tokens on CPU."""
    results: list[list[int]] = []
    dev = _device(model)
    for s in range(0, len(prompts), batch_size):
        ids, attn, pos = _left_pad(prompts[s:s + batch_size], pad_id, dev)
        gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + s)
        done = torch.zeros(ids.shape[0], dtype=torch.bool)
        outs = [[] for _ in range(ids.shape[0])]
        past = None
        cache_kw = _cache_kw(model)
        cur_ids, cur_pos = ids, pos
        for _ in range(max_new_tokens):
            o = model(input_ids=cur_ids, attention_mask=attn, position_ids=cur_pos, use_cache=True,
                      **{cache_kw: past})
            past = getattr(o, cache_kw)
            probs = torch.softmax(o.logits[:, -1].float().cpu() / temperature, -1)
            nxt = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
            for r in range(len(outs)):
                if not done[r]:
                    outs[r].append(int(nxt[r]))
            done |= nxt == eos_id
            if bool(done.all()):
                break
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            cur_ids = nxt.unsqueeze(-1).to(dev)
            cur_pos = cur_pos[:, -1:] + 1
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=-1)  # finished rows are ignored
        results += outs
    return results


@torch.no_grad()
def completion_logprobs(model, prompts: Sequence[Ids], completions: Sequence[Ids], pad_id: int = 0,
                        batch_size: int = 32) -> list[torch.Tensor]:
    """Teacher-forced log-distributions at each completion token: one [len(completion), vocab] tensor each
    (row t is the distribution the token completion[t] was drawn from)."""
    out = []
    for s in range(0, len(prompts), batch_size):
        P, C = prompts[s:s + batch_size], completions[s:s + batch_size]
        full = [list(p) + list(c) for p, c in zip(P, C)]
        ids, attn, pos = _left_pad(full, pad_id, _device(model))
        logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits.float()
        lp = torch.log_softmax(logits, -1).cpu()
        width = ids.shape[1]
        for r, c in enumerate(C):
            out.append(lp[r, width - len(c) - 1: width - 1])
    return out
