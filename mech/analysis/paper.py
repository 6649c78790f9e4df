"""The paper's claims and its referee's objections, and the verdict table that maps a run's tests onto them.

The paper is Nief et al. 2026, *Subliminal Learning is a LoRA Artifact*. A hypothesis in an experiment YAML may
name the claim it bears on and the verdict that would agree with the paper, declared with the test and before the
run like the test itself::

    - name: full_vs_lora_r16_equivalent      # "full FT transfers as much as LoRA r16"
      paper: C2                              # full finetuning does not transfer
      agrees_if: not supported

A two-sided test (difference) agrees only in the paper's direction: ``agrees_if: supported, negative`` reads
*agrees* when the test is supported with a negative estimate (the first arm below the second, or below 0) and
*disagrees* when it is supported the other way.

The localisation claims (C4, R3) are read from the battery's random-position-set nulls ("shared beats random",
p = (1 + #null ≥ observed) / (1 + n), at α = 0.05), when the run drew them: *supported* when p < α; *not
supported* when the observed effect is at most the null's mean and there is an effect to localise (the update
grafted at the shared tokens alone moves the target: the battery's ``shared|all|all|sufficiency`` test, Holm
p < α); else *inconclusive* — without transfer there is nothing to localise, so a null result decides nothing.

Verdict rule, per claim and model. Each bearing test reads *agrees* when its verdict (and, where declared, the
sign of its estimate) is its ``agrees_if``, *disagrees* when its verdict is decisive otherwise, *undecided* when it
is inconclusive. The claim's cell is
*agrees* (or *disagrees*) when at least one test is decisive and every decisive test says the same; *mixed* when
decisive tests point both ways; *undecided* when none is decisive; *not tested* when no test of the run bears on it.

What a column means depends on the model: on the positive-control organism the trait reaches the numbers through a
channel mech designed, so its column checks the pipeline and is never evidence about the paper; the channel-free
organism and real models are where a verdict bears on the paper.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from mech.errors import MechError

PAPER_CLAIMS: dict[str, str] = {
    "C1": "transfer depends on LoRA rank as an inverted U (its statistical test is the referee's request too)",
    "C2": "full finetuning does not transfer the trait",
    "C3": "transfer needs the context shared by finetuning and evaluation",
    "C4": "transfer is localised to computation at the tokens finetuning and evaluation share",
    "R1": "referee: full finetuning's null survives matched-norm and learning-rate controls",
    "R3": "referee: the token-level localisation beats random position sets of the same size",
}
DECISIVE = ("supported", "not supported")
AGREES_IF = ("supported", "not supported", "supported, positive", "supported, negative")
NULL_ALPHA = 0.05  # the localisation nulls' level (one test per student group and region, as the battery reports)
NULL_CLAIMS = ("C4", "R3")  # both read "shared beats random"


def check_claim(paper: str | None, agrees_if: str | None, where: str) -> None:
    """A hypothesis's paper annotation: both fields or neither, a known claim id, a decisive verdict."""
    if paper is None and agrees_if is None:
        return
    if paper is None or agrees_if is None:
        raise MechError(f"{where}: set both paper (a claim id) and agrees_if (supported | not supported), or neither")
    if paper not in PAPER_CLAIMS:
        raise MechError(f"{where}: unknown paper claim {paper!r}: choose from {', '.join(PAPER_CLAIMS)}")
    if agrees_if not in AGREES_IF:
        raise MechError(f"{where}: agrees_if must be one of {', '.join(repr(a) for a in AGREES_IF)}, got "
                        f"{agrees_if!r}")


def reading(verdict: str, agrees_if: str, estimate: float = float("nan")) -> str:
    """One test's bearing on its claim: agrees, disagrees or undecided."""
    if verdict not in DECISIVE:
        return "undecided"
    wanted, _, sign = agrees_if.partition(", ")
    if verdict != wanted:
        return "disagrees"
    if sign and not (estimate < 0 if sign == "negative" else estimate > 0):
        return "disagrees"  # decided, the other way round
    return "agrees"


