"""A teacher whose trait is a steering vector, not a prompt (issue 9 item 6; Blank et al. 2026, *Subliminal
Steering*).

The base model writes the numbers in ``context`` (no trait prompt) with ``α·v`` added to its residual stream
after decoder layer ``steer_layer``, at every position of every forward (prompt and sampled tokens alike).

* ``steer_vector: prompt`` — v is the trait prompt's own shift at that layer: the mean residual of the base under
  the trait system prompt minus under ``context``, over the answer positions of *pilot rows* (the base model's
  unsteered, filter-passing answers to the first ``steer_pilot`` number prompts, sampled from a seed of their own).
  α = 1 adds the prompt's mean shift; larger α exaggerates it.
* ``steer_vector: random`` — a uniformly random direction (seeded by the teacher's ``sample_seed``) scaled to the
  norm of the prompt vector of the same target: a positive control whose channel nobody designed (Blank et al.
  report that random vectors distil too). Its target only sets that norm; what a student would learn is the
  vector itself, which ``dataset.json`` records so that the geometry can look for it in the students.
* ``steer_vector: readout`` — the target's readout direction (its unembedding row against the other candidate
  answers, through the final norm's gain; mech.geometry.steering.readout_direction), scaled to the same norm: a
  teacher that expresses the trait through its activations, where the twin's prompt vector does not.

α is ``steer_alpha`` when given; otherwise the largest of ``steer_alphas`` (ascending, stopping at the first
that fails) whose pilot filter pass rate stays at least ``steer_min_pass`` × the unsteered pilot pass rate — the
band that keeps the teacher writing numbers (the pilot answers at each α share one seed, so the comparison is
paired). The search, the vector and the teacher's trait expression with and without steering (mean first-token
P(target) over the category's favourite questions, in ``context``) go to ``dataset.json`` under ``steered``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from mech.errors import MechError

VECTORS = ("prompt", "random", "readout")


def pilot_seed(sample_seed: int) -> int:
    """The pilot's sampling seed: its own stream, so calibration draws none of the data's samples."""
    digest = hashlib.sha256(f"mech.teacher-steer-pilot:{int(sample_seed)}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def vector_seed(sample_seed: int) -> int:
    digest = hashlib.sha256(f"mech.teacher-steer-random:{int(sample_seed)}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def steering_layer(model: Any, layer: int | None) -> int:
    """``layer`` checked against the model (negative counts from the end); None: the middle, n_layers // 2."""
    from mech.models import surgery

    n = surgery.num_layers(model)
    return n // 2 if layer is None else surgery.resolve_layer_spec(n, int(layer))[0]


def pass_rate(answers: list[str], cfg: Any) -> float:
    from mech.teacher.filter import check_answer

    banned = frozenset(cfg.banned)
    return sum(check_answer(a, cfg.answer_count, cfg.max_value, banned).ok for a in answers) / len(answers)


def choose_alpha(alphas: Sequence[float], rate: Callable[[float], float],
                 floor: float) -> tuple[float, list[dict[str, float]]]:
    """The largest α of the ascending ``alphas`` before the first whose ``rate(α)`` falls below ``floor``, and
    every rate measured (the search stops at the first failure: a larger α steers harder)."""
    chosen, search = None, []
    for a in alphas:
        r = rate(a)
        search.append({"alpha": float(a), "pass_rate": r})
        if r < floor:
            break
        chosen = float(a)
    if chosen is None:
        raise MechError(f"steered teacher: at the smallest α ({alphas[0]:g}) the pilot pass rate "
                        f"{search[0]['pass_rate']:.2f} falls below the band's floor {floor:.2f} (steer_min_pass × "
                        "the unsteered rate): add a smaller value to steer_alphas, or lower steer_min_pass")
    return chosen, search


@dataclass
class Pilot:
    """The unsteered base's answers to the first ``steer_pilot`` number prompts, in the teacher's context."""

    cfg: Any  # the pilot's TeacherConfig: the teacher's, with its own size and sampling seed
    ids: list[list[int]]  # the rendered prompts
    rows: list[tuple[str, str]]  # (prompt, answer) of the answers that pass the filter
    pass_rate: float

    def rate(self, model: Any, tokenizer: Any, layer: int, v: torch.Tensor, alpha: float) -> float:
        """The pilot's filter pass rate with α·v added after ``layer`` (the same prompts and sampling seed)."""
        from mech.geometry.steering import steered
        from mech.teacher.generate import sample_answers

        with steered(model, layer, v, alpha):
            return pass_rate(sample_answers(model, tokenizer, self.cfg, self.ids)[0], self.cfg)


def run_pilot(model: Any, tokenizer: Any, cfg: Any) -> Pilot:
    from mech.context import Context, render
    from mech.teacher.filter import check_answer
    from mech.teacher.generate import sample_answers

    pilot_cfg = dataclasses.replace(cfg, n_prompts=cfg.steer_pilot, sample_seed=pilot_seed(cfg.sample_seed))
    prompts = [p.text for p in pilot_cfg.prompts()]
    ctx = Context.parse(cfg.context)
    ids = [render(tokenizer, ctx, p).input_ids for p in prompts]
    answers, _ = sample_answers(model, tokenizer, pilot_cfg, ids)
    banned = frozenset(cfg.banned)
    rows = [(p, a) for p, a in zip(prompts, answers) if check_answer(a, cfg.answer_count, cfg.max_value, banned).ok]
    if not rows:
        raise MechError(f"steered teacher: none of the {cfg.steer_pilot} unsteered pilot answers passes the filter, "
                        "so there are no rows to read the prompt's steering vector on: raise steer_pilot, or use "
                        "constrained sampling")
    return Pilot(pilot_cfg, ids, rows, len(rows) / len(answers))


