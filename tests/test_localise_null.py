"""The localisation battery's statistics on planted students: each region once, the readout as its own set,
paired effects with a bootstrap interval and Holm / BH, and random same-size position sets as a null."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mech.context import Context, render
from mech.interventions.battery import (LocaliseConfig, _rendered_questions, _train_rendered, battery_masks,
                                        compute_localise, crossed_bootstrap, duplicate_masks, null_sets)
from mech.interventions.positions import resolve_positions
from mech.models import load_model, surgery

from test_localise import planted_student

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def organism():
    return load_model("organism")


CFG = LocaliseConfig(positions=("shared", "non_shared", "user", "readout", "shared_minus_readout"),
                     components=("all", "mlp"), layers=("all",), n_questions=3, n_boot=200)


def test_readout_position_sets(organism):
    r = render(organism.tokenizer, Context.parse("default"), "What is your favourite animal?")
    train = _train_rendered(organism.tokenizer, CFG)
    readout = resolve_positions("readout", r, train)
    shared = resolve_positions("shared", r, train)
    rest = resolve_positions("shared_minus_readout", r, train)
    assert readout.nonzero().flatten().tolist() == [len(r) - 1] and shared[-1]
    assert torch.equal(rest | readout, shared) and not (rest & readout).any()


def test_complement_duplicates_are_reported_once(organism):
    tok = organism.tokenizer
    masks = battery_masks(CFG, {"default_system", "template", "user"})
    dup = duplicate_masks(masks, organism.model, _rendered_questions(tok, CFG), _train_rendered(tok, CFG))
    # necessity(shared) switches the update on exactly at non_shared; with default/default non_shared is user
    assert dup["non_shared|all|all|sufficiency"] == "shared|all|all|necessity"
    assert dup["non_shared|all|all|necessity"] == "shared|all|all|sufficiency"
    assert dup["user|all|all|sufficiency"] == "shared|all|all|necessity"
    assert "readout|all|all|sufficiency" not in dup and "shared|all|all|sufficiency" not in dup


def test_null_sets_match_size_and_readout(organism):
    tok = organism.tokenizer
    rendered, train = _rendered_questions(tok, CFG), _train_rendered(tok, CFG)
    for spec in ("shared", "shared_minus_readout", "user"):
        sets = null_sets(spec, rendered, train, 20, seed=3)
        assert sets == null_sets(spec, rendered, train, 20, seed=3)  # seeded
        assert sets != null_sets(spec, rendered, train, 20, seed=4)
        for r, masks in zip(rendered, sets):
            named = resolve_positions(spec, r, train)
            for m in masks:
                pos = resolve_positions(m.positions, r)
                assert int(pos.sum()) == int(named.sum()) and bool(pos[-1]) == bool(named[-1])
            assert len({m.positions for m in masks}) > 1


def test_crossed_bootstrap_known_answers():
    const = np.full((2, 3, 5), 0.25)
    lo, hi = crossed_bootstrap(const, 100, seed=0)
    assert np.allclose(lo, 0.25) and np.allclose(hi, 0.25)
    rng = np.random.default_rng(0)
    v = 1.0 + rng.normal(0, 0.1, (3, 1)) + rng.normal(0, 0.1, (1, 40))
    lo, hi = crossed_bootstrap(v, 500, seed=1)
    assert lo < v.mean() < hi and hi - lo < 0.5


def test_planted_readout_student_paired_and_null(organism, tmp_path):
    """Update only in the last layer's MLP: position-wise and with no later layer, so only the readout can move
    the metric. Readout recovers all of it, shared minus readout none; 'shared beats random' is then p = 1: every
    same-size random set holds the readout too. The neutral student is the base's own LoRA (B = 0)."""
    base, tok = organism.model, organism.tokenizer
    last = surgery.num_layers(base) - 1
    owl = [planted_student(base, {(last, k) for k in ("gate", "up", "down")}, seed=s) for s in (0, 1)]
    neutral = [planted_student(base, set(), seed=s) for s in (0, 1)]
    cfg = LocaliseConfig(**{**CFG.__dict__, "null_sets": 6, "patch_sites": (), "components": ("all",),
                            "n_questions": 2})
    loc = compute_localise(base, tok, {"g": ["o0", "o1"]}, cfg, {"o0": owl[0], "o1": owl[1],
                                                                  "n0": neutral[0], "n1": neutral[1]}.get,
                           controls={"g": ["n0", "n1"]})
    t = {r["name"]: r for r in loc.tests}
    assert t["readout|all|all|sufficiency"]["paired_fraction"] == pytest.approx(1.0, abs=1e-4)
    assert t["shared_minus_readout|all|all|sufficiency"]["paired_fraction"] == pytest.approx(0.0, abs=1e-4)
    assert t["shared_minus_readout|all|all|sufficiency"]["paired"] == pytest.approx(0.0, abs=1e-5)
    assert "non_shared|all|all|sufficiency" not in t  # reported once, as shared's necessity
    assert "non_shared|all|all|sufficiency" in t["shared|all|all|necessity"]["equals"]
    full = t["readout|all|all|sufficiency"]
    assert full["paired_lo"] <= full["paired"] <= full["paired_hi"] and full["effect"].startswith("owl - neutral")
    assert all(r["p_holm"] >= r["p"] and r["p_bh"] >= r["p"] for r in loc.tests if r["p"] == r["p"])
    nulls = {n["position"]: n for n in loc.nulls}
    assert nulls["shared"]["p"] == 1.0 and nulls["shared"]["null_mean"] == pytest.approx(nulls["shared"]["observed"],
                                                                                          abs=1e-5)
    assert nulls["shared_minus_readout"]["observed"] == pytest.approx(0.0, abs=1e-5)
    from mech.report.localise import write_localise

    write_localise(loc, tmp_path)
    md = (tmp_path / "localise.md").read_text()
    assert "| g | non_shared | all | all | = shared/all/all/necessity | = shared/all/all/sufficiency |" in md
    assert "## Paired effects, each region once" in md and "| g | shared | " in md.split("beat random")[1]
    assert {"localise_tests.csv", "localise_null.csv"} <= {p.name for p in tmp_path.iterdir()}