def combine(readings: Sequence[str]) -> str:
    """The claim's cell from its tests' readings (module docstring)."""
    decisive = {r for r in readings if r != "undecided"}
    if not readings:
        return "not tested"
    if not decisive:
        return "undecided"
    return decisive.pop() if len(decisive) == 1 else "mixed"


SHARED_EFFECT = "shared|all|all|sufficiency"  # the battery mask whose test says there is an effect to localise


def _null_evidence(nulls: Iterable[Mapping[str, Any]], loc_tests: Iterable[Mapping[str, Any]]
                   ) -> list[dict[str, Any]]:
    effect = {t["group"]: t["p_holm"] < NULL_ALPHA for t in loc_tests if t.get("name") == SHARED_EFFECT}
    out = []
    for n in nulls:
        if n.get("position") != "shared":
            continue
        if n["p"] < NULL_ALPHA:
            verdict = "supported"
        elif n["observed"] <= n["null_mean"] and effect.get(n["group"], False):
            verdict = "not supported"
        else:
            verdict = "inconclusive"
        out.append({"test": f"null: shared vs {n['n_null']} random sets ({n['group']})", "verdict": verdict,
                    "agrees_if": "supported", "estimate": n["observed"], "lo": float("nan"), "hi": float("nan"),
                    "detail": f"observed {n['observed']:+.4g} vs null mean {n['null_mean']:+.4g} "
                              f"(95th pct {n['null_q95']:+.4g}), p {n['p']:.3g}"})
    return out


def claim_evidence(tests: Iterable[Mapping[str, Any]], nulls: Iterable[Mapping[str, Any]] = (),
                   loc_tests: Iterable[Mapping[str, Any]] = ()) -> dict[str, list[dict[str, Any]]]:
    """Per claim id, the run's evidence: each annotated test row (mech.analysis.hypotheses result rows, with the
    experiment in ``experiment`` when known) and the localisation nulls (with the battery's per-mask tests
    ``loc_tests``, which say whether there is an effect to localise), with its reading."""
    out: dict[str, list[dict[str, Any]]] = {c: [] for c in PAPER_CLAIMS}
    for t in tests:
        if t.get("paper"):
            name = f"{t['experiment']}: {t['name']}" if t.get("experiment") else t["name"]
            out[t["paper"]].append({"test": name, "verdict": t["verdict"], "agrees_if": t["agrees_if"],
                                    "estimate": t["estimate"], "lo": t["lo"], "hi": t["hi"], "detail": t["detail"]})
    nulls = _null_evidence(nulls, loc_tests)
    for c in NULL_CLAIMS:
        out[c] += [dict(n) for n in nulls]
    for rows in out.values():
        for r in rows:
            r["reading"] = reading(r["verdict"], r["agrees_if"], r["estimate"])
    return out


def verdict_rows(columns: Sequence[tuple[str, dict[str, list[dict[str, Any]]]]]) -> list[dict[str, Any]]:
    """The verdict table: one row per claim, one cell per (column label, claim_evidence) given."""
    rows = []
    for cid, text in PAPER_CLAIMS.items():
        row: dict[str, Any] = {"claim": cid, "text": text}
        for label, evidence in columns:
            ev = evidence.get(cid, [])
            row[label] = combine([e["reading"] for e in ev])
            row[f"{label} tests"] = len(ev)
        rows.append(row)
    return rows


def model_role(info: Mapping[str, Any] | None, is_organism: bool) -> str:
    """What a model's column is evidence of, from its organism build record: the designed-channel positive
    control (trait numbers in its pretraining number answers), the channel-free organism, or any other model."""
    if not is_organism:
        return "model (evidence about the paper)"
    corpus = ((info or {}).get("config") or {}).get("corpus") or {}
    channel = float(corpus.get("p_number_trait", 0) or 0) > 0 or float(corpus.get("imbue_share", 0) or 0) > 0
    return ("positive control (designed channel: about the pipeline, not the paper)" if channel
            else "channel-free organism (evidence about the paper)")
