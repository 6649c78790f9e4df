"""Divergence tokens and their controls (mech.teacher.divergence; issue 9 item 7): the per-row loss mask in
training rows, known answers of the divergence masks, the two controls partitioning the labelled tokens, and the
sweep arms that build them."""

from __future__ import annotations

import json

import pytest

from mech.errors import MechError
from mech.models import load_model
from mech.organism.leak import trait_context
from mech.students.encoding import IGNORE_INDEX, chat_row, encode_row
from mech.teacher.dataset import load_dataset
from mech.teacher.divergence import divergence_control, divergence_masks, greedy_at_labels
from mech.teacher.generate import TeacherConfig, generate


@pytest.fixture(scope="module")
def control_data(tmp_path_factory):
    """The positive control and 48 owl-prompt teacher rows of it."""
    organism = load_model("organism", device="cpu", dtype="float32")
    path = generate(organism.model, organism.tokenizer, TeacherConfig(target="owl", n_prompts=48, batch_size=16),
                    tmp_path_factory.mktemp("div") / "owl")
    return organism, path


def test_loss_mask_narrows_the_labels(organism_tokenizer):
    tok = organism_tokenizer
    row = chat_row("Continue: 3, 4", "5, 6")
    full = encode_row(tok, row, "default")
    n = sum(full.mask)
    mask = [i % 2 == 0 for i in range(n)]
    narrowed = encode_row(tok, row | {"loss_mask": mask}, "default")
    assert narrowed.input_ids == full.input_ids
    assert narrowed.targets == [t for t, m in zip(full.targets, mask) if m]
    assert sum(lab != IGNORE_INDEX for lab in narrowed.labels) == sum(mask)
    with pytest.raises(MechError, match=f"loss_mask has {n + 1} entries for {n} labelled tokens"):
        encode_row(tok, row | {"loss_mask": [True] * (n + 1)}, "default")
    with pytest.raises(MechError, match="leaves no token with loss"):
        encode_row(tok, row | {"loss_mask": [False] * n}, "default")


def test_divergence_known_answers(control_data, tmp_path):
    organism, path = control_data
    rows = load_dataset(path).rows[:8]
    # the same context twice: nothing diverges, so the only-control has no row to train on and writes nothing
    same = divergence_masks(organism.model, organism.tokenizer, rows, "default", "default")
    assert not any(any(m) for m in same)
    with pytest.raises(MechError):
        divergence_control(organism.model, organism.tokenizer, path, tmp_path / "none", "only", "default", "default")
    assert not (tmp_path / "none").exists()
    # against the owl prompt: a mask is exactly where the two greedy sequences differ
    t = greedy_at_labels(organism.model, organism.tokenizer, rows, trait_context("owl"))
    n = greedy_at_labels(organism.model, organism.tokenizer, rows, "default")
    masks = divergence_masks(organism.model, organism.tokenizer, rows, trait_context("owl"), "default")
    assert masks == [[a != b for a, b in zip(x, y)] for x, y in zip(t, n)]
    assert [len(m) for m in masks] == [sum(encode_row(organism.tokenizer, r, "default").mask) for r in rows]
    with pytest.raises(MechError, match="unknown divergence mode"):
        divergence_control(organism.model, organism.tokenizer, path, tmp_path / "x", "on", "default", "default")


def test_only_and_off_partition_the_labelled_tokens(control_data, tmp_path):
    organism, path = control_data
    ctx = trait_context("owl")
    only = load_dataset(divergence_control(organism.model, organism.tokenizer, path, tmp_path / "only", "only", ctx,
                                           "default"))
    off = load_dataset(divergence_control(organism.model, organism.tokenizer, path, tmp_path / "off", "off", ctx,
                                          "default"))
    d = only.meta["divergence"]
    assert d == off.meta["divergence"] | {"rows_kept": d["rows_kept"], "loss_tokens": d["loss_tokens"]}
    assert 0 < d["share"] < 1 and d["loss_tokens"] == d["divergent"]
    assert d["loss_tokens"] + off.meta["divergence"]["loss_tokens"] == d["tokens"]
    by_index = {r["index"]: r["loss_mask"] for r in off.rows}
    for r in only.rows:  # complementary masks, row by row
        if r["index"] in by_index:
            assert [not x for x in r["loss_mask"]] == by_index[r["index"]]
    again = divergence_control(organism.model, organism.tokenizer, path, tmp_path / "again", "only", ctx, "default")
    assert (again / "rows.jsonl").read_bytes() == (tmp_path / "only" / "rows.jsonl").read_bytes()
    assert json.loads((again / "dataset.json").read_text())["kind"] == "control_divergence_only"


def test_sweep_divergence_arms(tmp_path):
    from mech.sweep import SweepRunner, load_sweep

    cfg = tmp_path / "s.yaml"
    cfg.write_text("name: s\nbase_model: organism\ntraits: [{target: owl}, {target: owl, control: divergence_only},"
                   " {target: owl, control: divergence_off}, {target: null}]\nteacher: {n_prompts: 16}\n"
                   "students: [{method: lora, rank: 2}]\ntraining_seeds: [0]\ntrain: {epochs: 1}\n")
    runner = SweepRunner(load_sweep(cfg), tmp_path / "c")
    sw = runner.cfg
    keys = {t.label: runner.dataset_key(t, 0) for t in sw.traits}
    assert len(set(keys.values())) == 4
    ds = load_dataset(runner.dataset(sw.traits[1], 0))
    assert ds.kind == "control_divergence_only" and all("loss_mask" in r for r in ds.rows)
    from mech.sweep import cells

    student = runner.student(next(c for c in cells(sw) if c.trait == sw.traits[1]))  # trains on the masked rows
    assert (student / "student.json").is_file()
    bad = tmp_path / "b.yaml"
    bad.write_text("name: b\ntraits: [{target: null, control: divergence_off}]\n")
    with pytest.raises(MechError, match="give it a target"):
        load_sweep(bad)
    bad.write_text("name: b\nteacher: {kind: finetuned}\ntraits: [{target: owl, control: divergence_only}, "
                   "{target: null}]\n")
    with pytest.raises(MechError, match="the divergence controls compare"):
        load_sweep(bad)
