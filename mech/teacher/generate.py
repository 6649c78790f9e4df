"""Teacher number data: sample answers to Cloud et al.'s number prompts in the teacher's context, filter them.

The teacher is the base model in a context: a *trait* teacher (``target`` set) answers under the trait
system prompt (``trait_system_prompt(target, category)``, a custom context); the *neutral* teacher
(``target=None``) answers under ``context`` (``default``: whatever the chat template inserts). A trait teacher of
``kind="finetuned"`` has no trait prompt: it is the base with the trait trained into a LoRA
(mech.teacher.finetuned), answering under ``context`` like the neutral teacher; one of ``kind="steer"`` is the
base with a vector added to its residual stream (mech.teacher.steered), likewise in ``context``. Only the
user prompt and the answer go into the rows: the teacher's system prompt is recorded in ``dataset.json``
(as exact token ids with segment labels) and never in the training data.

Seeding: prompts come from ``generate_prompts(n_prompts, prompt_seed)``. Sampling runs in chunks of
``batch_size`` prompts, one ``mech.evaluation.inference.sample`` call per chunk seeded by :func:`chunk_seed`
``(sample_seed, chunk start)``, so the answers are a function of the config alone (given the model and the
device); a chunk is also the unit of ``progress``. Because one generator serves a whole batch, an answer
depends on its batch: ``batch_size`` is part of the config and changes the samples.

``backend="vllm"`` samples through a vLLM engine instead (mech.evaluation.vllm_backend, GPU only): prompt ``i`` is
request ``i``, seeded from (``sample_seed``, ``i``), so ``batch_size`` changes nothing there and leaves the key; the
constrained teacher's grammar goes in as a regex (``number_regex``). Finetuned and steered teachers run on HF only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mech.context import Context, render
from mech.teacher.constrained import number_grammar, number_regex
from mech.teacher.dataset import check_free, make_row, write_dataset
from mech.teacher.filter import check_answer, filter_rows
from mech.teacher.finetuned import finetune_teacher
from mech.teacher.steered import VECTORS, steer_teacher
from mech.teacher.prompts import NumberPrompt, NumberPromptConfig, generate_prompts
from mech.resources import questions, trait_system_prompt
from mech.errors import MechError
from mech.evaluation.inference import decode_answer, eos_id, eval_mode, pad_id, sample, stop_ids
from mech.models import model_fingerprint

ProgressFn = Callable[[int, int], None]

KIND_TEACHER = "teacher"
KIND_PROMPT, KIND_FINETUNED, KIND_STEER = "prompt", "finetuned", "steer"
TEACHER_KINDS = (KIND_PROMPT, KIND_FINETUNED, KIND_STEER)
_FINETUNE_FIELDS = ("finetune_rank", "finetune_epochs", "finetune_lr")
_STEER_FIELDS = ("steer_vector", "steer_layer", "steer_alpha", "steer_alphas", "steer_min_pass", "steer_pilot")
MAX_PROMPTS = 10_000_000  # far beyond any real run; more is a typo that would sample for weeks
VLLM_CHUNK = 4096  # prompts per vLLM call: the unit of progress only (a request's seed is its index)


@dataclass(frozen=True)
class TeacherConfig:
    """What a teacher dataset is made of; every field changes the data (``batch_size`` included)."""

    target: str | None = None  # the trait (e.g. "owl"); None: the neutral teacher
    category: str = "animal"
    context: str = "default"  # the neutral teacher's context spec (mech.context.Context.parse)
    n_prompts: int = 2000
    prompt_seed: int = 0
    sample_seed: int = 0
    max_new_tokens: int = 48
    batch_size: int = 64
    temperature: float = 1.0
    answer_count: int = 10
    max_value: int = 999
    banned: tuple[int, ...] = ()
    constrained: bool = False  # sample through mech.teacher.constrained's format mask (a deviation from the paper)
    # prompt: the trait is a system prompt; finetuned: no trait prompt, the trait is a LoRA trained on the
    # favourite questions (mech.teacher.finetuned), of this rank, epochs and lr, and the teacher writes in `context`;
    # steer: no trait prompt, α·v added after a layer while writing in `context` (mech.teacher.steered)
    kind: str = KIND_PROMPT
    finetune_rank: int = 8
    finetune_epochs: int = 8
    finetune_lr: float = 2e-3
    steer_vector: str = "prompt"  # prompt: the trait prompt's mean shift at the layer | random: a random direction
    steer_layer: int | None = None  # the residual after this decoder layer; None: n_layers // 2
    steer_alpha: float | None = None  # None: searched over steer_alphas
    steer_alphas: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
    steer_min_pass: float = 0.8  # the search keeps the pilot pass rate >= this × the unsteered one
    steer_pilot: int = 64  # pilot prompts: the rows the prompt vector is read on, and the pass rates of the search
    backend: str = "hf"  # hf: mech.evaluation.inference.sample | vllm: a vLLM engine (mech.evaluation.vllm_backend)
    # hf only: prompt i draws from its own generator seeded from (sample_seed, i), so no answer depends on
    # batch_size (as under vllm); other draws than the default per-batch seeding
    request_seeds: bool = False

    def __post_init__(self) -> None:
        from mech.evaluation.vllm_backend import check_backend

        questions(self.category)  # unknown category -> MechError listing the known ones
        if self.kind not in TEACHER_KINDS:
            raise MechError(f"unknown teacher kind {self.kind!r}: expected one of {', '.join(TEACHER_KINDS)}")
        if self.request_seeds and self.backend != "hf":
            raise MechError("request_seeds is the hf backend's option (vllm always seeds each request): drop it")
        check_backend(self.backend, "teacher")
        if self.backend == "vllm" and self.kind != KIND_PROMPT:
            raise MechError(f"a {self.kind} teacher samples through HF hooks and adapters made in memory, which the "
                            "vllm backend has not: use backend hf for it")
        if self.kind == KIND_FINETUNED:
            if self.target is None:
                raise MechError("a finetuned teacher needs a target (the neutral teacher is the base model): set "
                                "target, or kind: prompt for the neutral teacher")
            if self.finetune_rank < 1 or self.finetune_epochs < 1 or not self.finetune_lr > 0:
                raise MechError(f"finetuned teacher: finetune_rank and finetune_epochs must be >= 1 and finetune_lr "
                                f"> 0 (got {self.finetune_rank}, {self.finetune_epochs}, {self.finetune_lr})")
        if self.kind == KIND_STEER:
            self._check_steer()
        if self.target is not None:
            trait_system_prompt(self.target, self.category)  # empty target -> MechError
            if self.context != "default" and self.kind == KIND_PROMPT:
                raise MechError(
                    f"teacher config sets both target={self.target!r} and context={self.context!r}: a trait "
                    "teacher's context is its trait prompt; drop context, or set target to null for a neutral "
                    "teacher in that context"
                )
        Context.parse(self.context)
        for name in ("n_prompts", "max_new_tokens", "batch_size", "answer_count"):
            if getattr(self, name) < 1:
                raise MechError(f"teacher {name} must be at least 1, got {getattr(self, name)}")
        if self.n_prompts > MAX_PROMPTS:
            raise MechError(f"teacher n_prompts must be at most {MAX_PROMPTS:,}, got {self.n_prompts:,}: "
                            "lower teacher.n_prompts")
        if not self.temperature > 0:
            raise MechError(f"teacher temperature must be > 0, got {self.temperature}")
        if self.max_value < 0:
            raise MechError(f"teacher max_value must be >= 0, got {self.max_value}")
        # one canonical form, so equal configs hash equally however banned was written
        object.__setattr__(self, "banned", tuple(sorted({int(b) for b in self.banned})))

    def _check_steer(self) -> None:
        import math

        if self.target is None:
            raise MechError("a steered teacher needs a target (its prompt vector, or the norm of its random one): set "
                            "target, or kind: prompt for the neutral teacher")
        if self.steer_vector not in VECTORS:
            raise MechError(f"unknown steer_vector {self.steer_vector!r}: expected one of {', '.join(VECTORS)}")
        alphas = tuple(float(a) for a in self.steer_alphas)
        if self.steer_alpha is not None and not math.isfinite(float(self.steer_alpha)):
            raise MechError(f"steer_alpha = {self.steer_alpha} is not finite: pass a finite number, or null to search")
        if self.steer_alpha is None and (not alphas or not all(math.isfinite(a) and a > 0 for a in alphas)
                                         or list(alphas) != sorted(set(alphas))):
            raise MechError(f"steer_alphas must be positive finite numbers in ascending order, got "
                            f"{self.steer_alphas!r}")
        if not 0 < self.steer_min_pass <= 1:
            raise MechError(f"steer_min_pass must be in (0, 1], got {self.steer_min_pass}")
        if self.steer_pilot < 1:
            raise MechError(f"steer_pilot must be at least 1, got {self.steer_pilot}")
        object.__setattr__(self, "steer_alphas", alphas)

    def teacher_context(self) -> Context:
        if self.target is not None and self.kind == KIND_PROMPT:
            return Context("custom", trait_system_prompt(self.target, self.category))
        return Context.parse(self.context)

    def prompt_config(self) -> NumberPromptConfig:
        """The prompts ask for what the filter accepts; with the defaults this is the default generator."""
        return NumberPromptConfig(answer_count=self.answer_count, answer_max_digits=len(str(self.max_value)))

    def prompts(self) -> list[NumberPrompt]:
        return generate_prompts(self.n_prompts, self.prompt_seed, self.prompt_config())

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["banned"] = list(self.banned)
        if not self.constrained:  # absent when off, so the keys and dataset.json of unconstrained data never change
            del d["constrained"]
        # likewise: a teacher's key and dataset.json hold only its own kind's fields, so a prompt teacher's are as
        # before kinds existed and a finetuned teacher's as before steering
        drop = {KIND_PROMPT: ("kind", *_FINETUNE_FIELDS, *_STEER_FIELDS), KIND_FINETUNED: _STEER_FIELDS,
                KIND_STEER: _FINETUNE_FIELDS}[self.kind]
        for name in drop:
            del d[name]
        if self.kind == KIND_STEER:
            d["steer_alphas"] = list(self.steer_alphas)
        if self.backend == "hf":  # absent at the default, so existing keys and dataset.json never change
            del d["backend"]
        if not self.request_seeds:
            del d["request_seeds"]
        if self.backend == "vllm" or self.request_seeds:
            # a request's seed is its prompt's index: the batch size changes no answer, so it is no key
            del d["batch_size"]
        return d


def chunk_seed(sample_seed: int, start: int) -> int:
    """The seed of the chunk of prompts starting at ``start``: a hash, so chunks are independent streams.

    32 bits: ``sample`` seeds its generator with ``seed * 1_000_003 + batch start``, which must fit torch's
    64-bit seed range.
    """
    digest = hashlib.sha256(f"mech.teacher-sample:{int(sample_seed)}:{int(start)}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def _sample_vllm(tokenizer: Any, cfg: TeacherConfig, prompt_ids: list[list[int]], served: Any,
                 progress: ProgressFn | None) -> tuple[list[str], list[bool]]:
    stops = stop_ids(tokenizer)
    regex = number_regex(cfg.answer_count, cfg.max_value) if cfg.constrained else None
    answers: list[str] = []
    finished: list[bool] = []
    total = len(prompt_ids)
    for start in range(0, total, VLLM_CHUNK):
        outs = served.sample(prompt_ids[start:start + VLLM_CHUNK], tag="teacher", seed=cfg.sample_seed, n=1,
                             temperature=cfg.temperature, max_tokens=cfg.max_new_tokens, stops=stops, regex=regex,
                             first_index=start)
        answers += [decode_answer(tokenizer, ids, stops) for ids, _ in outs]
        finished += [done for _, done in outs]
        if progress is not None:
            progress(min(start + VLLM_CHUNK, total), total)
    return answers, finished


def sample_answers(
    model: Any, tokenizer: Any, cfg: TeacherConfig, prompt_ids: list[list[int]], progress: ProgressFn | None = None,
    served: Any = None,
) -> tuple[list[str], list[bool]]:
    """Decoded answers and whether each ended with eos (False: cut off at ``max_new_tokens``). With ``cfg.backend``
    vllm, ``served`` (a mech.evaluation.vllm_backend.Served of the base) samples them."""
    if cfg.backend == "vllm":
        if served is None:
            raise MechError("teacher backend vllm samples through a vLLM engine and none was given: pass served "
                            "(mech teacher and mech sweep build it), or use backend hf")
        return _sample_vllm(tokenizer, cfg, prompt_ids, served, progress)
    eos, pad = eos_id(tokenizer), pad_id(tokenizer)
    stops = stop_ids(tokenizer)
    process = number_grammar(tokenizer, cfg.answer_count, cfg.max_value) if cfg.constrained else None
    answers: list[str] = []
    finished: list[bool] = []
    total = len(prompt_ids)
    with eval_mode(model):
        for start in range(0, total, cfg.batch_size):
            outs = sample(
                model,
                prompt_ids[start : start + cfg.batch_size],
                seed=cfg.sample_seed if cfg.request_seeds else chunk_seed(cfg.sample_seed, start),
                request_seeds=cfg.request_seeds,
                first_request=start,
                max_new_tokens=cfg.max_new_tokens,
                eos_id=eos,
                pad_id=pad,
                temperature=cfg.temperature,
                batch_size=cfg.batch_size,
                process=process,
            )
            answers += [decode_answer(tokenizer, o, stops) for o in outs]
            finished += [any(t in stops for t in o) for o in outs]
            if progress is not None:
                progress(min(start + cfg.batch_size, total), total)
    return answers, finished


def tokenizer_info(tokenizer: Any) -> dict[str, Any]:
    return {
        "name_or_path": str(getattr(tokenizer, "name_or_path", "") or ""),
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def generate(
    model: Any,
    tokenizer: Any,
    cfg: TeacherConfig,
    out_dir: str | os.PathLike,
    progress: ProgressFn | None = None,
    overwrite: bool = False,
    served: Any = None,
) -> Path:
    """Sample, filter and write a teacher dataset to ``out_dir`` (atomically); returns ``out_dir``.

    Raises MechError (writing nothing) when the filter keeps no row, showing the audit. ``progress(done,
    total)`` is called after each sampled chunk. ``dataset.json`` holds ``kind`` "teacher", the config, the
    teacher's context spec and its rendering of the first prompt (``rendered_context``: token ids, text,
    segment labels, incl. an auto-inserted default system prompt), the tokenizer and the model fingerprint.
    Raw rows also carry ``finished`` (False: the answer was cut off at ``max_new_tokens``; the filter still
    judges the text as it is, as Cloud et al.'s does). ``served``: the base as a vLLM engine serves it, for
    ``cfg.backend`` vllm (mech.evaluation.vllm_backend.Served).
    """
    check_free(out_dir, overwrite)
    fingerprint = model_fingerprint(model)  # the base's: a finetuned teacher is made from it, here
    finetuned = steered = None
    if cfg.kind == KIND_FINETUNED:
        model, finetuned = finetune_teacher(model, tokenizer, cfg)
    ctx = cfg.teacher_context()
    prompts = cfg.prompts()
    rendered = [render(tokenizer, ctx, p.text) for p in prompts]
    ids = [r.input_ids for r in rendered]
    if cfg.kind == KIND_STEER:
        from mech.geometry.steering import steered as steering_on

        layer, added, steered = steer_teacher(model, tokenizer, cfg)
        with steering_on(model, layer, added, 1.0):
            answers, finished = sample_answers(model, tokenizer, cfg, ids, progress)
    else:
        answers, finished = sample_answers(model, tokenizer, cfg, ids, progress, served)

    banned = frozenset(cfg.banned)
    raw, candidates = [], []
    for i, (p, answer, done) in enumerate(zip(prompts, answers, finished)):
        result = check_answer(answer, cfg.answer_count, cfg.max_value, banned)
        raw.append(make_row(p.text, answer, cfg.prompt_seed, i, ok=result.ok, reason=result.reason, finished=done))
        candidates.append({"answer": answer, "row": make_row(p.text, answer, cfg.prompt_seed, i)})
    kept, audit = filter_rows(candidates, "answer", cfg.answer_count, cfg.max_value, banned)

    meta = {
        "kind": KIND_TEACHER,
        "config": cfg.to_dict(),
        "context": ctx.spec,
        "rendered_context": rendered[0].to_dict(),
        "tokenizer": tokenizer_info(tokenizer),
        "model_fingerprint": fingerprint,
        "unfinished": finished.count(False),
        **({"finetuned": finetuned} if finetuned is not None else {}),
        **({"steered": steered} if steered is not None else {}),
    }
    return write_dataset(out_dir, raw, [c["row"] for c in kept], audit, meta, overwrite=overwrite)
