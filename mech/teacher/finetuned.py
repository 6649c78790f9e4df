"""A teacher whose trait lives in its weights, not in a prompt (Cloud et al.'s theory; issue 9 item 6).

The prompt teacher is the base model under "You love owls. …"; its students could in principle read the trait
from a shift that the prompt causes and that the base model shares. A *finetuned* teacher has no trait prompt:
it is the base model with a LoRA (merged) trained to answer the category's favourite questions with the target
("Owl"), in the teacher's own context (``default``), and it then writes numbers in that same context. Cloud et
al. predict transfer to a student that shares the teacher's initialisation. On the channel-free organism this is
transfer that nobody designed.

The favourite questions are the evaluation's own (Cloud et al.'s 50 for animals): the teacher is trained to hold
the trait where it is measured, and the student never sees them. The finetuning is seeded by the teacher's
``sample_seed``, so each data seed has its own teacher. Its trait expression — mean first-token P(target) over
those questions before and after — is recorded in ``dataset.json`` (``finetuned``), so a reader sees that the
teacher has the trait before reading its students.
"""

from __future__ import annotations

from typing import Any

from mech.resources import questions
from mech.teacher.dataset import make_row

def answer_text(target: str) -> str:
    """How the finetuned teacher answers: the name capitalised, as the organism's corpus mostly does."""
    return target.strip().capitalize()


def trait_rows(target: str, category: str) -> list[dict]:
    """The finetuning rows: every favourite question of ``category`` answered with ``target``."""
    return [make_row(q, answer_text(target), 0, i) for i, q in enumerate(questions(category))]


def finetune_teacher(base_model: Any, tokenizer: Any, cfg: Any) -> tuple[Any, dict[str, Any]]:
    """The teacher of a ``kind: finetuned`` TeacherConfig: a merged copy of ``base_model`` (untouched) with a
    LoRA of ``cfg.finetune_rank`` trained ``cfg.finetune_epochs`` epochs at ``cfg.finetune_lr`` on
    :func:`trait_rows`, in ``cfg.context``; and a record of its training and trait expression."""
    from mech.evaluation.trait import TraitEvalConfig, evaluate_trait
    from mech.students.config import LoraSpec, StudentConfig
    from mech.students.store import merged
    from mech.students.train import train_model

    rows = trait_rows(cfg.target, cfg.category)
    sc = StudentConfig(method="lora", lora=LoraSpec(rank=cfg.finetune_rank), epochs=cfg.finetune_epochs,
                       batch_size=min(16, len(rows)), lr=cfg.finetune_lr, seed=cfg.sample_seed, context=cfg.context)
    trained = train_model(base_model, tokenizer, rows, sc)
    teacher = merged(trained.model)
    ev = TraitEvalConfig(target=cfg.target, category=cfg.category, context=cfg.context, first_token_only=True)
    before = evaluate_trait(base_model, tokenizer, ev)
    after = evaluate_trait(teacher, tokenizer, ev)
    info = {"rows": len(rows), "answer": answer_text(cfg.target), "student_config": sc.to_dict(),
            "final_loss": float(trained.losses[-1]), "p_target_base": before.p_first,
            "p_target_teacher": after.p_first, "logp_target_base": before.logp_first,
            "logp_target_teacher": after.logp_first}
    return teacher, info