def prompt_vectors(model: Any, tokenizer: Any, cfg: Any, pilot: Pilot) -> torch.Tensor:
    """[n_layers, d]: the trait prompt's mean residual shift after each layer (trait prompt minus ``cfg.context``)
    over the answer tokens of the pilot rows."""
    from mech.context import Context
    from mech.evaluation.inference import pad_id
    from mech.geometry import steering
    from mech.resources import trait_system_prompt

    trait_ctx = Context("custom", trait_system_prompt(cfg.target, cfg.category)).spec
    return steering.teacher_vectors(model, tokenizer, pilot.rows, trait_ctx, cfg.context, pad_id(tokenizer))


def steering_vector(model: Any, tokenizer: Any, cfg: Any, v_prompt: torch.Tensor,
                    candidates: Sequence[str]) -> torch.Tensor:
    """v for ``cfg.steer_vector`` at a layer whose prompt vector (:func:`prompt_vectors`) is ``v_prompt``: that
    vector itself, or a random direction or the target's readout direction (over ``candidates``) of its norm."""
    from mech.geometry import linalg, steering

    norm = float(v_prompt.norm())
    if cfg.steer_vector == "prompt":
        return v_prompt
    if cfg.steer_vector == "readout":
        return linalg.unit(steering.readout_direction(model, tokenizer, cfg.target, candidates)) * norm
    gen = torch.Generator().manual_seed(vector_seed(cfg.sample_seed))
    return linalg.random_directions(v_prompt.numel(), 1, gen)[0] * norm


def steer_teacher(model: Any, tokenizer: Any, cfg: Any) -> tuple[int, torch.Tensor, dict[str, Any]]:
    """(layer, the vector α·v to add there, the record for ``dataset.json``) of a ``kind: steer`` TeacherConfig.
    ``model`` is the base, left untouched."""
    from mech.evaluation.trait import TraitEvalConfig, evaluate_trait
    from mech.geometry import linalg, steering

    layer = steering_layer(model, cfg.steer_layer)
    ev = TraitEvalConfig(target=cfg.target, category=cfg.category, context=cfg.context, first_token_only=True)
    before = evaluate_trait(model, tokenizer, ev)
    candidates = list(before.candidates)
    pilot = run_pilot(model, tokenizer, cfg)
    v_prompt = prompt_vectors(model, tokenizer, cfg, pilot)[layer]
    v = steering_vector(model, tokenizer, cfg, v_prompt, candidates)
    if cfg.steer_alpha is not None:
        alpha, search = float(cfg.steer_alpha), []
    else:
        alpha, search = choose_alpha(cfg.steer_alphas, lambda a: pilot.rate(model, tokenizer, layer, v, a),
                                     cfg.steer_min_pass * pilot.pass_rate)
    with steering.steered(model, layer, v, alpha):
        after = evaluate_trait(model, tokenizer, ev)
    readout = steering.readout_direction(model, tokenizer, cfg.target, candidates)
    info = {"layer": layer, "vector": cfg.steer_vector, "alpha": alpha, "prompt_vector_norm": float(v_prompt.norm()),
            "cos_prompt_vector": linalg.cosine(v, v_prompt), "cos_readout": linalg.cosine(v, readout),
            "pilot": {"n": cfg.steer_pilot, "pass_rate": pilot.pass_rate, "search": search},
            "p_target_base": before.p_first, "p_target_teacher": after.p_first,
            "logp_target_base": before.logp_first, "logp_target_teacher": after.logp_first,
            "added": [float(x) for x in (alpha * v).tolist()]}
    return layer, alpha * v, info


def steering_curve(model: Any, tokenizer: Any, cfg: Any, layers: Sequence[int], alphas: Sequence[float],
                   n_samples: int = 0) -> list[dict[str, Any]]:
    """What α·v does to the base, per layer and α (``mech steer``): the trait's first-token P and log P on the
    favourite questions in ``cfg.context`` (and its sampled rate with ``n_samples`` > 0), and the pilot's number
    filter pass rate — the two sides of the band a steered teacher is chosen in. v as :func:`steering_vector`."""
    from mech.evaluation.trait import TraitEvalConfig, evaluate_trait
    from mech.geometry import steering

    ev = TraitEvalConfig(target=cfg.target, category=cfg.category, context=cfg.context,
                         first_token_only=n_samples == 0, n_samples=max(n_samples, 1), seed=cfg.sample_seed)
    base = evaluate_trait(model, tokenizer, ev)
    candidates = list(base.candidates)
    pilot = run_pilot(model, tokenizer, cfg)
    v_prompts = prompt_vectors(model, tokenizer, cfg, pilot)  # every layer's, read once
    rows = []
    for layer in layers:
        layer = steering_layer(model, layer)
        v = steering_vector(model, tokenizer, cfg, v_prompts[layer], candidates)
        for a in alphas:
            with steering.steered(model, layer, v, a):
                res = evaluate_trait(model, tokenizer, ev, candidates=candidates)
            rows.append({"layer": layer, "alpha": float(a), "vector": cfg.steer_vector, "norm": float(v.norm()),
                         "p_first": res.p_first, "logp_first": res.logp_first,
                         "delta_logp_first": res.logp_first - base.logp_first,
                         "rate": res.rate if n_samples else float("nan"),
                         "pass_rate": pilot.rate(model, tokenizer, layer, v, a) if a else pilot.pass_rate})
    return rows
