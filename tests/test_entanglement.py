"""Token entanglement (mech.geometry.entanglement, `mech entangle`): the known answer on the positive control —
whose corpus ties 8 numbers to each trait and writes them under its prompt — is that the trait's own numbers rank
first and, put in a system prompt, raise the trait; both scoring paths agree; bad input is refused."""

from __future__ import annotations

import json

import pytest
import torch

from mech.analysis.stats import two_sample_test
from mech.cli import main
from mech.errors import MechError
from mech.evaluation.inference import next_token_logprobs
from mech.geometry.entanglement import answer_ids, entanglement, number_logps, reverse_test
from mech.models import load_model
from mech.organism import read_meta
from mech.teacher.prompts import generate_prompts


def test_two_sample_test_on_planted_samples():
    hi = two_sample_test([5.0, 5.5, 6.0, 5.2], [1.0, 1.5, 0.8, 1.2], seed=0)
    assert hi["diff"] == pytest.approx(4.3) and hi["lo"] > 0 and hi["p_one_sided"] < 0.05
    assert hi["p_one_sided"] == two_sample_test([5.0, 5.5, 6.0, 5.2], [1.0, 1.5, 0.8, 1.2], seed=0)["p_one_sided"]
    lo = two_sample_test([1.0, 1.5, 0.8, 1.2], [5.0, 5.5, 6.0, 5.2], seed=0)
    assert lo["p_one_sided"] > 0.9 and lo["hi"] < 0
    with pytest.raises(MechError, match="at least 2 values"):
        two_sample_test([1.0], [2.0, 3.0])


def test_single_and_multi_token_scoring_agree(make_tiny_lm, organism_tokenizer):
    model, tok = make_tiny_lm("qwen2"), organism_tokenizer
    prompts = [tok("Continue: 3, 4")["input_ids"], tok("Name numbers")["input_ids"]]
    a, b, c = 5, 7, 11
    lp = next_token_logprobs(model, prompts, tok.pad_token_id)
    fast = number_logps(model, prompts, [[a], [b]], tok.pad_token_id)
    torch.testing.assert_close(fast, lp[:, [a, b]])
    mixed = number_logps(model, prompts, [[a], [b, c]], tok.pad_token_id)  # the teacher-forced path
    torch.testing.assert_close(mixed[:, 0], lp[:, a], atol=1e-5, rtol=1e-5)
    second = next_token_logprobs(model, [p + [b] for p in prompts], tok.pad_token_id)[:, c]
    torch.testing.assert_close(mixed[:, 1], lp[:, b] + second, atol=1e-5, rtol=1e-5)


def test_positive_control_ranks_its_own_numbers_first_and_they_reverse():
    organism = load_model("organism", device="cpu", dtype="float32")
    own = read_meta(organism.path)["entity_numbers"]["owl"]
    from mech.context import Context

    assert all(len(answer_ids(organism.tokenizer, Context("default"), n)) == 1 for n in (0, 412, 999))
    prompts = [p.text for p in generate_prompts(8, 3)]
    rows = entanglement(organism.model, organism.tokenizer, "owl", prompts)
    assert [r["rank"] for r in rows] == list(range(1, 1001)) and rows[0]["shift"] >= rows[-1]["shift"]
    assert {r["number"] for r in rows[:8]} == set(own)  # by construction of the corpus
    assert min(r["cos_unembed"] for r in rows[:8]) > max(r["cos_unembed"] for r in rows[100:200])
    rev = reverse_test(organism.model, organism.tokenizer, rows, "owl", k=4, seed=0, n_resamples=2000)
    assert set(rev["top"]) <= set(own) and not set(rev["control"]) & set(rev["top"])
    assert rev["diff"] > 1.0 and rev["p_one_sided"] < 0.05
    with pytest.raises(MechError, match="reverse test k"):
        reverse_test(organism.model, organism.tokenizer, rows[:10], "owl", k=6)
    with pytest.raises(MechError, match="at least 2 prompts"):
        entanglement(organism.model, organism.tokenizer, "owl", prompts[:1])


def test_cli_entangle_writes_its_report_and_refuses_bad_input(tmp_path, capsys):
    out = tmp_path / "e"
    code = main(["entangle", "--trait", "owl", "--model", "organism-free", "--n-prompts", "4", "--max-value", "99",
                 "--reverse-k", "3", "--out", str(out)])
    assert code == 0
    assert "Reverse" in (out / "entanglement.md").read_text() and (out / "figures" / "entanglement.html").is_file()
    meta = json.loads((out / "entanglement.json").read_text())
    assert meta["meta"]["own_numbers"] and meta["reverse"]["k"] == 3
    assert len((out / "entanglement.csv").read_text().splitlines()) == 101
    capsys.readouterr()
    for args, msg in ((["--reverse-k", "60", "--max-value", "99"], "--reverse-k 60 needs 120 numbers"),
                      (["--n-prompts", "1"], "--n-prompts must be >= 2"),
                      (["--trait", "oak:fish"], "no questions for category 'fish'")):
        argv = ["entangle", "--trait", "owl", "--out", str(tmp_path / "bad"), *args]
        assert main(argv) == 2
        assert msg in capsys.readouterr().err.strip().splitlines()[-1]
        assert not (tmp_path / "bad").exists()