def test_sampled_metric_under_grafting_known_answers(organism, tmp_path):
    """The sampled rate with the update grafted while writing. Planted in the last layer's MLP, the update
    cannot reach the readout from any other prompt position, and 'shared_minus_readout' leaves the readout (and so,
    under 'as_last', every written token) off: owl and neutral students then write the same tokens from the same
    seeds, a paired effect of exactly 0; so does 'none'. The 'all' row is the student's own sampling."""
    from mech.interventions.battery import sampled_rates
    from mech.interventions.graft import graft_generate
    from mech.report.localise import write_localise

    base, tok = organism.model, organism.tokenizer
    last = surgery.num_layers(base) - 1
    owl = [planted_student(base, {(last, k) for k in ("gate", "up", "down")}, seed=s) for s in (0, 1)]
    neutral = [planted_student(base, set(), seed=s) for s in (0, 1)]
    cfg = LocaliseConfig(**{**CFG.__dict__, "patch_sites": (), "components": ("all",), "n_questions": 3,
                            "positions": ("shared",), "sampled": 6, "sampled_tokens": 4, "n_boot": 100})
    loc = compute_localise(base, tok, {"g": ["o0", "o1"]}, cfg, {"o0": owl[0], "o1": owl[1],
                                                                  "n0": neutral[0], "n1": neutral[1]}.get,
                           controls={"g": ["n0", "n1"]})
    rows = {r["name"]: r for r in loc.sampled}
    assert list(rows) == ["all", "none", "shared", "non_shared", "readout", "shared_minus_readout"]
    for name in ("none", "shared_minus_readout"):
        assert rows[name]["paired_rate"] == 0.0 == rows[name]["paired_rate_lo"] == rows[name]["paired_rate_hi"]
    assert all(r["n_samples"] == 18 and r["effect"].startswith("owl - neutral") for r in rows.values())
    # the 'all' row: exactly what grafted generation of the whole student writes from the question's seed
    from mech.evaluation.inference import decode_answer, eos_id, pad_id, stop_ids
    from mech.evaluation.scoring import mentions
    from mech.interventions.battery import _question_seed, _rendered_questions as questions_of, sampled_masks

    r0 = questions_of(tok, cfg)[0]
    toks = graft_generate(owl[0], None, r0, sampled_masks(cfg, set(r0.segments)), max_new_tokens=4,
                          decode_policy="as_last", eos_id=eos_id(tok), pad_id=pad_id(tok), temperature=1.0,
                          seed=_question_seed(cfg, 0), train_rendered=_train_rendered(tok, cfg), n_samples=6)
    hits = [mentions(decode_answer(tok, t, stop_ids(tok)), "owl") for t in toks[:6]]
    got = sampled_rates(owl[0], base, tok, cfg)
    assert got.rate[0, 0] == pytest.approx(sum(hits) / 6) and got.base.shape == (3,)
    write_localise(loc, tmp_path)
    md = (tmp_path / "localise.md").read_text()
    assert "## A second metric: the sampled rate" in md and "| g | shared_minus_readout |" in md
    assert (tmp_path / "localise_sampled.csv").is_file()


