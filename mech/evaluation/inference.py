"""Inference primitives, one of each: device, cache keyword, pad id, eval mode, left padding, the first-token
metric, batched next-token log-probs, the KV-cached decode loop, seeded sampling, answer decoding, and
teacher-forced completion distributions.

Contexts are rendered by the caller (mech.context), so a base-vs-student comparison always runs on the very
same token ids. Every other module (teacher sampling, trait evaluation, grafting, patching, the TransformerLens
bridge, the organism check, training) asks this module rather than writing its own copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
from typing import Any, Callable, Iterator, Sequence

import torch

from mech.context import model_name
from mech.errors import MechError
from mech.models import surgery

Ids = Sequence[int]
END_OF_TURN = "<|im_end|>"  # ChatML's end of turn; ends an answer even where eos is another token


# --------------------------------------------------------------------------------------------- model plumbing


def device_of(model: Any) -> torch.device:
    """The device of the model's first parameter (mech never splits one model over devices)."""
    return next(model.parameters()).device


def forward_kwargs(model: Any) -> set[str]:
    """The keywords the HF model's forward names, asked under any PEFT wrapper (whose forward takes ``**kwargs``)."""
    return set(inspect.signature(surgery.base_causal_lm(model).forward).parameters)


def cache_kwarg(model: Any) -> str:
    """The forward's KV-cache keyword: transformers 5.2x renamed ``past_key_values`` to ``cache``."""
    return "cache" if "cache" in forward_kwargs(model) else "past_key_values"


def last_logits_only(model: Any) -> dict[str, int]:
    """Forward keywords that compute logits at the last position only, where the model's forward can
    (``logits_to_keep``): a prefill otherwise unembeds every prompt position, which on a small model with a wide
    vocabulary costs more than all its layers. Empty for a forward without the keyword."""
    return {"logits_to_keep": 1} if "logits_to_keep" in forward_kwargs(model) else {}


def pad_id(tokenizer: Any) -> int:
    """The one pad policy: the tokenizer's pad token, else its eos token, else a MechError.

    Padded positions are masked out of attention and loss, so the id only has to be a valid token; falling back
    to eos is what HF generation does for models shipped without a pad token.
    """
    for tid in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(tid, int):
            return tid
    raise MechError(f"tokenizer of {model_name(tokenizer)} has neither a pad nor an eos token: set "
                    "tokenizer.pad_token")


def eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if not isinstance(eos, int):
        raise MechError(f"tokenizer of {model_name(tokenizer)} has no eos token: sampling cannot tell where an "
                        "answer ends; set tokenizer.eos_token (the end-of-turn token)")
    return eos


def stop_ids(tokenizer: Any) -> set[int]:
    """Tokens that end an answer: eos, and ChatML's end of turn where the vocabulary has it."""
    ids = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if isinstance(end, int) and end != getattr(tokenizer, "unk_token_id", None):
        ids.add(end)
    return ids


def decode_answer(tokenizer: Any, ids: Sequence[int], stops: set[int] | None = None) -> str:
    """The sampled tokens up to (not including) the first stop token, as text without special tokens."""
    stops = stop_ids(tokenizer) if stops is None else stops
    ids = list(ids)
    cut = next((i for i, t in enumerate(ids) if t in stops), len(ids))
    return tokenizer.decode(ids[:cut], skip_special_tokens=True)


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[Any]:
    """Run the block without dropout and give the model back in the mode it came in."""
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def left_pad(prompts: Sequence[Ids], pad: int, device: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ids, attention mask and position ids (positions count real tokens only)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
        attn[r, width - len(p):] = 1
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), attn.to(device), pos.to(device)


# --------------------------------------------------------------------------------------------- the metric


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log-softmax over the vocabulary, in float32 whatever the model's dtype."""
    return torch.log_softmax(logits.float(), dim=-1)


def target_logp(logprobs: torch.Tensor, target_ids: Sequence[int]) -> torch.Tensor:
    """log P(next token ∈ target_ids) from log-probs [..., vocab]: the log of the summed probability."""
    ids = [int(i) for i in getattr(target_ids, "ids", target_ids)]  # a scoring.FirstTokens or a list
    if not ids:
        raise MechError("no target token ids: pass the target's first-token ids "
                        "(mech.evaluation.scoring.first_token_ids)")
    return torch.logsumexp(logprobs[..., ids], dim=-1)


