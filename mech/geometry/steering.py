"""Trait directions in the residual stream and the steering tests.

* **Steering vectors** per layer (the residual stream after decoder layer ℓ), as means over *answer positions*
  (the tokens of the assistant's number answer) of rendered (prompt, answer) rows:
  ``v_teacher[ℓ] = mean h_base(trait-prompted teacher context) − mean h_base(neutral teacher context)`` on the same
  rows, and ``v_student[ℓ] = mean h_student − mean h_base`` in the student's training context.
* **Readout direction** of the target: its unembedding row minus the mean row of the other candidate answers,
  multiplied by the final norm's gain (the direction in the residual stream that raises the target's logit
  relative to the other answers, up to the norm's per-token scale).
* **Alignment** of a module's write space with a direction: the share of the direction's energy inside the space
  (:func:`mech.geometry.linalg.captured`), against the same share for random unit directions (expectation k/d).
* **Steering tests**: sufficiency adds α·v to the residual after layer ℓ at every position and measures the
  target's first-token log-probability; necessity projects v̂ out of the residual after layer ℓ in two models
  (a student and its control) and compares their difference with and without the projection.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, Sequence

import torch

from mech.context import Context, render
from mech.context.labels import ASSISTANT
from mech.errors import MechError
from mech.evaluation.inference import (completion_logprobs, eval_mode, left_pad, next_token_logprobs, per_token_kl,
                                      target_logp)
from mech.evaluation.scoring import first_token_ids
from mech.evaluation.trait import TraitEvalConfig, TraitResult, evaluate_trait
from mech.geometry import linalg
from mech.models import surgery

Edit = Callable[[torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------- hooks


def _check_vector(model: Any, vector: torch.Tensor) -> torch.Tensor:
    d = int(surgery.unembedding_matrix(model).shape[1])
    v = torch.as_tensor(vector).detach().float().flatten()
    if v.numel() != d:
        raise MechError(f"steering vector has width {v.numel()}, the model's residual stream {d}: use a vector "
                        "computed on this base model")
    if not torch.isfinite(v).all():
        raise MechError("steering vector has non-finite entries: recompute it")
    return v


@contextlib.contextmanager
def edited(model: Any, layer: int, edit: Edit) -> Iterator[Any]:
    """Run the block with ``edit`` applied to the residual stream after decoder layer ``layer``."""
    handle = surgery.add_layer_output_hook(model, layer, edit)
    try:
        yield model
    finally:
        handle.remove()


def steered(model: Any, layer: int, vector: torch.Tensor, alpha: float) -> contextlib.AbstractContextManager:
    """``h ← h + α·v`` after layer ``layer``, at every position."""
    if not math.isfinite(alpha):
        raise MechError(f"steering coefficient α = {alpha} is not finite: pass a finite number")
    v = _check_vector(model, vector)
    return edited(model, layer, lambda h: h + (alpha * v).to(h.device, h.dtype))


def projected_out(model: Any, layer: int, vector: torch.Tensor) -> contextlib.AbstractContextManager:
    """``h ← h − (h·v̂) v̂`` after layer ``layer``, at every position."""
    v = linalg.unit(_check_vector(model, vector))

    def edit(h: torch.Tensor) -> torch.Tensor:
        u = v.to(h.device, h.dtype)
        return h - (h @ u).unsqueeze(-1) * u

    return edited(model, layer, edit)


# --------------------------------------------------------------------------------------------- steering vectors


def answer_rows(tokenizer: Any, rows: Sequence[tuple[str, str]], context: str) -> list[tuple[list[int], list[int]]]:
    """(ids, answer positions) of each (user prompt, assistant answer) rendered in ``context``."""
    ctx = Context.parse(context)
    out = []
    for user, answer in rows:
        r = render(tokenizer, ctx, user, answer)
        pos = r.positions(ASSISTANT)
        if not pos:
            raise MechError(f"answer {answer!r} renders to no assistant tokens: pass non-empty answers")
        out.append((r.input_ids, pos))
    return out


@torch.no_grad()
def mean_residuals(model: Any, rendered: Sequence[tuple[list[int], list[int]]], pad: int,
                   batch_size: int = 32) -> torch.Tensor:
    """Mean residual stream [n_layers, d] after every decoder layer over all answer positions of all rows."""
    n = surgery.num_layers(model)
    total: torch.Tensor | None = None
    count = 0
    captured: list[torch.Tensor] = [torch.empty(0)] * n

    def grab(i: int) -> Edit:
        def edit(h: torch.Tensor) -> None:
            captured[i] = h.detach().float()
        return edit  # type: ignore[return-value]

    handles = [surgery.add_layer_output_hook(model, i, grab(i)) for i in range(n)]
    try:
        with eval_mode(model):
            for s in range(0, len(rendered), batch_size):
                chunk = rendered[s:s + batch_size]
                ids, attn, pos = left_pad([c[0] for c in chunk], pad, next(model.parameters()).device)
                model(input_ids=ids, attention_mask=attn, position_ids=pos)
                width = ids.shape[1]
                rows = torch.tensor([r for r, c in enumerate(chunk) for _ in c[1]])
                cols = torch.tensor([width - len(c[0]) + p for c in chunk for p in c[1]])
                acts = torch.stack([h[rows, cols].cpu() for h in captured])  # [layers, tokens, d]
                total = acts.sum(1) if total is None else total + acts.sum(1)
                count += acts.shape[1]
    finally:
        for h in handles:
            h.remove()
    if total is None:
        raise MechError("no rows to average: pass at least one (prompt, answer) row")
    return total / count


def teacher_vectors(base: Any, tokenizer: Any, rows: Sequence[tuple[str, str]], trait_context: str,
                    neutral_context: str, pad: int) -> torch.Tensor:
    """v_teacher [n_layers, d]: trait-prompted minus neutral context, the base model reading the same answers."""
    return (mean_residuals(base, answer_rows(tokenizer, rows, trait_context), pad)
            - mean_residuals(base, answer_rows(tokenizer, rows, neutral_context), pad))


def added_vectors(base: Any, tokenizer: Any, rows: Sequence[tuple[str, str]], context: str, layer: int,
                  added: torch.Tensor, pad: int) -> torch.Tensor:
    """v_teacher [n_layers, d] of a steered teacher: the base with ``added`` summed in after ``layer`` minus the
    base, on the same rows in ``context`` (zero before ``layer``, ``added`` itself at it)."""
    rendered = answer_rows(tokenizer, rows, context)
    with steered(base, layer, added, 1.0):
        on = mean_residuals(base, rendered, pad)
    return on - mean_residuals(base, rendered, pad)


def student_vectors(base: Any, student: Any, tokenizer: Any, rows: Sequence[tuple[str, str]], context: str,
                    pad: int, base_means: torch.Tensor | None = None) -> torch.Tensor:
    """v_student [n_layers, d]: the student minus its base on the same rendered rows (``base_means`` reuses the
    base's :func:`mean_residuals` on these rows)."""
    rendered = answer_rows(tokenizer, rows, context)
    b = base_means if base_means is not None else mean_residuals(base, rendered, pad)
    return mean_residuals(student, rendered, pad) - b


def readout_direction(model: Any, tokenizer: Any, target: str, candidates: Sequence[str]) -> torch.Tensor:
    """γ ⊙ (mean unembedding row of the target's first tokens − mean over the other candidates' first tokens)."""
    W = surgery.unembedding_matrix(model)
    tgt = list(first_token_ids(tokenizer, target).ids)
    others: list[int] = []
    for c in candidates:
        if c.strip().lower() == target.strip().lower():
            continue
        try:
            others += [i for i in first_token_ids(tokenizer, c).ids if i not in tgt]
        except MechError:  # a candidate without a usable first token is left out, as in the trait evaluation
            continue
    rel = W[tgt].mean(0) - (W[sorted(set(others))].mean(0) if others else 0.0)
    return surgery.final_norm_gain(model).cpu() * rel


# --------------------------------------------------------------------------------------------- prompt vs vector


def answer_logprobs(model: Any, rendered: Sequence[tuple[list[int], list[int]]], pad: int) -> list[torch.Tensor]:
    """Teacher-forced log-distributions [answer tokens, vocab] from which each row's answer tokens are read."""
    prompts, answers = [], []
    for ids, pos in rendered:
        if pos != list(range(pos[0], pos[-1] + 1)):
            raise MechError("the answer's tokens are not one contiguous span: render single-turn rows")
        prompts.append(ids[:pos[0]])
        answers.append(ids[pos[0]:pos[-1] + 1])
    with eval_mode(model):
        return completion_logprobs(model, prompts, answers, pad=pad)


def prompt_approximation(base: Any, tokenizer: Any, rows: Sequence[tuple[str, str]], trait_context: str,
                         neutral_context: str, layer: int, vector: torch.Tensor, alphas: Sequence[float],
                         pad: int) -> list[dict[str, float]]:
    """How well steering stands in for the trait prompt (Blank et al.): per α, the mean per-token KL(P_prompt ‖
    P_steered) over the answer tokens of ``rows``, P_prompt the base under ``trait_context`` and P_steered the base in
    ``neutral_context`` with α·v added after ``layer`` (α = 0: the neutral context unsteered, the divergence a
    vector has to remove)."""
    for a in alphas:
        if not math.isfinite(a):
            raise MechError(f"steering coefficient α = {a} is not finite: pass finite alphas")
    _check_vector(base, vector)
    reference = answer_logprobs(base, answer_rows(tokenizer, rows, trait_context), pad)
    neutral = answer_rows(tokenizer, rows, neutral_context)
    out = []
    for a in alphas:
        with steered(base, layer, vector, a) if a != 0 else contextlib.nullcontext():
            out.append({"alpha": float(a), "kl": per_token_kl(reference, answer_logprobs(base, neutral, pad))})
    return out


# --------------------------------------------------------------------------------------------- alignment


def alignment_null(d: int, k: int, n: int, generator: torch.Generator) -> dict[str, float]:
    """The captured share of ``n`` random unit directions in a fixed k-subspace of R^d (rotation invariance lets
    the subspace be the first k coordinates): mean (→ k/d) and the 95th percentile."""
    dirs = linalg.random_directions(d, n, generator)
    shares = dirs[:, :k].pow(2).sum(-1)
    return {"null_mean": float(shares.mean()), "null_q95": float(torch.quantile(shares, 0.95)), "chance": k / d}


# --------------------------------------------------------------------------------------------- the metric


def question_prompts(tokenizer: Any, questions: Sequence[str], context: str) -> list[list[int]]:
    ctx = Context.parse(context)
    return [render(tokenizer, ctx, q).input_ids for q in questions]


def target_logps(model: Any, prompts: Sequence[Sequence[int]], target_ids: Sequence[int], pad: int) -> torch.Tensor:
    """The first-token log P(target) per prompt (mech.evaluation.inference's one metric)."""
    with eval_mode(model):
        return target_logp(next_token_logprobs(model, prompts, pad=pad), target_ids)


def sufficiency(model: Any, prompts: Sequence[Sequence[int]], target_ids: Sequence[int], pad: int, layer: int,
                vector: torch.Tensor, alphas: Sequence[float], reference: float | None = None) -> list[dict[str, float]]:
    """Per α: mean first-token log P(target) with α·v added after ``layer``, and its Δ vs the unsteered model
    (``reference``: that model's mean, when the caller has it). α = 0 is the unsteered model by definition."""
    for a in alphas:
        if not math.isfinite(a):
            raise MechError(f"steering coefficient α = {a} is not finite: pass finite alphas")
    _check_vector(model, vector)
    ref = float(target_logps(model, prompts, target_ids, pad).mean()) if reference is None else reference
    out = []
    for a in alphas:
        if a == 0:
            m = ref
        else:
            with steered(model, layer, vector, a):
                m = float(target_logps(model, prompts, target_ids, pad).mean())
        out.append({"alpha": float(a), "logp": m, "delta": m - ref})
    return out


def necessity(model: Any, control: Any, prompts: Sequence[Sequence[int]], target_ids: Sequence[int], pad: int,
              layer: int, vector: torch.Tensor, reference: float | None = None) -> dict[str, float]:
    """The effect ``m(model) − m(control)`` with and without v̂ projected out after ``layer`` in both
    (``reference``: the effect without projection, when the caller has it)."""
    effect = reference if reference is not None else float(
        (target_logps(model, prompts, target_ids, pad) - target_logps(control, prompts, target_ids, pad)).mean())
    with projected_out(model, layer, vector), projected_out(control, layer, vector):
        ablated = float((target_logps(model, prompts, target_ids, pad)
                         - target_logps(control, prompts, target_ids, pad)).mean())
    return {"effect": effect, "effect_projected": ablated, "removed": effect - ablated}


def steered_trait(model: Any, tokenizer: Any, cfg: TraitEvalConfig, layer: int, vector: torch.Tensor, alpha: float,
                  candidates: Sequence[str] | None = None) -> TraitResult:
    """The trait evaluation (first-token metric and sampled rate, mech.evaluation.trait) with α·v added after
    ``layer``; α = 0 evaluates the model as it is."""
    if alpha == 0:
        return evaluate_trait(model, tokenizer, cfg, candidates=candidates)
    with steered(model, layer, vector, alpha):
        return evaluate_trait(model, tokenizer, cfg, candidates=candidates)