def test_sampled_metric_options_are_checked():
    from mech.errors import MechError

    for kw, match in (({"sampled": -1}, "sampled"), ({"sampled_positions": ("shared", "nowhere")}, "nowhere"),
                      ({"sampled_decode": "maybe"}, "sampled_decode")):
        with pytest.raises(MechError, match=match):
            LocaliseConfig(**kw)


def test_paired_against_itself_is_zero(organism):
    base, tok = organism.model, organism.tokenizer
    s = planted_student(base, {(0, "v"), (0, "o")}, seed=2)
    cfg = LocaliseConfig(**{**CFG.__dict__, "patch_sites": (), "n_questions": 2})
    loc = compute_localise(base, tok, {"g": ["a"]}, cfg, lambda d: s, controls={"g": ["a"]})
    assert all(r["paired"] == 0.0 and r["paired_lo"] == 0.0 == r["paired_hi"] for r in loc.tests)


@pytest.mark.parametrize("args, match", [
    (["--null-sets", "-1"], "null_sets"),
    (["--sampled", "-1"], "sampled must be >= 0"),
    (["--sampled", "4", "--sampled-positions", "shared", "nowhere"], "unknown sampled position set(s) nowhere"),
])
def test_cli_localise_options_validate(tmp_path, capsys, args, match):
    from mech.cli import main

    cfg = tmp_path / "s.yaml"
    cfg.write_text("name: s\nteacher: {n_prompts: 8}\nstudents: [{method: lora, rank: 2}]\ntraining_seeds: [0]\n")
    code = main(["localise", str(cfg), "--students", "lora_r2", *args, "--cache",
                 str(tmp_path / "c"), "--out", str(tmp_path / "o")])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("mech: error:") and match in last
    assert not (tmp_path / "o").exists() and not (tmp_path / "c").exists()


@pytest.mark.parametrize("args, match", [
    (["--train-context", "none"], "--train-context 'none' is not in"),
    (["--eval-context", "custom:"], "custom"),
])
def test_cli_context_options_validate(tmp_path, capsys, args, match):
    from mech.cli import main

    cfg = tmp_path / "s.yaml"
    cfg.write_text("name: s\nteacher: {n_prompts: 8}\nstudents: [{method: lora, rank: 2}]\ntraining_seeds: [0]\n")
    code = main(["localise", str(cfg), "--students", "lora_r2", *args, "--cache", str(tmp_path / "c"),
                 "--out", str(tmp_path / "o")])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("mech: error:") and match in last
    assert not (tmp_path / "o").exists() and not (tmp_path / "c").exists()


def test_full_ft_rest_from_decides_the_embedding_offset(organism):
    """A full-FT student that differs from the base only in its (tied) embeddings: with the rest from the student
    every mask, even the empty one, is the student (fraction 1); with the rest from the base every mask is the
    base (the change lives outside the grafted projections); masked, each mask holds its positions' part."""
    import copy

    from mech.interventions.battery import dwg_questions

    base, tok = organism.model, organism.tokenizer
    student = copy.deepcopy(base)
    g = torch.Generator().manual_seed(0)
    emb = student.get_input_embeddings().weight
    emb.data.add_(torch.randn(emb.shape, generator=g) * 0.05)
    cfg = LocaliseConfig(positions=("shared", "user"), components=("all",), layers=("all",), n_questions=2,
                         patch_sites=())
    for rest, expect in (("student", "student"), ("base", "base")):
        qm = dwg_questions(student, base, tok, LocaliseConfig(**{**cfg.__dict__, "rest_from": rest}))
        ref = qm.student if expect == "student" else qm.base
        assert torch.allclose(qm.mask, ref[:, None].expand_as(qm.mask), atol=1e-5), rest
    assert not torch.allclose(qm.student, qm.base, atol=1e-3)  # the embedding change moves the metric
    # masked (the default): the embedding change is grafted with the positions, so "shared" sufficiency and
    # "shared" necessity each hold part of it, and neither is the base or the student
    assert cfg.rest_from == "masked"
    qm = dwg_questions(student, base, tok, cfg)
    names = [m.name for m in qm.masks]
    for name in ("shared|all|all|sufficiency", "shared|all|all|necessity"):
        v = qm.mask[:, names.index(name)]
        assert not torch.allclose(v, qm.base, atol=1e-4) and not torch.allclose(v, qm.student, atol=1e-4), name