def first_token_logp(logits: torch.Tensor, target_ids: Sequence[int]) -> torch.Tensor:
    """The headline metric: log P(the first answer token is one of the target's token variants), from the
    logits at the generation position ([..., vocab] → [...]). Every result mech reports goes through here."""
    return target_logp(log_probs(logits), target_ids)


def mass(logprobs: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
    """Probability mass on a set of token ids, per row."""
    return logprobs[:, list(token_ids)].exp().sum(-1)


# --------------------------------------------------------------------------------------------- forwards


@torch.no_grad()
def next_token_logprobs(model: Any, prompts: Sequence[Ids], pad: int = 0, batch_size: int = 64) -> torch.Tensor:
    """log P(next token | prompt) for each prompt: a float32 CPU tensor [n_prompts, vocab]."""
    out, keep = [], last_logits_only(model)
    for s in range(0, len(prompts), batch_size):
        ids, attn, pos = left_pad(prompts[s:s + batch_size], pad, device_of(model))
        logits = model(input_ids=ids, attention_mask=attn, position_ids=pos, **keep).logits[:, -1]
        out.append(log_probs(logits).cpu())
    return torch.cat(out)


def per_token_kl(lp_p: Sequence[torch.Tensor], lp_q: Sequence[torch.Tensor]) -> float:
    """Mean over completion tokens of KL(P || Q) in nats, from log-distributions [tokens, vocab] per completion."""
    # 0·log(0/q) = 0: where P has no mass the term vanishes (avoids 0 × -inf = NaN)
    num = sum(float(torch.where(p.isneginf(), 0.0, p.exp() * (p - q)).sum()) for p, q in zip(lp_p, lp_q))
    return num / max(1, sum(p.shape[0] for p in lp_p))


@torch.no_grad()
def completion_logprobs(model: Any, prompts: Sequence[Ids], completions: Sequence[Ids], pad: int = 0,
                        batch_size: int = 32) -> list[torch.Tensor]:
    """Teacher-forced log-distributions at each completion token: one [len(completion), vocab] tensor each
    (row t is the distribution the token completion[t] was drawn from)."""
    out = []
    for s in range(0, len(prompts), batch_size):
        P, C = prompts[s:s + batch_size], completions[s:s + batch_size]
        ids, attn, pos = left_pad([list(p) + list(c) for p, c in zip(P, C)], pad, device_of(model))
        lp = log_probs(model(input_ids=ids, attention_mask=attn, position_ids=pos).logits).cpu()
        width = ids.shape[1]
        for r, c in enumerate(C):
            out.append(lp[r, width - len(c) - 1: width - 1])
    return out


Chooser = Callable[[torch.Tensor], torch.Tensor]  # last-position logits [rows, vocab] (float32, CPU) → next ids
# (last-position logits [rows, vocab], each row's tokens so far) → logits, before choosing (e.g. a grammar's mask)
Processor = Callable[[torch.Tensor, list[list[int]]], torch.Tensor]


def sampler(temperature: float, generator: torch.Generator) -> Chooser:
    """Plain softmax sampling at ``temperature`` (no top-k / top-p); 0 means greedy."""
    if temperature <= 0:
        return lambda logits: logits.argmax(-1)
    return lambda logits: torch.multinomial(torch.softmax(logits / temperature, -1), 1,
                                            generator=generator).squeeze(-1)


def request_seed(seed: int, index: int, tag: str = "request") -> int:
    """The seed of request ``index`` of a call seeded ``seed`` (``tag`` names the call's kind): a hash, so requests
    are independent streams and a request's draws depend on nothing else, e.g. not on the batch it runs in. 31
    bits: a torch seed, and one vLLM can add a request's sample index to (mech.evaluation.vllm_backend)."""
    digest = hashlib.sha256(f"mech.{tag}:{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:4], "big") >> 1


def request_sampler(temperature: float, generators: Sequence[torch.Generator]) -> Chooser:
    """:func:`sampler` with one generator per row (per-request seeds): row r draws from ``generators[r]`` only."""
    if temperature <= 0:
        return lambda logits: logits.argmax(-1)

    def choose(logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits / temperature, -1)
        return torch.cat([torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(generators)])

    return choose


@torch.no_grad()
def decode(model: Any, input_ids: torch.Tensor, *, max_new_tokens: int, choose: Chooser, pad: int,
           eos: int | None, attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
           after_step: Callable[[], None] | None = None, process: Processor | None = None,
           expand: torch.Tensor | None = None) -> list[list[int]]:
    """The KV-cached decode loop every generator in mech shares (sampling, teacher data, grafted generation).

    Each row's tokens end at ``eos`` (included); finished rows are fed ``pad`` and ignored. ``attention_mask`` /
    ``position_ids`` describe left-padded prompts and grow by one column a step. ``expand`` (long [rows]) maps
    each output row to the prompt row it continues: the prompts are prefilled once and their KV cache, last
    logits, mask and positions copied to the rows (many samples of one prompt pay for one prefill); None means one
    row per prompt. ``after_step`` runs after the first forward and each later one's token choice, before the
    next forward (grafting uses it to switch its masks from prompt positions to generated ones). ``process(logits,
    tokens so far)`` maps each step's float32 CPU logits before ``choose`` sees them (format-constrained teacher
    sampling masks them); None leaves them untouched.
    """
    dev, cache_kw, keep = device_of(model), cache_kwarg(model), last_logits_only(model)
    n_rows = input_ids.shape[0] if expand is None else len(expand)
    outs: list[list[int]] = [[] for _ in range(n_rows)]
    done = torch.zeros(n_rows, dtype=torch.bool)
    cur, pos, attn, past = input_ids, position_ids, attention_mask, None
    for step in range(max_new_tokens):
        extra = {k: v for k, v in (("attention_mask", attn), ("position_ids", pos)) if v is not None}
        o = model(input_ids=cur, use_cache=True, **{cache_kw: past}, **extra, **keep)
        past, last = getattr(o, cache_kw), o.logits[:, -1]
        if step == 0 and expand is not None:
            rows = expand.to(dev)
            past.reorder_cache(rows)  # index_select over the batch: the beam-search reorder, repeats allowed
            last = last[rows]
            pos = None if pos is None else pos[rows]
            attn = None if attn is None else attn[rows]
        logits = last.float().cpu()
        nxt = choose(logits if process is None else process(logits, outs))
        for r, toks in enumerate(outs):
            if not done[r]:
                toks.append(int(nxt[r]))
        if eos is not None:
            done |= nxt == eos
        if bool(done.all()):
            break
        cur = torch.where(done, torch.full_like(nxt, pad), nxt).unsqueeze(-1).to(dev)
        if pos is not None:
            pos = pos[:, -1:] + 1
        if attn is not None:
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=-1)  # finished rows are ignored
        if after_step is not None:
            after_step()
    return outs


def sample(model: Any, prompts: Sequence[Ids], *, seed: int, max_new_tokens: int, eos_id: int, pad_id: int,
           temperature: float = 1.0, batch_size: int = 64, process: Processor | None = None,
           n_samples: int = 1, request_seeds: bool = False, first_request: int = 0) -> list[list[int]]:
    """Ancestral sampling with a KV cache: ``n_samples`` answers per prompt, prompt-major (all of prompt 0's
    first). Requests (prompt, sample) run ``batch_size`` at a time with left padding; a batch prefills each of
    its distinct prompts once and continues every sample from that cache (``decode``'s ``expand``). Each batch
    draws from its own generator seeded from (seed, index of its first request): the same call gives the same
    tokens on CPU, the same as repeating each prompt ``n_samples`` times. ``request_seeds``: each request draws
    from its own generator (:func:`request_seed` of (seed, its index)) instead, so its answer does not depend on
    the batch size or its batch-mates (up to float rounding of padded batches), as vLLM's per-request seeds;
    other draws than the default's. ``first_request``: the index of this call's first request (a caller that
    splits one call into chunks keeps every request's seed). ``process``: see ``decode``."""
    if n_samples < 1:
        raise MechError(f"n_samples must be >= 1 (got {n_samples})")
    results: list[list[int]] = []
    dev, n_requests = device_of(model), len(prompts) * n_samples
    for s in range(0, n_requests, batch_size):
        owner = torch.arange(s, min(s + batch_size, n_requests)) // n_samples  # the prompt each request samples
        first = int(owner[0])
        ids, attn, pos = left_pad(prompts[first:int(owner[-1]) + 1], pad_id, dev)
        if request_seeds:
            choose = request_sampler(temperature, [torch.Generator(device="cpu").manual_seed(request_seed(seed, first_request + r))
                                                   for r in range(s, s + len(owner))])
        else:
            choose = sampler(temperature, torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + s))
        results += decode(model, ids, max_new_tokens=max_new_tokens, choose=choose, pad=pad_id,
                          eos=eos_id, attention_mask=attn, position_ids=pos, process=process,
                          expand=None if n_samples == 1 else owner - first)
    return results
