"""Steered teachers (mech.teacher.steered; issue 9 item 6) and the students' cosines with their teacher's vector
(mech.geometry.run.teacher_cosines): config, α search, the recorded vector, reproducibility, bad input, and the
known answer — students of a teacher steered by a planted random vector learn a shift along it."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mech.cli import main
from mech.errors import MechError
from mech.geometry import linalg, steering
from mech.geometry.run import cosine_null
from mech.models import load_model
from mech.teacher.generate import TeacherConfig, generate
from mech.teacher.steered import choose_alpha, steer_teacher, steering_layer

SMALL = dict(n_prompts=16, max_new_tokens=24, batch_size=8, steer_pilot=16)


@pytest.fixture(scope="module")
def twin():
    """The shipped channel-free twin: its unsteered answers pass the filter (~90 %), which a reduced build's do not."""
    return load_model("organism-free", device="cpu", dtype="float32")


def test_choose_alpha_stops_at_the_first_rate_below_the_floor():
    rates = {1.0: 0.9, 2.0: 0.85, 4.0: 0.5, 8.0: 0.95}  # 8 would pass again: the search never gets there
    seen = []
    alpha, search = choose_alpha((1.0, 2.0, 4.0, 8.0), lambda a: seen.append(a) or rates[a], 0.8)
    assert alpha == 2.0 and seen == [1.0, 2.0, 4.0]
    assert search == [{"alpha": 1.0, "pass_rate": 0.9}, {"alpha": 2.0, "pass_rate": 0.85},
                      {"alpha": 4.0, "pass_rate": 0.5}]
    assert choose_alpha((1.0, 2.0), lambda a: 1.0, 0.8)[0] == 2.0  # never out of the band: the largest
    with pytest.raises(MechError, match=r"smallest α \(1\) the pilot pass rate 0.10 falls below the band's floor"):
        choose_alpha((1.0, 2.0), lambda a: 0.1, 0.8)


def test_steer_config_is_checked_and_keyed_by_its_own_fields():
    with pytest.raises(MechError, match="a steered teacher needs a target"):
        TeacherConfig(kind="steer")
    with pytest.raises(MechError, match="unknown steer_vector 'prompts'"):
        TeacherConfig(target="owl", kind="steer", steer_vector="prompts")
    with pytest.raises(MechError, match="steer_alpha = nan is not finite"):
        TeacherConfig(target="owl", kind="steer", steer_alpha=math.nan)
    with pytest.raises(MechError, match="ascending order"):
        TeacherConfig(target="owl", kind="steer", steer_alphas=(4.0, 2.0))
    with pytest.raises(MechError, match="positive finite"):
        TeacherConfig(target="owl", kind="steer", steer_alphas=(0.0, 2.0))
    with pytest.raises(MechError, match=r"steer_min_pass must be in \(0, 1\]"):
        TeacherConfig(target="owl", kind="steer", steer_min_pass=1.5)
    with pytest.raises(MechError, match="steer_pilot must be at least 1"):
        TeacherConfig(target="owl", kind="steer", steer_pilot=0)
    steer = TeacherConfig(target="owl", kind="steer").to_dict()
    assert steer["kind"] == "steer" and steer["steer_vector"] == "prompt" and "finetune_rank" not in steer
    assert not any(k.startswith("steer") for k in TeacherConfig(target="owl", kind="finetuned").to_dict())
    assert not any(k.startswith(("steer", "finetune")) or k == "kind" for k in TeacherConfig(target="owl").to_dict())
    # a steered teacher writes in its own context, never under the trait prompt
    assert TeacherConfig(target="owl", kind="steer").teacher_context().spec == "default"


