"""Teacher number data: sample answers to Cloud et al.'s number prompts in the teacher's context, filter them.

The teacher is the base model in a context: a *trait* teacher (``target`` set) answers under the trait
system prompt (``trait_system_prompt(target, category)``, a custom context); the *neutral* teacher
(``target=None``) answers under ``context`` (``default``: whatever the chat template inserts). A trait teacher of
``kind="finetuned"`` has no trait prompt: it is the base with the trait trained into a LoRA
(mech.teacher.finetuned), answering under ``context`` like the neutral teacher. Only the
user prompt and the answer go into the rows: the teacher's system prompt is recorded in ``dataset.json``
(as exact token ids with segment labels) and never in the training data.

Seeding: prompts come from ``generate_prompts(n_prompts, prompt_seed)``. Sampling runs in chunks of
``batch_size`` prompts, one ``mech.evaluation.inference.sample`` call per chunk seeded by :func:`chunk_seed`
``(sample_seed, chunk start)``, so the answers are a function of the config alone (given the model and the
device); a chunk is also the unit of ``progress``. Because one generator serves a whole batch, an answer
depends on its batch: ``batch_size`` is part of the config and changes the samples.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mech.context import Context, render
from mech.teacher.constrained import number_grammar
from mech.teacher.dataset import check_free, make_row, write_dataset
from mech.teacher.filter import check_answer, filter_rows
from mech.teacher.finetuned import KIND_FINETUNED, KIND_PROMPT, TEACHER_KINDS, finetune_teacher
from mech.teacher.prompts import NumberPrompt, NumberPromptConfig, generate_prompts
from mech.resources import questions, trait_system_prompt
from mech.errors import MechError
from mech.evaluation.inference import decode_answer, eos_id, eval_mode, pad_id, sample, stop_ids
from mech.models import model_fingerprint

ProgressFn = Callable[[int, int], None]

KIND_TEACHER = "teacher"
MAX_PROMPTS = 10_000_000  # far beyond any real run; more is a typo that would sample for weeks


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
    # favourite questions (mech.teacher.finetuned), of this rank, epochs and lr, and the teacher writes in `context`
    kind: str = KIND_PROMPT
    finetune_rank: int = 8
    finetune_epochs: int = 8
    finetune_lr: float = 2e-3

    def __post_init__(self) -> None:
        questions(self.category)  # unknown category -> MechError listing the known ones
        if self.kind not in TEACHER_KINDS:
            raise MechError(f"unknown teacher kind {self.kind!r}: expected one of {', '.join(TEACHER_KINDS)}")
        if self.kind == KIND_FINETUNED:
            if self.target is None:
                raise MechError("a finetuned teacher needs a target (the neutral teacher is the base model): set "
                                "target, or kind: prompt for the neutral teacher")
            if self.finetune_rank < 1 or self.finetune_epochs < 1 or not self.finetune_lr > 0:
                raise MechError(f"finetuned teacher: finetune_rank and finetune_epochs must be >= 1 and finetune_lr "
                                f"> 0 (got {self.finetune_rank}, {self.finetune_epochs}, {self.finetune_lr})")
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
        if self.kind == KIND_PROMPT:  # likewise: a prompt teacher's key and dataset.json are as before kinds existed
            for name in ("kind", "finetune_rank", "finetune_epochs", "finetune_lr"):
                del d[name]
        return d


def chunk_seed(sample_seed: int, start: int) -> int:
    """The seed of the chunk of prompts starting at ``start``: a hash, so chunks are independent streams.

    32 bits: ``sample`` seeds its generator with ``seed * 1_000_003 + batch start``, which must fit torch's
    64-bit seed range.
    """
    digest = hashlib.sha256(f"mech.teacher-sample:{int(sample_seed)}:{int(start)}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def sample_answers(
    model: Any, tokenizer: Any, cfg: TeacherConfig, prompt_ids: list[list[int]], progress: ProgressFn | None = None
) -> tuple[list[str], list[bool]]:
    """Decoded answers and whether each ended with eos (False: cut off at ``max_new_tokens``)."""
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
                seed=chunk_seed(cfg.sample_seed, start),
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
) -> Path:
    """Sample, filter and write a teacher dataset to ``out_dir`` (atomically); returns ``out_dir``.

    Raises MechError (writing nothing) when the filter keeps no row, showing the audit. ``progress(done,
    total)`` is called after each sampled chunk. ``dataset.json`` holds ``kind`` "teacher", the config, the
    teacher's context spec and its rendering of the first prompt (``rendered_context``: token ids, text,
    segment labels, incl. an auto-inserted default system prompt), the tokenizer and the model fingerprint.
    Raw rows also carry ``finished`` (False: the answer was cut off at ``max_new_tokens``; the filter still
    judges the text as it is, as Cloud et al.'s does).
    """
    check_free(out_dir, overwrite)
    fingerprint = model_fingerprint(model)  # the base's: a finetuned teacher is made from it, here
    finetuned = None
    if cfg.kind == KIND_FINETUNED:
        model, finetuned = finetune_teacher(model, tokenizer, cfg)
    ctx = cfg.teacher_context()
    prompts = cfg.prompts()
    rendered = [render(tokenizer, ctx, p.text) for p in prompts]
    answers, finished = sample_answers(model, tokenizer, cfg, [r.input_ids for r in rendered], progress)

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
    }
    return write_dataset(out_dir, raw, [c["row"] for c in kept], audit, meta, overwrite=overwrite)
