"""Cross-trait transfer: every teacher trait × every candidate answer, paired against the neutral teacher.

A student of teacher T moves the first-token log P of each candidate answer C (every animal of the category, say).
``paired[T][C]`` is that student's mean log P(C) minus the neutral-teacher student's, trained identically (same
seeds, student config and contexts). Transfer is *specific* when T's students move toward T more than toward any
other candidate: ``specificity = paired[T][T] − max over C ≠ T of paired[T][C]``, computed per replicate (each
seed's own maximum) and then summarised, so its interval is over replicates, not over a maximum of means.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from mech.analysis.stats import nested_ci
from mech.errors import MechError

GROUP = ("student", "train_context", "eval_context")  # one matrix per student recipe and context pair
REPLICATE = ("teacher_seed", "training_seed")


def paired_candidate_rows(cells: Iterable[tuple[Mapping[str, Any], dict, dict]]) -> list[dict]:
    """One row per (trait cell, candidate): ``cells`` yields (the cell's labels, its evaluation, its control's
    evaluation), evaluations being TraitResult dicts with ``candidate_logp``."""
    rows = []
    for labels, res, control in cells:
        mine, theirs = res.get("candidate_logp") or {}, control.get("candidate_logp") or {}
        if not mine or not theirs:
            raise MechError(f"evaluation of {labels['student']} on {labels['trait']} has no per-candidate log P: "
                            "it was cached by an older mech; clear the sweep's evals cache")
        for cand in mine.keys() & theirs.keys():
            rows.append({k: labels[k] for k in (*GROUP, *REPLICATE)} | {
                "teacher": labels["trait"], "candidate": cand, "paired": mine[cand] - theirs[cand]})
    return sorted(rows, key=lambda r: tuple(str(r[k]) for k in (*GROUP, "teacher", "candidate", *REPLICATE)))


def specificity_rows(rows: list[dict]) -> list[dict]:
    """Per (group, teacher, replicate): the teacher's own paired Δ, the largest other one and which candidate it is."""
    by: dict[tuple, dict[str, float]] = {}
    for r in rows:
        by.setdefault(tuple(r[k] for k in (*GROUP, "teacher", *REPLICATE)), {})[r["candidate"]] = r["paired"]
    out = []
    for key, vals in by.items():
        labels = dict(zip((*GROUP, "teacher", *REPLICATE), key))
        own = vals.get(labels["teacher"])
        others = {c: v for c, v in vals.items() if c != labels["teacher"]}
        if own is None or not others:
            continue  # the teacher's trait is not among the candidates (another category): nothing to compare
        rival = max(others, key=others.get)
        out.append(labels | {"own": own, "rival": rival, "rival_paired": others[rival],
                             "specificity": own - others[rival]})
    return out


def cross_trait_tables(rows: list[dict]) -> dict[str, list[dict]]:
    """The matrix (mean and CI of paired Δ per teacher × candidate) and the per-teacher specificity summary."""
    spec = specificity_rows(rows)
    # training seeds are averaged within their data (teacher) seed first: the interval is over data seeds
    matrix = nested_ci(rows, (*GROUP, "teacher", "candidate"), "paired", outer="teacher_seed")
    own = {tuple(r[k] for k in (*GROUP, "teacher")): r
           for r in nested_ci(spec, (*GROUP, "teacher"), "own", outer="teacher_seed")}
    summary = []
    for r in nested_ci(spec, (*GROUP, "teacher"), "specificity", outer="teacher_seed"):
        key = tuple(r[k] for k in (*GROUP, "teacher"))
        rivals = [s["rival"] for s in spec if tuple(s[k] for k in (*GROUP, "teacher")) == key]
        o = own[key]
        summary.append({k: r[k] for k in (*GROUP, "teacher")} | {
            "own_mean": o["mean"], "own_lo": o["lo"], "own_hi": o["hi"],
            "specificity_mean": r["mean"], "specificity_lo": r["lo"], "specificity_hi": r["hi"], "n": r["n"],
            "rival": max(set(rivals), key=rivals.count),
            "transmits": bool(o["lo"] > 0), "specific": bool(r["lo"] > 0)})
    return {"matrix": matrix, "specificity": summary}