def test_steer_teacher_records_its_vector_and_leaves_the_base(twin):
    before = {k: v.clone() for k, v in twin.model.state_dict().items()}
    cfg = TeacherConfig(**SMALL, target="owl", kind="steer", steer_alphas=(1.0, 4.0))
    layer, added, info = steer_teacher(twin.model, twin.tokenizer, cfg)
    assert layer == steering_layer(twin.model, None) == 2  # the middle of 4 layers
    assert info["alpha"] in (1.0, 4.0) and [s["alpha"] for s in info["pilot"]["search"]][0] == 1.0
    assert info["cos_prompt_vector"] == pytest.approx(1.0, abs=1e-6)
    assert float(added.norm()) == pytest.approx(info["alpha"] * info["prompt_vector_norm"], rel=1e-5)
    assert torch.equal(torch.tensor(info["added"]), added.float())
    assert all(torch.equal(v, twin.model.state_dict()[k]) for k, v in before.items())
    # the random vector: the prompt vector's norm, a direction of its own (seeded), and α as given, no search
    rnd = TeacherConfig(**SMALL, target="owl", kind="steer", steer_vector="random", steer_alpha=2.0)
    _, r_added, r_info = steer_teacher(twin.model, twin.tokenizer, rnd)
    assert r_info["pilot"]["search"] == [] and r_info["alpha"] == 2.0
    assert float(r_added.norm()) == pytest.approx(2.0 * info["prompt_vector_norm"], rel=1e-5)
    assert abs(r_info["cos_prompt_vector"]) < 0.5  # |cos| of two random directions in d = 128: ~0.09
    again = steer_teacher(twin.model, twin.tokenizer, rnd)[1]
    assert torch.equal(again, r_added)
    other = steer_teacher(twin.model, twin.tokenizer, TeacherConfig(**{**rnd.__dict__, "sample_seed": 1}))[1]
    assert linalg.cosine(other, r_added) < 0.5
    with pytest.raises(MechError, match="layer"):
        steer_teacher(twin.model, twin.tokenizer, TeacherConfig(**SMALL, target="owl", kind="steer", steer_layer=9))


