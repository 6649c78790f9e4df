"""Controls from the sweep config (random, shuffled within / across, banned-number teacher) and the shipped
experiment YAMLs of the decisive-science design. Config-level, plus one tiny run of the control datasets."""

from __future__ import annotations

import collections
import re
from pathlib import Path

import pytest
import torch

from mech.errors import MechError
from mech.organism import shipped_dir, trait_numbers, read_meta
from mech.sweep import SweepRunner, load_sweep
from mech.sweep.config import TraitSpec, teacher_config

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


def _cfg(tmp_path, traits: str, extra: str = ""):
    p = tmp_path / "c.yaml"
    p.write_text(f"name: c\ntraits: {traits}\ndata_seeds: [0, 1]\ntraining_seeds: [0]\n"
                 "teacher: {n_prompts: 8, max_new_tokens: 40}\nstudents: [{method: lora, rank: 2}]\n" + extra)
    return load_sweep(p)


def test_shipped_control_and_rank_yamls_load():
    controls = load_sweep(REPO / "experiments" / "controls.yaml")
    assert {t.control for t in controls.traits} == {None, "random", "shuffled_within", "shuffled_across", "banned"}
    assert len(controls.teacher_seeds) == 3 and controls.hypotheses
    ranks = load_sweep(REPO / "experiments" / "rank_sweep.yaml")
    lora = [s for s in ranks.students if s.method == "lora"]
    assert len({s.rank for s in lora}) >= 6
    assert {s.alpha for s in lora} == {None, 16.0}  # alpha = rank, and alpha fixed
    assert {h.test for h in ranks.hypotheses} == {"trend", "inverted_u"}


def test_banned_teacher_bans_the_organisms_numbers_and_changes_the_key(tmp_path):
    cfg = _cfg(tmp_path, "[{target: owl}, {target: null}, {target: owl, control: banned}]")
    owl_numbers = tuple(read_meta(shipped_dir("organism"))["entity_numbers"]["owl"])
    banned = teacher_config(cfg, TraitSpec("owl", control="banned"), 0)
    assert banned.banned == tuple(sorted(owl_numbers)) and trait_numbers("organism", "owl") == owl_numbers
    assert teacher_config(cfg, TraitSpec("owl"), 0).banned == ()
    explicit = teacher_config(cfg, TraitSpec("owl", control="banned", banned=(5, 3)), 0)
    assert explicit.banned == (3, 5)


@pytest.mark.parametrize("traits, match", [
    ("[{target: owl, control: shufled_within}]", "unknown control 'shufled_within'"),
    ("[{target: owl, banned: [1, 2]}]", "need control: banned"),
    ("[{target: null, control: banned}]", "needs its numbers"),
    ("[{target: owl, control: banned}, {target: owl, control: banned}]", "repeats"),
    ("[{target: owl, contrl: random}]", "unknown key"),
])
def test_bad_controls_are_one_line_errors(tmp_path, traits, match):
    with pytest.raises(MechError, match=match) as e:
        _cfg(tmp_path, traits)
    assert "\n" not in str(e.value)


def test_banned_control_on_a_model_without_recorded_numbers_is_an_error(tmp_path, tiny_qwen_dir):
    with pytest.raises(MechError, match="banned: \\[...\\]"):
        _cfg(tmp_path, "[{target: owl, control: banned}]", f"base_model: {tiny_qwen_dir}\n")


def _numbers(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"[0-9]+", text)]


def test_control_datasets_from_the_sweep(tmp_path):
    cfg = _cfg(tmp_path, "[{target: owl}, {target: null}, {target: null, control: random}, "
                         "{target: owl, control: shuffled_within}, {target: owl, control: shuffled_across}, "
                         "{target: owl, control: banned, banned: [1, 2, 3]}]")
    runner = SweepRunner(cfg, cache=tmp_path / "cache")
    arms = {t.label: t for t in cfg.traits}
    keys = {(label, d): runner.dataset_key(t, d) for label, t in arms.items() for d in cfg.teacher_seeds}
    assert len(set(keys.values())) == len(keys)  # every arm and every data seed has its own dataset
    from mech.teacher.dataset import load_dataset

    ds = {label: load_dataset(runner.dataset(t, 1)) for label, t in arms.items()}
    assert ds["neutral:random"].kind == "control_random"
    owl = [_numbers(a) for a in ds["owl"].answers()]
    within = [_numbers(a) for a in ds["owl:shuffled_within"].answers()]
    across = [_numbers(a) for a in ds["owl:shuffled_across"].answers()]
    assert owl and [sorted(x) for x in within] == [sorted(x) for x in owl] and within != owl
    assert collections.Counter(n for a in across for n in a) == collections.Counter(n for a in owl for n in a)
    assert [len(x) for x in across] == [len(x) for x in owl] and across != owl
    assert not any(n in (1, 2, 3) for a in ds["owl:banned"].answers() for n in _numbers(a))
    assert runner.computed["datasets"] == 6  # the shuffled arms reuse the owl dataset


@pytest.mark.slow  # ~16 s: six teacher datasets and seven base evaluations on the organism
def test_in_context_control_pairs_teacher_answers_against_neutral(tmp_path):
    """A teacher identical to the neutral one (its ban hits no number ever sampled) gives exactly 0; the owl
    teacher's answers in the prompt give a row per data seed and metric, from cached base evaluations."""
    from mech.sweep.runner import in_context_rows, in_context_text

    cfg = _cfg(tmp_path, "[{target: owl}, {target: null}, {target: null, control: banned, banned: [1000]}]",
               "eval: {first_token_only: true, in_context: 2}\n")
    runner = SweepRunner(cfg, cache=tmp_path / "cache")
    rows = in_context_rows(runner)
    assert {(r["trait"], r["teacher_seed"]) for r in rows} == {(t, d) for t in ("owl", "neutral:banned")
                                                                for d in (0, 1)}
    twin = [r for r in rows if r["trait"] == "neutral:banned" and r["metric"].startswith("in_context_paired")]
    assert twin and all(r["value"] == 0.0 for r in twin)
    owl = [r for r in rows if r["trait"] == "owl" and r["metric"] == "in_context_paired_logp_first"]
    assert len(owl) == 2 and all(r["value"] != 0.0 for r in owl)
    assert in_context_text(["1, 2", "3, 4", "5"], 2) == "1, 2\n3, 4"
    with pytest.raises(MechError, match="lower eval.in_context"):
        in_context_text(["1"], 2)


def test_a_random_numbers_student_is_keyed_by_its_base(tmp_path):
    """Random numbers need no model, so their dataset is shared by every base; the student trained on them is not.
    Before this test its key left the base out, and the twin's random-numbers students were taken from the cache
    for the positive control (caught only at evaluation: another rendered context than the base)."""
    from mech.sweep.config import cells

    cfg = _cfg(tmp_path, "[{target: owl}, {target: null}, {target: null, control: random}]")
    runners = [SweepRunner(cfg.__class__(**{**cfg.__dict__, "base_model": m}), cache=tmp_path / "cache")
               for m in ("organism", "organism-free")]
    assert runners[0].fingerprint != runners[1].fingerprint
    for cell in cells(cfg):
        datasets = {r.dataset_key(cell.trait, cell.teacher_seed) for r in runners}
        students = {r.student_key(cell) for r in runners}
        assert len(students) == 2, cell.trait.label  # every student is its base's own
        assert len(datasets) == (1 if cell.trait.control == "random" else 2)  # the random numbers are shared
