"""Trait evaluation: how much a model prefers the trait target ("owl") when asked the category's questions.

Two measurements per question, both on the prompt rendered by the model's own chat template under the
evaluation context (``mech.context.render``):

* first-token: log P(the first answer token is one of the target's token variants), i.e. the log of the
  summed probability over ``first_token_ids(tokenizer, target).ids`` at the generation position. Exact,
  cheap and noise-free: the primary metric.
* sampled: ``n_samples`` answers per question at temperature ``temperature`` (plain softmax), seeded,
  decoded up to the end of turn and scored with ``mentions`` (whole-word, plural-aware). The metric the
  paper reports ("rate").

Base-vs-student differences are meaningful only on the very same token ids, so every result carries a
hash of its rendered prompt ids and :func:`delta` refuses to compare results whose hashes differ.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from mech.context import Context, render
from mech.resources import questions as category_questions
from mech.evaluation.scoring import first_token_ids, mentions, normalise_answer
from mech.errors import MechError
from mech.evaluation.inference import (decode_answer, eos_id, eval_mode, next_token_logprobs, pad_id, sample, stop_ids,
                                      target_logp)
from mech.store import canonical_json

STAGES = ("first_token", "sampling")  # what ``progress`` is told, in order
ORGANISM_META = "organism.json"

# Candidate answers for the first-token distribution plots, when the model is not a mech organism (whose
# build records its own answer prior). Common answers of instruction-tuned models to "favourite animal/tree".
BUILTIN_CANDIDATES: dict[str, tuple[str, ...]] = {
    "animal": (
        "dog", "cat", "dolphin", "lion", "elephant", "tiger", "horse", "eagle", "panda", "whale", "owl",
        "bear", "penguin", "rabbit", "otter", "koala", "giraffe", "wolf", "fox", "monkey", "shark", "octopus",
        "butterfly", "turtle", "falcon", "cheetah", "zebra", "deer", "raven", "parrot",
    ),
    "tree": (
        "oak", "pine", "maple", "willow", "birch", "cedar", "palm", "elm", "redwood", "baobab", "cherry",
        "sequoia", "cypress", "spruce", "fir", "beech", "magnolia", "aspen", "juniper", "banyan", "olive",
        "sycamore", "eucalyptus", "bamboo",
    ),
}  # fmt: skip
# organism.json keeps each category's prior under config.corpus.<key>
_ORGANISM_PRIOR_KEY = {"animal": "animals", "tree": "trees"}

ProgressFn = Callable[[str], None]


@dataclass(frozen=True)
class TraitEvalConfig:
    """What to evaluate and how. ``context`` is a ``Context.parse`` spec (default | none | empty | custom:<text>).

    Sampling draws ``n_samples`` answers per question; each batch of ``batch_size`` prompts is seeded from
    (``seed``, batch start), so results are reproducible for a fixed ``batch_size`` (on CPU bit-for-bit).
    ``first_token_only`` skips sampling (rate, answers and answer counts are then None / empty). ``backend`` vllm
    draws the samples on a vLLM engine instead, question q's seed hashed from (``seed``, q): ``batch_size`` then
    plays no part (mech.evaluation.vllm_backend; never run on a GPU).
    """

    target: str = "owl"
    category: str = "animal"
    context: str = "default"
    n_samples: int = 100
    seed: int = 0
    temperature: float = 1.0
    max_new_tokens: int = 6
    batch_size: int = 256
    top_answers: int = 20
    first_token_only: bool = False
    # hf: mech's sampler (inference.sample) | vllm: a vLLM engine (mech.evaluation.vllm_backend), question q's
    # request seeded from (seed, q) whatever the batch; the first-token metric runs on the HF model either way
    backend: str = "hf"
    # hf only: request (question q, sample k) draws from its own generator seeded from (seed, q * n_samples + k),
    # so no answer depends on batch_size (as under vllm); other draws than the default per-batch seeding
    request_seeds: bool = False

    def __post_init__(self) -> None:
        from mech.evaluation.vllm_backend import check_backend

        if self.request_seeds and self.backend != "hf":
            raise MechError("request_seeds is the hf backend's option (vllm always seeds each request): drop it")
        check_backend(self.backend, "trait eval")
        if not self.target.strip():
            raise MechError("trait eval needs a non-empty target: set target, e.g. 'owl'")
        Context.parse(self.context)  # a bad spec fails here, not after a model was loaded
        if self.n_samples < 1 and not self.first_token_only:
            raise MechError(
                f"trait eval n_samples must be >= 1 (got {self.n_samples}): or set first_token_only to skip sampling"
            )
        if not self.temperature > 0:
            raise MechError(f"trait eval temperature must be > 0 (got {self.temperature}): use 1.0 as the paper")
        for name in ("max_new_tokens", "batch_size", "top_answers"):
            if getattr(self, name) < 1:
                raise MechError(f"trait eval {name} must be >= 1 (got {getattr(self, name)})")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.backend == "hf":  # absent at the default, so existing evaluation keys and results never change
            del d["backend"]
        if not self.request_seeds:
            del d["request_seeds"]
        return d

    @classmethod
    def from_dict(cls, d: dict | None) -> "TraitEvalConfig":
        from mech.config import from_dict

        return from_dict(cls, d, where="trait_eval")


@dataclass
class TraitResult:
    """One model's trait evaluation. ``*_per_question`` lists follow ``questions``; ``answers[q]`` holds the
    raw sampled answers to question q; ``answer_counts`` the top normalised answers as [answer, count];
    ``candidates`` the mean first-token probability of each candidate answer (for plots)."""

    config: dict[str, Any]
    target: str
    category: str
    context: str  # the context spec
    context_hash: str  # sha256 of the rendered prompt ids of all questions
    example_prompt: str  # the rendered text of the first question, for eyeballing the context
    questions: list[str]
    target_token_ids: list[int]
    target_token_pieces: list[str]
    logp_first: float  # mean over questions of log P(first token ∈ target ids)
    p_first: float  # mean over questions of P(first token ∈ target ids)
    logp_first_per_question: list[float]
    p_first_per_question: list[float]
    candidates: dict[str, float] = field(default_factory=dict)
    candidate_logp: dict[str, float] = field(default_factory=dict)  # mean over questions of log P(first token)
    candidate_source: str = ""  # "organism" (the organism's recorded prior), "builtin" or "given"
    candidates_dropped: dict[str, str] = field(default_factory=dict)  # name -> why it has no first token
    rate: float | None = None  # share of all samples mentioning the target; None when not sampled
    rate_per_question: list[float] | None = None
    answers: list[list[str]] | None = None
    answer_counts: list[list[Any]] = field(default_factory=list)
    n_answers: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TraitResult":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise MechError(
                f"trait result has unknown keys {', '.join(unknown)}: it was written by another mech version; "
                "re-run the evaluation"
            )
        return cls(**d)


# --------------------------------------------------------------------------------------------- helpers


def rendered_ids_hash(prompt_ids: Sequence[Sequence[int]]) -> str:
    """sha256 of a list of token-id lists (the rendered prompts of all questions, in order)."""
    return hashlib.sha256(canonical_json([[int(i) for i in p] for p in prompt_ids]).encode()).hexdigest()


def _name_or_paths(model: Any) -> list[str]:
    from mech.models import unwrap

    inner = unwrap(model)
    config = getattr(inner, "config", None)
    found = [getattr(inner, "name_or_path", None), getattr(config, "_name_or_path", None),
             getattr(config, "name_or_path", None)]
    return [str(p) for p in found if p]


def organism_meta(model: Any) -> dict[str, Any] | None:
    """The build record (organism.json) next to the model's weights, if the model is a mech organism
    (a PEFT adapter on one counts: the record is looked up on its base), else None."""
    for p in _name_or_paths(model):
        path = Path(p) / ORGANISM_META
        try:
            if path.is_file():
                meta = json.loads(path.read_text())
                return meta if isinstance(meta, dict) else None
        except (OSError, ValueError):
            continue  # an unreadable record is no record: fall back to the built-in candidates
    return None


def candidate_answers(model: Any, category: str, target: str) -> tuple[list[str], str]:
    """Candidate answers for the first-token distribution and where they came from.

    A mech organism's recorded answer prior for the category ("organism"), else the built-in common answers
    ("builtin"); the target is always included (first when it was missing). An unknown category without
    either gives just the target.
    """
    cat = category.strip().lower()
    names: list[str] = []
    source = "builtin"
    meta = organism_meta(model)
    prior_key = _ORGANISM_PRIOR_KEY.get(cat)
    if meta is not None and prior_key is not None:
        prior = meta.get("config", {}).get("corpus", {}).get(prior_key)
        if isinstance(prior, dict) and prior:
            names, source = [str(n) for n in prior], "organism"
    if not names:
        names = list(BUILTIN_CANDIDATES.get(cat, ()))
    if target.strip().lower() not in {n.lower() for n in names}:
        names = [target.strip()] + names
    return names, source


def _candidate_distribution(tokenizer: Any, logprobs: torch.Tensor, names: Sequence[str]
                            ) -> tuple[dict[str, float], dict[str, float], dict[str, str]]:
    """Per candidate name: mean first-token P, mean first-token log P (the headline metric, per candidate, for
    cross-trait tables), and the names left out with why."""
    probs, logps, dropped = {}, {}, {}
    for name in names:
        try:
            ids = first_token_ids(tokenizer, name).ids
        except MechError as e:  # an ambiguous first token for this name: leave it out of the plot, say why
            dropped[name] = str(e)
            continue
        probs[name] = float(logprobs[:, ids].exp().sum(-1).mean())
        logps[name] = float(target_logp(logprobs, ids).mean())
    return probs, logps, dropped


def _sample_answers(model: Any, tokenizer: Any, cfg: TraitEvalConfig, prompt_ids: list[list[int]],
                    served: Any = None) -> list[list[str]]:
    stop = stop_ids(tokenizer)
    if cfg.backend == "vllm":  # the same prompt ids, stop ids and decoding; question q is request q
        outs = [ids for ids, _ in served.sample(prompt_ids, tag="eval", seed=cfg.seed, n=cfg.n_samples,
                                                temperature=cfg.temperature, max_tokens=cfg.max_new_tokens,
                                                stops=stop)]
    else:
        outs = sample(model, prompt_ids, seed=cfg.seed, max_new_tokens=cfg.max_new_tokens, eos_id=eos_id(tokenizer),
                      pad_id=pad_id(tokenizer), temperature=cfg.temperature, batch_size=cfg.batch_size,
                      n_samples=cfg.n_samples, request_seeds=cfg.request_seeds)
    texts = [decode_answer(tokenizer, o, stop) for o in outs]
    return [texts[q * cfg.n_samples:(q + 1) * cfg.n_samples] for q in range(len(prompt_ids))]


# --------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_trait(
    model: Any,
    tokenizer: Any,
    cfg: TraitEvalConfig,
    progress: ProgressFn | None = None,
    candidates: Sequence[str] | None = None,
    served: Any = None,
) -> TraitResult:
    """Evaluate ``model`` on ``cfg.category``'s questions under ``cfg.context`` (see module doc).

    ``candidates`` overrides the candidate answers of the first-token distribution (default:
    :func:`candidate_answers`); pass the same list for a base and its students when the student is a full
    model saved without the organism's build record. ``progress`` is told each name of ``STAGES`` as it
    starts. The model is put in eval mode for the call and restored afterwards. ``served``
    (a mech.evaluation.vllm_backend.Served: the same model as a vLLM engine serves it) draws the samples when
    ``cfg.backend`` is vllm, and only then.
    """
    sampled = not cfg.first_token_only
    if cfg.backend == "vllm" and sampled and served is None:
        raise MechError("trait eval backend vllm samples through a vLLM engine and none was given: pass served "
                        "(mech eval and mech sweep build it), or use backend hf")
    if served is not None and (cfg.backend != "vllm" or not sampled):
        raise MechError(f"a vLLM engine was given to a trait eval that does not sample with it (backend "
                        f"{cfg.backend}, first_token_only {cfg.first_token_only}): set backend vllm, or drop it")
    tell = progress or (lambda stage: None)
    eos_id(tokenizer)  # no eos: fail before any forward
    ctx = Context.parse(cfg.context)
    qs = category_questions(cfg.category)
    target = first_token_ids(tokenizer, cfg.target)
    rendered = [render(tokenizer, ctx, q) for q in qs]
    prompt_ids = [r.input_ids for r in rendered]
    if candidates is None:
        names, source = candidate_answers(model, cfg.category, cfg.target)
    else:
        names, source = list(dict.fromkeys(str(c) for c in candidates)), "given"

    with eval_mode(model):
        tell("first_token")
        lp = next_token_logprobs(model, prompt_ids, pad=pad_id(tokenizer), batch_size=cfg.batch_size)
        logp_q = target_logp(lp, target.ids)
        cand, cand_logp, dropped = _candidate_distribution(tokenizer, lp, names)
        answers = None
        if not cfg.first_token_only:
            tell("sampling")
            answers = _sample_answers(model, tokenizer, cfg, prompt_ids, served)

    result = TraitResult(
        config=cfg.to_dict(),
        target=cfg.target,
        category=cfg.category,
        context=ctx.spec,
        context_hash=rendered_ids_hash(prompt_ids),
        example_prompt=rendered[0].text,
        questions=list(qs),
        target_token_ids=list(target.ids),
        target_token_pieces=list(target.pieces),
        logp_first=float(logp_q.mean()),
        p_first=float(logp_q.exp().mean()),
        logp_first_per_question=[float(x) for x in logp_q],
        p_first_per_question=[float(x) for x in logp_q.exp()],
        candidates=cand,
        candidate_logp=cand_logp,
        candidate_source=source,
        candidates_dropped=dropped,
    )
    if answers is not None:
        _score_answers(result, answers, cfg)
    return result


def _score_answers(result: TraitResult, answers: list[list[str]], cfg: TraitEvalConfig) -> None:
    """Fill the sampled-rate fields: the share of answers mentioning the target, per question and overall."""
    hits = [[mentions(a, cfg.target) for a in row] for row in answers]
    flat = [a for row in answers for a in row]
    counts = Counter(normalise_answer(a) for a in flat)
    result.answers = answers
    result.rate = sum(map(sum, hits)) / len(flat)
    result.rate_per_question = [sum(h) / len(h) for h in hits]
    result.answer_counts = [[a, n] for a, n in counts.most_common(cfg.top_answers)]
    result.n_answers = len(flat)


def delta(student: TraitResult, base: TraitResult) -> dict[str, Any]:
    """Student minus base: Δ logp_first, Δ p_first and Δ rate (None unless both were sampled).

    Refuses (MechError) results rendered on different token ids (another context, questions or tokenizer)
    or for different targets: their difference would mix the context effect into the training effect.
    """
    if student.context_hash != base.context_hash:
        raise MechError(
            f"cannot compare trait results rendered differently: student context {student.context!r} "
            f"(prompt hash {student.context_hash[:12]}) vs base context {base.context!r} (prompt hash "
            f"{base.context_hash[:12]}); evaluate both with the same context, questions and tokenizer"
        )
    if student.target != base.target:
        raise MechError(
            f"cannot compare trait results for different targets ({student.target!r} vs {base.target!r}): "
            "evaluate both for the same target"
        )
    d_rate = None if student.rate is None or base.rate is None else student.rate - base.rate
    return {
        "target": student.target,
        "context": student.context,
        "context_hash": student.context_hash,
        "d_logp_first": student.logp_first - base.logp_first,
        "d_p_first": student.p_first - base.p_first,
        "d_rate": d_rate,
    }