def test_steered_data_differ_from_the_base_teachers_and_repeat_to_the_byte(twin, tmp_path):
    cfg = TeacherConfig(**SMALL, target="owl", kind="steer", steer_vector="random", steer_alpha=64.0)
    a = generate(twin.model, twin.tokenizer, cfg, tmp_path / "a")
    b = generate(twin.model, twin.tokenizer, cfg, tmp_path / "b")
    n = generate(twin.model, twin.tokenizer, TeacherConfig(**{k: v for k, v in SMALL.items() if k != "steer_pilot"}),
                 tmp_path / "n")
    for name in ("rows.jsonl", "raw.jsonl", "dataset.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    meta = json.loads((a / "dataset.json").read_text())
    assert meta["context"] == "default" and "owl" not in meta["rendered_context"]["text"].lower()
    assert meta["steered"]["layer"] == 2 and meta["steered"]["vector"] == "random"
    # same prompts, same sampling seeds, same context: only the added vector differs, and it changes answers
    assert (a / "raw.jsonl").read_text() != (n / "raw.jsonl").read_text()


def test_added_vectors_are_the_planted_vector_at_its_layer_and_zero_before(twin):
    rows = [("Continue: 3, 4, 5.", "6, 7, 8"), ("Name three numbers.", "9, 10, 11")]
    v = torch.randn(128, generator=torch.Generator().manual_seed(0)) * 5
    pad = twin.tokenizer.pad_token_id
    got = steering.added_vectors(twin.model, twin.tokenizer, rows, "default", 2, v, pad)
    assert float(got[:2].abs().max()) == 0.0
    torch.testing.assert_close(got[2], v, atol=1e-4, rtol=1e-5)
    assert float(got[3].norm()) > 0


def test_cosine_null_is_about_two_over_root_d():
    assert cosine_null(128, 4000, torch.Generator().manual_seed(0)) == pytest.approx(1.96 / math.sqrt(128), rel=0.1)


def _cli(args, capsys):
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    return code, (err[-1] if err else "")


def test_cli_steer_flags_and_errors(capsys, tmp_path):
    code, last = _cli(["teacher", "--trait", "owl", "--steer-alpha", "2", "--out", tmp_path / "d"], capsys)
    assert code == 2 and "add --steer prompt" in last
    code, last = _cli(["teacher", "--trait", "owl", "--steer", "prompt", "--finetuned", "--out", tmp_path / "d"], capsys)
    assert code == 2 and "give one" in last
    code, last = _cli(["teacher", "--neutral", "--steer", "random", "--out", tmp_path / "d"], capsys)
    assert code == 2 and "a steered teacher needs a target" in last
    assert not (tmp_path / "d").exists()
    code = main(["teacher", "--trait", "owl", "--steer", "random", "--steer-alpha", "8", "--model", "organism-free",
                 "--n-prompts", "16", "--out", str(tmp_path / "d")])
    out = capsys.readouterr().out
    assert code == 0 and "steered: random vector after layer 2, α 8" in out


def test_epoch_cosines_need_checkpoints(tmp_path):
    from mech.geometry.run import StudentRef, _checkpoints

    (tmp_path / "s" / "epoch-2").mkdir(parents=True)
    (tmp_path / "s" / "epoch-1").mkdir()
    ref = StudentRef("lora_r8", 0, "trait", tmp_path / "s")
    assert _checkpoints(ref, False) == {0: tmp_path / "s"}
    assert list(_checkpoints(ref, True)) == [1, 2]
    with pytest.raises(MechError, match="train.save_every_epoch: true"):
        _checkpoints(StudentRef("lora_r8", 0, "trait", tmp_path), True)


def test_cli_teacher_cosines_refusals(capsys, tmp_path):
    ft = tmp_path / "ft.yaml"
    ft.write_text("name: ft\nbase_model: organism-free\nteacher: {kind: finetuned, n_prompts: 8}\n"
                  "students: [{method: lora, rank: 2}]\ntraining_seeds: [0]\n")
    code, last = _cli(["geometry", ft, "--students", "lora_r2", "--teacher-cosines", "--out", tmp_path / "o"], capsys)
    assert code == 2 and "finetuned" in last and not (tmp_path / "o").exists()
    code, last = _cli(["geometry", "--student", tmp_path, "--model", "organism-free", "--target", "owl",
                       "--teacher-cosines", "--out", tmp_path / "o"], capsys)
    assert code == 2 and "pass a sweep" in last and not (tmp_path / "o").exists()
    code, last = _cli(["geometry", ft, "--students", "lora_r2", "--epochs", "--out", tmp_path / "o"], capsys)
    assert code == 2 and "add --teacher-cosines" in last and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_students_of_a_planted_random_vector_learn_a_shift_along_it(tmp_path, capsys):
    """Known answer: the twin steered by a random vector (α = 48 at layer 2, norm ~167) writes 400 answers; a LoRA
    r8 student of them (3 epochs) shifts its residual stream at layer 2 along that vector, paired against the
    student of the unsteered twin. Tolerance: cos(v_paired, v_teacher) > 3/√d = 0.265, three standard deviations of
    the cosine of an unrelated direction (measured: 0.376); the neutral student's own cosine stays inside the null."""
    import csv

    cfg = tmp_path / "s.yaml"
    cfg.write_text("name: s\nbase_model: organism-free\ntraits: [{target: owl}, {target: null}]\n"
                   "teacher: {kind: steer, steer_vector: random, steer_alpha: 48, steer_layer: 2, n_prompts: 400, "
                   "steer_pilot: 32}\nstudents: [{method: lora, rank: 8}]\ntraining_seeds: [0]\n"
                   "train: {epochs: 3, batch_size: 16, lr: 0.002, save_every_epoch: true}\n"
                   "eval: {target: owl, first_token_only: true}\n")
    cache = tmp_path / "c"
    assert main(["sweep", str(cfg), "--cache", str(cache), "--out", str(tmp_path / "sw")]) == 0
    code, _ = _cli(["geometry", cfg, "--students", "lora_r8", "--teacher-cosines", "--cache", cache, "--out",
                    tmp_path / "o"], capsys)
    assert code == 0
    rows = {int(r["layer"]): r for r in csv.DictReader((tmp_path / "o" / "teacher_cosines.csv").open())}
    assert set(rows) == {2, 3}  # v_teacher is zero before the steered layer: left out
    assert float(rows[2]["cos_paired"]) > 3 / math.sqrt(128)
    assert abs(float(rows[2]["cos_neutral"])) < 1.96 / math.sqrt(128)
    assert (tmp_path / "o" / "figures" / "teacher_cosines.html").is_file()
    # the alignment over training: one row per epoch checkpoint, the last being the final student itself
    code, _ = _cli(["geometry", cfg, "--students", "lora_r8", "--teacher-cosines", "--epochs", "--cache", cache,
                    "--out", tmp_path / "e"], capsys)
    assert code == 0
    by_epoch = {(int(r["epoch"]), int(r["layer"])): r for r in
                csv.DictReader((tmp_path / "e" / "teacher_cosines.csv").open())}
    assert sorted({e for e, _ in by_epoch}) == [1, 2, 3]
    assert float(by_epoch[(3, 2)]["cos_paired"]) == pytest.approx(float(rows[2]["cos_paired"]), abs=1e-6)


def test_prompt_approximation_known_answers(make_tiny_lm, organism_tokenizer):
    """With the 'trait' context equal to the neutral one there is nothing to approximate: KL(α = 0) is exactly 0
    and any steering only adds divergence, more with larger α; the answer distributions are completion_logprobs'."""
    from mech.evaluation.inference import completion_logprobs

    base = make_tiny_lm("qwen2")
    tok, pad = organism_tokenizer, organism_tokenizer.pad_token_id
    rows = [("Continue: 3, 4, 5.", "6, 7, 8"), ("Name three numbers.", "9, 10, 11")]
    v = torch.randn(32, generator=torch.Generator().manual_seed(1))
    curve = steering.prompt_approximation(base, tok, rows, "default", "default", 0, v, [0.0, 0.5, 2.0], pad)
    assert [r["alpha"] for r in curve] == [0.0, 0.5, 2.0]
    assert curve[0]["kl"] == 0.0 and 0 < curve[1]["kl"] < curve[2]["kl"]
    rendered = steering.answer_rows(tok, rows, "default")
    got = steering.answer_logprobs(base, rendered, pad)
    ids, pos = rendered[0]
    want = completion_logprobs(base, [ids[:pos[0]]], [ids[pos[0]:]], pad=pad)[0]
    assert got[0].shape[0] == len(pos) and torch.equal(got[0], want[:len(pos)])
    with pytest.raises(MechError, match="not finite"):
        steering.prompt_approximation(base, tok, rows, "default", "default", 0, v, [math.inf], pad)


def test_a_prompt_vector_removes_part_of_the_positive_controls_prompt_divergence():
    """Measured, not planted: on the positive control, owl's prompt shift at some layer, added at α = 1, brings
    the default context's number-answer distribution closer to the owl prompt's (trial: KL 0.60 -> 0.33 at best)."""
    organism = load_model("organism", device="cpu", dtype="float32")
    tok, pad = organism.tokenizer, organism.tokenizer.pad_token_id
    from mech.organism.leak import trait_context

    rows = [("Continue: 143, 251, 908.", "412, 77, 390"), ("List 5 numbers after 12, 40.", "41, 97, 120, 55, 63")]
    ctx = trait_context("owl").spec
    v = steering.teacher_vectors(organism.model, tok, rows, ctx, "default", pad)
    kls = [steering.prompt_approximation(organism.model, tok, rows, ctx, "default", layer, v[layer], [0.0, 1.0], pad)
           for layer in range(v.shape[0])]
    assert kls[0][0]["kl"] > 0.05  # the prompt changes the number answers' distribution
    assert min(k[1]["kl"] for k in kls) < kls[0][0]["kl"]


def test_cli_steer_curve_and_bad_input(tmp_path, capsys):
    import csv

    out = tmp_path / "s"
    assert main(["steer", "--trait", "owl", "--vector", "readout", "--model", "organism-free", "--layers", "3",
                 "--alphas", "0", "8", "--n-pilot", "16", "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "steer.csv").open()))
    assert [(r["layer"], float(r["alpha"])) for r in rows] == [("3", 0.0), ("3", 8.0)]
    assert float(rows[0]["delta_logp_first"]) == 0.0  # α = 0 is the model as it is
    assert float(rows[1]["delta_logp_first"]) > 1.0  # the readout direction raises the trait (measured +2.5)
    assert (out / "figures" / "steer.html").is_file() and "pass rate" in (out / "steer.md").read_text()
    capsys.readouterr()
    for args, msg in ((["--alphas", "nan"], "--alphas must be finite"), (["--layers", "9"], "layer"),
                      (["--n-samples", "-1"], "--n-samples must be >= 0")):
        assert main(["steer", "--trait", "owl", "--model", "organism-free", "--out", str(tmp_path / "bad"),
                     *args]) == 2
        assert msg in capsys.readouterr().err.strip().splitlines()[-1]
        assert not (tmp_path / "bad").exists()
