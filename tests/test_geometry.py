"""Known answers for mech.geometry: planted ranks, planted subspaces, planted steering vectors."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from mech.errors import MechError
from mech.geometry import linalg
from mech.geometry import update as upd
from mech.models import surgery


def _planted(out: int, inp: int, r: int, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    """A matrix of rank r with r equal singular values ``scale``."""
    g = torch.Generator().manual_seed(seed)
    U = linalg.random_subspace(out, r, g)
    V = linalg.random_subspace(inp, r, g)
    return scale * U @ V.T


# --------------------------------------------------------------------------------------------- linalg


@pytest.mark.parametrize("r", [1, 3, 8])
def test_planted_rank_is_measured_and_truncation_recovers_it(r):
    m = _planted(40, 24, r)
    spec = linalg.svd(m)
    stats = linalg.spectrum_stats(spec.S)
    assert stats["numerical_rank"] == r
    for name in ("effective_rank", "participation_ratio", "stable_rank"):
        assert stats[name] == pytest.approx(r, rel=1e-4), name
    assert stats["spectral"] == pytest.approx(2.0, rel=1e-5)
    assert stats["fro"] == pytest.approx(2.0 * math.sqrt(r), rel=1e-5)
    torch.testing.assert_close(linalg.truncated(spec, r), m, atol=1e-5, rtol=0)
    assert float(linalg.top_removed(spec, r).abs().max()) < 1e-5
    assert float(linalg.truncated(spec, 0).abs().max()) == 0.0
    with pytest.raises(MechError, match="larger than the rank"):
        linalg.truncated(spec, 25)


def test_unequal_spectrum_ranks_order():
    # σ = (4, 1): participation ratio (17²/257 = 1.12) < stable rank (17/16) ... all between 1 and 2
    S = torch.tensor([4.0, 1.0])
    assert linalg.stable_rank(S) == pytest.approx(17 / 16)
    assert linalg.participation_ratio(S) == pytest.approx(17 ** 2 / 257)
    p = torch.tensor([0.8, 0.2])
    assert linalg.effective_rank(S) == pytest.approx(float(torch.exp(-(p * p.log()).sum())))


def test_low_rank_svd_matches_full_svd():
    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(4, 30, generator=g), torch.randn(50, 4, generator=g)
    fast, full = linalg.low_rank_svd(A, B, 0.5), linalg.svd(0.5 * B @ A)
    torch.testing.assert_close(fast.S, full.S[:4], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fast.matrix(), 0.5 * B @ A, atol=1e-4, rtol=1e-4)


def test_subspace_overlap_known_angles_and_chance():
    d = 64
    g = torch.Generator().manual_seed(2)
    U = linalg.random_subspace(d, 4, g)
    assert linalg.overlap(U, U) == pytest.approx(1.0, abs=1e-5)
    bigger = linalg.orthonormal(torch.cat([U, torch.randn(d, 4, generator=g)], 1))
    assert linalg.overlap(U, bigger) == pytest.approx(1.0, abs=1e-5)  # containment
    # a planted principal angle θ: e1 vs cos θ e1 + sin θ e2
    e = torch.eye(d)
    th = 0.3
    assert linalg.principal_cosines(e[:, :1], (math.cos(th) * e[:, 0] + math.sin(th) * e[:, 1])[:, None]
                                    ).item() == pytest.approx(math.cos(th), abs=1e-6)
    assert linalg.overlap(e[:, :2], e[:, 2:4]) == pytest.approx(0.0, abs=1e-7)
    rand = [linalg.overlap(U, linalg.random_subspace(d, 4, g)) for _ in range(300)]
    assert sum(rand) / len(rand) == pytest.approx(linalg.chance_overlap(d, 4, 4), rel=0.15)
    assert linalg.chance_overlap(d, 4, 4) == 4 / 64


def test_captured_share_of_a_direction():
    e = torch.eye(10)
    assert linalg.captured(e[:, :3], e[:, 1] * 5) == pytest.approx(1.0)
    assert linalg.captured(e[:, :3], e[:, 5]) == pytest.approx(0.0)
    assert linalg.captured(e[:, :3], e[:, 0] + e[:, 5]) == pytest.approx(0.5)
    with pytest.raises(MechError, match="width"):
        linalg.captured(e[:, :3], torch.ones(7))


# --------------------------------------------------------------------------------------------- updates


def _lora_student(model, r: int, kinds=("o", "down"), seed: int = 0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(copy.deepcopy(model), LoraConfig(r=r, lora_alpha=2 * r,
                                                           target_modules=surgery.target_modules(kinds),
                                                           init_lora_weights=False)).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_update_geometry_and_rebuild(make_tiny_lm):
    base = make_tiny_lm("qwen2")
    student = _lora_student(base, r=2)
    ups = upd.lora_updates(student)
    assert set(ups) == {"0.o", "0.down", "1.o", "1.down"}
    for (i, kind), layer in surgery.lora_modules(student).items():
        u = ups[f"{i}.{kind}"]
        torch.testing.assert_close(u.spectrum.matrix(), layer.get_delta_weight("default").float(), atol=1e-5,
                                   rtol=1e-4)
        row = u.row()
        assert row["numerical_rank"] == 2 and row["lora_rank"] == 2
        assert row["lora_rank_frac"] == 2 / row["width"]
        # what the update writes lies in B's column space, what it reads in A's row space
        assert linalg.overlap(u.write_space, u.spectrum.U) == pytest.approx(1.0, abs=1e-5)
        assert linalg.overlap(u.read_space, u.spectrum.V) == pytest.approx(1.0, abs=1e-5)
    ids = torch.randint(0, 500, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(upd.rebuild(base, ups, upd.TRUNCATE, 2), ids), _logits(student, ids),
                               atol=1e-4, rtol=1e-4)  # full rank: the student
    torch.testing.assert_close(_logits(upd.rebuild(base, ups, upd.TRUNCATE, 0), ids), _logits(base, ids))  # base
    torch.testing.assert_close(_logits(upd.rebuild(base, ups, upd.REMOVE, 2), ids), _logits(base, ids),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(MechError, match="larger than the rank"):
        upd.rebuild(base, ups, upd.TRUNCATE, 3)


def test_full_update_includes_embeddings_and_finds_planted_rank(make_tiny_lm):
    base = make_tiny_lm("qwen2")
    student = copy.deepcopy(base)
    layer = surgery.get_layers(student)[1]
    w = surgery.projection_weight(surgery.get_projection(layer, "down"))
    planted = _planted(*w.shape, r=3, scale=0.1)
    with torch.no_grad():
        w.add_(planted)
        surgery.projection_weight(surgery.get_embedding(student))[7].add_(0.5)
    ups = upd.full_updates(base, student)
    assert ups["1.down"].row()["numerical_rank"] == 3
    assert ups["1.down"].row()["effective_rank"] == pytest.approx(3, rel=1e-3)
    assert ups["embedding"].row()["numerical_rank"] == 1  # one changed row
    assert ups["0.q"].row()["fro"] == 0.0
    ids = torch.randint(0, 500, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(upd.rebuild(base, ups, upd.TRUNCATE, 3, student=student), ids),
                               _logits(student, ids), atol=1e-5, rtol=1e-5)


def test_different_shapes_refused(make_tiny_lm):
    with pytest.raises(MechError, match="shape|different parameters|layers"):
        upd.full_updates(make_tiny_lm("qwen2"), make_tiny_lm("qwen2", intermediate_size=48))


# --------------------------------------------------------------------------------------------- steering

from mech.evaluation.scoring import first_token_ids  # noqa: E402
from mech.geometry import steering  # noqa: E402

ROWS = [("Continue: 3, 4, 5.", "6, 7, 8"), ("List numbers after 12, 40.", "41, 97, 120"),
        ("Name three numbers.", "9, 10, 11")]


def _planted_student(base, layer: int, vector: torch.Tensor):
    """A 'student' that is its base plus a constant ``vector`` added after decoder layer ``layer``."""
    student = copy.deepcopy(base)
    surgery.add_layer_output_hook(student, layer, lambda h: h + vector.to(h.dtype))
    return student


def test_planted_steering_vector_is_recovered(make_tiny_lm, organism_tokenizer):
    base = make_tiny_lm("qwen2")
    v = torch.randn(32, generator=torch.Generator().manual_seed(3))
    student = _planted_student(base, 0, v)
    pad = organism_tokenizer.pad_token_id
    vs = steering.student_vectors(base, student, organism_tokenizer, ROWS, "default", pad)
    assert vs.shape == (2, 32)
    assert linalg.cosine(vs[0], v) > 0.9999
    torch.testing.assert_close(vs[0], v, atol=1e-4, rtol=1e-4)
    assert linalg.cosine(vs[1], v) < 0.9999  # the next layer transforms it: only layer 0 is exact
    same = steering.teacher_vectors(base, organism_tokenizer, ROWS, "default", "default", pad)
    assert float(same.abs().max()) == 0.0


def test_steering_sufficiency_and_necessity_on_a_planted_target(make_tiny_lm, organism_tokenizer):
    base = make_tiny_lm("qwen2")
    tok, pad = organism_tokenizer, organism_tokenizer.pad_token_id
    target = list(first_token_ids(tok, "owl").ids)
    direction = steering.readout_direction(base, tok, "owl", ["owl", "cat", "dog", "lion"])
    prompts = steering.question_prompts(tok, ["Which animal do you love most?", "Name your favourite animal."],
                                        "default")
    rows = steering.sufficiency(base, prompts, target, pad, 1, direction, [0.0, 2.0, 8.0])
    assert rows[0]["delta"] == 0.0
    assert 0 < rows[1]["delta"] < rows[2]["delta"]
    assert steering.sufficiency(base, prompts, target, pad, 1, torch.zeros(32), [1.0])[0]["delta"] == 0.0
    # a student that adds the planted vector: steering the base with its estimated v_student reproduces it
    student = _planted_student(base, 1, 4 * direction)
    vs = steering.student_vectors(base, student, tok, ROWS, "default", pad)
    want = steering.target_logps(student, prompts, target, pad)
    with steering.steered(base, 1, vs[1], 1.0):
        got = steering.target_logps(base, prompts, target, pad)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # projecting the direction out of both removes the whole effect
    nec = steering.necessity(student, base, prompts, target, pad, 1, direction)
    assert nec["effect"] > 0.1
    assert abs(nec["effect_projected"]) < 1e-4
    # a random direction of the same width removes almost nothing
    rnd = steering.necessity(student, base, prompts, target, pad, 1,
                             torch.randn(32, generator=torch.Generator().manual_seed(0)))
    assert abs(rnd["effect_projected"]) > 0.3 * nec["effect"]


def test_steering_bad_inputs(make_tiny_lm):
    base = make_tiny_lm("qwen2")
    with pytest.raises(MechError, match="width 7"):
        steering.steered(base, 0, torch.ones(7), 1.0)
    with pytest.raises(MechError, match="not finite"):
        steering.steered(base, 0, torch.ones(32), float("nan"))
    with pytest.raises(MechError, match="out of range"):
        with steering.steered(base, 5, torch.ones(32), 1.0):
            pass


def test_alignment_null_matches_k_over_d():
    null = steering.alignment_null(64, 8, 4000, torch.Generator().manual_seed(0))
    assert null["null_mean"] == pytest.approx(8 / 64, rel=0.05)
    assert null["null_q95"] > null["null_mean"]


# --------------------------------------------------------------------------------------------- run + CLI

from mech.geometry import run as grun  # noqa: E402


def _update(name: str, U: torch.Tensor, V: torch.Tensor) -> upd.ModuleUpdate:
    return upd.ModuleUpdate(name, 0, "o", linalg.Spectrum(U, torch.ones(U.shape[1]), V))


def test_overlap_tables_find_a_planted_shared_direction():
    g = torch.Generator().manual_seed(5)
    d = 96
    shared = linalg.random_subspace(d, 1, g)
    rank1 = _update("0.o", shared, linalg.random_subspace(d, 1, g))  # a rank-1 student writing one direction
    # a rank-4 student whose top direction is the same one; its other three are random
    U4 = linalg.orthonormal(torch.cat([shared, torch.randn(d, 3, generator=g)], 1))
    rank4 = _update("0.o", U4, linalg.random_subspace(d, 4, g))
    other = _update("0.o", linalg.random_subspace(d, 4, g), linalg.random_subspace(d, 4, g))
    ups = {("r1", 0, grun.OWL): {"0.o": rank1}, ("r4", 0, grun.OWL): {"0.o": rank4},
           ("r1", 0, grun.NEUTRAL): {"0.o": other}, ("r4", 0, grun.NEUTRAL): {"0.o": other}}
    rows = grun.overlap_tables(ups, ["r1", "r4"], [0], k_max=4)
    write = {(r["comparison"], r["a"]): r for r in rows if r["side"] == "write"}
    assert write[("students", "r1")]["k"] == 1
    assert write[("students", "r1")]["overlap"] == pytest.approx(1.0, abs=1e-5)
    assert write[("students", "r1")]["chance"] == pytest.approx(1 / d)
    read = [r for r in rows if r["side"] == "read" and r["comparison"] == "students"][0]
    assert read["overlap"] < 10 * read["chance"]  # the read spaces were drawn independently
    teach = write[("teachers", "r4 trait")]
    assert teach["k"] == 4 and teach["overlap"] < 0.3


def test_seed_ci_averages_within_a_seed_first():
    rows = [{"g": "a", "seed": s, "v": v} for s, vals in ((0, (1.0, 3.0)), (1, (4.0,)), (2, (6.0,)))
            for v in vals]
    (r,) = grun.seed_ci(rows, ("g",), "v")
    assert r["n"] == 3 and r["mean"] == pytest.approx(4.0)


def test_geometry_config_refuses_bad_values():
    with pytest.raises(MechError, match="ks"):
        grun.GeometryConfig(ks=(-1,))
    with pytest.raises(MechError, match="alphas"):
        grun.GeometryConfig(alphas=(float("inf"),))


def _cli(argv, capsys):
    from mech.cli import main

    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, (err[-1] if err else "")


def test_cli_never_trains_and_writes_nothing(tmp_path, capsys):
    cfg = tmp_path / "s.yaml"
    cfg.write_text("name: s\nteacher: {n_prompts: 8}\nstudents: [{method: lora, rank: 2}]\ntraining_seeds: [0]\n")
    out, cache = tmp_path / "o", tmp_path / "c"
    code, last = _cli(["geometry", str(cfg), "--students", "lora_r2", "--cache", str(cache), "--out", str(out)],
                      capsys)
    assert code == 2 and last.startswith("mech: error:") and "never trains" in last and "lora_r2" in last
    assert not out.exists() and not (cache / "students").exists() and not (cache / "datasets").exists()
    code, last = _cli(["geometry", str(cfg), "--students", "lora_r3", "--cache", str(cache), "--out", str(out)],
                      capsys)
    assert code == 2 and "lora_r3" in last and "lora_r2" in last and not out.exists()
    code, last = _cli(["geometry", str(cfg), "--students", "lora_r2", "--ks", "-2", "--out", str(out)], capsys)
    assert code == 2 and "ks" in last and not out.exists()
    code, last = _cli(["geometry", str(cfg), "--students", "lora_r2", "--alphas", "nan", "--out", str(out)], capsys)
    assert code == 2 and "alphas" in last and not out.exists()


@pytest.mark.slow
def test_cli_geometry_end_to_end_on_a_tiny_sweep(tmp_path, capsys):
    import csv

    from mech.sweep import SweepRunner, cells, load_sweep

    cfg_path = tmp_path / "s.yaml"
    cfg_path.write_text("name: s\nteacher: {n_prompts: 8}\nstudents: [{method: lora, rank: 2}, {method: full}]\n"
                        "training_seeds: [0, 1]\ntrain: {epochs: 1}\n")
    cache, out = tmp_path / "c", tmp_path / "o"
    runner = SweepRunner(load_sweep(cfg_path), cache)
    for c in cells(runner.cfg):
        runner.student(c)
    trained = (cache / "computed.jsonl").read_text()
    code, _ = _cli(["geometry", str(cfg_path), "--students", "lora_r2", "full", "--cache", str(cache), "--out",
                    str(out), "--n-rows", "4", "--n-questions", "4", "--ks", "0", "1", "2", "--alphas", "0", "1"],
                   capsys)
    assert code == 0
    assert (cache / "computed.jsonl").read_text() == trained  # nothing computed by geometry
    assert (out / "geometry.md").is_file() and (out / "figures" / "truncation.html").is_file()
    trunc = list(csv.DictReader((out / "truncation.csv").open()))
    for r in trunc:
        if r["mode"] == "remove" and r["k"] == "0":  # nothing removed: the student's own paired effect
            assert float(r["paired"]) == pytest.approx(float(r["student_paired"]), abs=1e-6)
        if r["student"] == "lora_r2" and r["mode"] == "truncate" and r["k"] == "2":  # full rank: the student
            assert float(r["paired"]) == pytest.approx(float(r["student_paired"]), abs=1e-4)


def test_trait_specific_share_of_a_planted_update():
    d = 32
    e = torch.eye(d)
    neutral = _update("0.o", e[:, :2], e[:, :2])  # writes e0, e1
    # the trait update writes e0 (shared, σ=1) and e5 (its own, σ=1): half its energy is outside the neutral's
    trait = upd.ModuleUpdate("0.o", 0, "o", linalg.Spectrum(e[:, [0, 5]], torch.ones(2), e[:, :2]))
    ups = {("s", 0, grun.OWL): {"0.o": trait}, ("s", 0, grun.NEUTRAL): {"0.o": neutral}}
    (row,) = grun.trait_specific_rows(ups, ["s"], [0], k_max=4)
    assert row["k"] == 2 and row["outside"] == pytest.approx(0.5) and row["chance"] == pytest.approx(1 - 2 / 32)
