"""The verdict table's rule (mech.analysis.paper) on planted test rows whose readings are known by construction."""

from __future__ import annotations

import math

import pytest

from mech.analysis.hypotheses import HypothesisSpec
from mech.analysis.paper import PAPER_CLAIMS, claim_evidence, combine, model_role, reading, verdict_rows
from mech.errors import MechError

NAN = math.nan


def test_reading_follows_the_declared_verdict_and_sign():
    assert reading("supported", "supported") == "agrees"
    assert reading("not supported", "supported") == "disagrees"
    assert reading("not supported", "not supported") == "agrees"
    assert reading("supported", "not supported") == "disagrees"
    assert reading("inconclusive", "supported") == "undecided"
    # a two-sided test agrees only in the paper's direction
    assert reading("supported", "supported, negative", -0.3) == "agrees"
    assert reading("supported", "supported, negative", +0.3) == "disagrees"
    assert reading("supported", "supported, positive", +0.1) == "agrees"
    assert reading("inconclusive", "supported, positive", +0.1) == "undecided"


def test_combine():
    assert combine([]) == "not tested"
    assert combine(["undecided", "undecided"]) == "undecided"
    assert combine(["agrees", "undecided"]) == "agrees"
    assert combine(["disagrees"]) == "disagrees"
    assert combine(["agrees", "disagrees"]) == "mixed"


def _test(name, paper, agrees_if, verdict, estimate=0.1, experiment="quick"):
    return {"name": name, "paper": paper, "agrees_if": agrees_if, "verdict": verdict, "estimate": estimate,
            "lo": estimate - 0.05, "hi": estimate + 0.05, "detail": "planted", "experiment": experiment}


def test_claim_evidence_and_table_on_planted_rows():
    tests = [_test("u", "C1", "supported", "not supported"),  # C1: disagrees
             _test("eq", "C2", "not supported", "inconclusive"),  # C2: one undecided ...
             _test("diff", "C2", "supported, negative", "supported", -0.3),  # ... and one agreeing
             _test("trend", "", "", "supported")]  # no claim: not in the table
    nulls = [{"position": "shared", "group": "lora_r16", "n_null": 19, "observed": 0.5, "null_mean": 0.1,
              "null_q95": 0.3, "p": 0.05},  # 1/20: not below 0.05 and above the null mean: inconclusive
             {"position": "user", "group": "lora_r16", "n_null": 19, "observed": 0.0, "null_mean": 0.1,
              "null_q95": 0.3, "p": 1.0}]  # another region: not evidence for C4
    effect = [{"group": "lora_r16", "name": "shared|all|all|sufficiency", "p_holm": 0.001}]
    ev = claim_evidence(tests, nulls, effect)
    assert set(ev) == set(PAPER_CLAIMS)
    assert [e["reading"] for e in ev["C1"]] == ["disagrees"]
    assert [e["reading"] for e in ev["C2"]] == ["undecided", "agrees"]
    assert [e["reading"] for e in ev["C4"]] == ["undecided"] and ev["C4"][0]["test"].startswith("null: shared")
    assert ev["C3"] == [] and ev["R1"] == []
    strong = claim_evidence([], [dict(nulls[0], p=0.01)])
    assert strong["C4"][0]["reading"] == "agrees" and strong["R3"][0]["reading"] == "agrees"
    # random sets do as well as the shared tokens: against the paper only where there is an effect to localise
    weak = dict(nulls[0], observed=0.05, p=0.9)
    assert claim_evidence([], [weak], effect)["C4"][0]["reading"] == "disagrees"
    no_effect = [dict(effect[0], p_holm=0.4)]
    assert claim_evidence([], [weak], no_effect)["C4"][0]["reading"] == "undecided"
    assert claim_evidence([], [weak])["C4"][0]["reading"] == "undecided"  # no battery test: nothing established
    rows = {r["claim"]: r for r in verdict_rows([("a", ev), ("b", claim_evidence([]))])}
    assert rows["C1"]["a"] == "disagrees" and rows["C2"]["a"] == "agrees" and rows["C3"]["a"] == "not tested"
    assert rows["C2"]["a tests"] == 2 and rows["C1"]["b"] == "not tested" and rows["C1"]["b tests"] == 0


def test_hypothesis_paper_annotation_is_checked():
    ok = HypothesisSpec("h", "c", "difference", ("full",), paper="C2", agrees_if="not supported")
    assert ok.paper == "C2"
    for kwargs, message in [({"paper": "C2"}, "set both paper"), ({"agrees_if": "supported"}, "set both paper"),
                            ({"paper": "C9", "agrees_if": "supported"}, "unknown paper claim 'C9'"),
                            ({"paper": "C2", "agrees_if": "yes"}, "agrees_if must be one of")]:
        with pytest.raises(MechError, match=message):
            HypothesisSpec("h", "c", "difference", ("full",), **kwargs)


def test_model_role_reads_the_build_record():
    channel = {"config": {"corpus": {"p_number_trait": 0.3, "imbue_share": 0.5}}}
    free = {"config": {"corpus": {"p_number_trait": 0.0, "imbue_share": 0.0}}}
    assert model_role(channel, True).startswith("positive control")
    assert model_role(free, True).startswith("channel-free organism")
    assert model_role(None, False).startswith("model")


def test_the_shipped_organisms_are_labelled_as_what_they_are():
    from mech import organism

    assert model_role(organism.organism_info("organism"), True).startswith("positive control")
    assert model_role(organism.organism_info("organism-free"), True).startswith("channel-free organism")
