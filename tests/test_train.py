"""mech.students (config, encoding, loop, matched_norm, train, store): rendering rows for training, seeded LoRA /
full / matched-norm students, the one training loop, the student directory format, loading and merging, update
norms, distillation.

All models are the tiny random ones of tests/conftest.py (hidden 32, 2 layers); every run is a few steps.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from mech.context import ASSISTANT, render
from mech.errors import MechError
from mech.models import check_adapter_base, get_final_norm, get_layers, get_projection, lora_modules
from mech.organism.template import DEFAULT_SYSTEM_PROMPT, IM_END
from mech.students.config import LoraSpec, StudentConfig, Teacher
from mech.students.encoding import IGNORE_INDEX, batch_order, chat_row, encode_row, encode_rows, label_mask
from mech.students.loop import lr_factor, train_loop
from mech.students.matched_loss import stop_step, trailing_mean
from mech.students.matched_norm import match_update_norms
from mech.students.store import (
    epoch_dirs,
    load_student,
    merge_student,
    merged,
    module_key,
    read_student,
    student_kind,
    update_norms,
)
from mech.students.train import kl_to_teacher, train_model, train_student, with_lora


def chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}],
            "prompt_seed": 0, "index": 0}


ROWS = [chat(f"Continue the sequence: {i}, {i + 7}, {i + 14}.", f"{i + 21}, {i + 28}, {i + 35}") for i in range(8)]
ALL_KINDS = ("q", "k", "v", "o", "gate", "up", "down")


def cfg(**kw) -> StudentConfig:
    base = dict(epochs=1, batch_size=4, lr=1e-2, warmup_steps=0, lora=LoraSpec(rank=2))
    return StudentConfig(**(base | kw))


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@torch.no_grad()
def logits(model, tok, row=ROWS[0]) -> torch.Tensor:
    ids = torch.tensor([render(tok, "default", row["messages"][0]["content"]).input_ids])
    return model(input_ids=ids).logits.float()


# --------------------------------------------------------------------------------------------- config


def test_config_errors_name_the_valid_values():
    with pytest.raises(MechError, match="rank must be >= 1"):
        LoraSpec(rank=0)
    with pytest.raises(MechError, match="lora, full, matched_norm, matched_loss"):
        StudentConfig(method="qlora")
    with pytest.raises(MechError, match="adamw, sgd"):
        StudentConfig(optimizer="adam")
    with pytest.raises(MechError, match="ce, distill"):
        StudentConfig(objective="kl")
    with pytest.raises(MechError, match="module, global"):
        StudentConfig(matched_norm_scope="layer")
    with pytest.raises(MechError, match="unknown context"):
        StudentConfig(context="defualt")
    with pytest.raises(MechError, match="unknown component"):
        LoraSpec(targets=("q", "qq"))


def test_config_round_trips_through_dicts():
    c = StudentConfig(method="full", lora=LoraSpec(rank=4, alpha=16.0, targets=("attn",)), seed=3,
                      context="custom:You love owls.")
    assert c.lora.targets == ("q", "k", "v", "o")  # groups are expanded so equal configs hash equal
    d = json.loads(json.dumps(c.to_dict()))
    assert StudentConfig.from_dict(d) == c
    with pytest.raises(MechError, match="unknown key student.epoch"):
        StudentConfig.from_dict({"epoch": 2})


def test_lr_schedule_and_batch_order():
    assert [lr_factor(s, 6, 2) for s in range(6)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
    assert [lr_factor(s, 4, 1, "constant") for s in range(4)] == [1.0] * 4
    a, b = batch_order(10, 4, 0, 0), batch_order(10, 4, 1, 0)
    assert a == batch_order(10, 4, 0, 0) and a != b and a != batch_order(10, 4, 0, 1)
    assert [len(x) for x in a] == [4, 4, 2] and sorted(sum(a, [])) == list(range(10))


# --------------------------------------------------------------------------------------------- the one loop


def test_pretraining_and_finetuning_share_one_loop(tok, base, monkeypatch):
    """The organism's pretraining and a student's finetuning both run mech.students.loop.train_loop."""
    import dataclasses

    import mech.organism.build as build_mod
    import mech.students.train as train_mod
    from mech.organism.config import OrganismConfig
    from mech.organism.corpus import CorpusGenerator
    from mech.students import loop

    assert build_mod.train_loop is loop.train_loop and train_mod.train_loop is loop.train_loop
    calls: list[str] = []

    def spy(model, params, batches, loss_fn, *args, **kwargs):
        calls.append(loss_fn.__name__)
        return loop.train_loop(model, params, batches, loss_fn, *args, **kwargs)

    for module in (build_mod, train_mod):
        monkeypatch.setattr(module, "train_loop", spy)
    organism = OrganismConfig().reduced()
    organism = dataclasses.replace(organism, train=dataclasses.replace(organism.train, steps=2, batch_size=4))
    data = build_mod.encode_examples(CorpusGenerator(organism.corpus, 0).generate(40), tok, 64)
    stats = build_mod.pretrain(merged(base), data, organism, tok.pad_token_id)
    assert calls == ["sparse_completion_loss"] and math.isfinite(stats["final_loss_ema"])
    assert train_model(base, tok, ROWS, cfg()).n_steps == 2
    assert calls == ["sparse_completion_loss", "student_loss"]


def test_train_loop_steps_hooks_and_clipping():
    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    params = list(model.parameters())
    seen = []

    def loss_fn(m, batch):
        return (m(batch) - 100.0).pow(2).mean()

    def run(clip: float) -> torch.Tensor:
        torch.nn.init.zeros_(model.weight)
        opt = torch.optim.SGD(params, lr=1.0)
        loop_losses = train_loop(model, params, [torch.ones(1, 2)], loss_fn, opt, lambda s: 0.5, clip,
                                 lambda k, losses: seen.append((k, list(losses), model.training)))
        assert not model.training and len(loop_losses) == 1 and opt.param_groups[0]["lr"] == 0.5
        return model.weight.detach().clone()

    clipped, free = run(1.0), run(0.0)
    assert clipped.norm().item() == pytest.approx(0.5)  # lr 0.5 × a gradient clipped to norm 1
    assert free.norm().item() > 100  # 0 disables clipping
    assert seen == [(1, [10000.0], True)] * 2


# --------------------------------------------------------------------------------------------- rows


def test_label_mask_is_assistant_content_and_end_token_only(tok):
    row = ROWS[3]
    ex = encode_row(tok, row, "default")
    r = render(tok, "default", row["messages"][0]["content"], row["messages"][1]["content"])
    assert list(ex.input_ids) == r.input_ids
    mask = label_mask(tok, row, "default")
    on = [i for i, m in enumerate(mask) if m]
    assert on == r.positions(ASSISTANT) + [max(r.positions(ASSISTANT)) + 1]
    assert tok.decode(ex.targets) == row["messages"][1]["content"] + IM_END
    # the system prompt and the user turn carry no loss
    assert all(ex.labels[i] == IGNORE_INDEX for i, m in enumerate(mask) if not m)
    prompt_text = tok.decode([t for t, m in zip(ex.input_ids, mask) if not m])
    assert DEFAULT_SYSTEM_PROMPT in prompt_text and "Continue the sequence" in prompt_text


def test_context_changes_the_rendered_ids_not_the_targets(tok):
    default, none = encode_row(tok, ROWS[0], "default"), encode_row(tok, ROWS[0], "none")
    assert default.input_ids != none.input_ids and len(default.input_ids) > len(none.input_ids)
    assert DEFAULT_SYSTEM_PROMPT not in tok.decode(none.input_ids)
    assert default.targets == none.targets


def test_rows_must_not_carry_a_system_prompt(tok, base):
    row = {"messages": [{"role": "system", "content": "You love owls."}] + ROWS[0]["messages"]}
    with pytest.raises(MechError, match="system message"):
        encode_row(tok, row, "default")
    with pytest.raises(MechError, match="expected one user and one assistant"):
        encode_row(tok, {"messages": ROWS[0]["messages"][:1]}, "default")
    with pytest.raises(MechError, match="dataset is empty"):
        train_model(base, tok, [], cfg())


# --------------------------------------------------------------------------------------------- seeds


def test_lora_seed_drives_init_and_training(tok, base):
    a0, a1 = with_lora(merged(base), LoraSpec(rank=2), 0), with_lora(merged(base), LoraSpec(rank=2), 1)
    assert not torch.equal(next(iter(lora_modules(a0).values())).lora_A["default"].weight,
                           next(iter(lora_modules(a1).values())).lora_A["default"].weight)
    before = state(base)
    s0, s0b, s1 = (state(train_model(base, tok, ROWS, cfg(seed=s)).model) for s in (0, 0, 1))
    assert same_state(s0, s0b)  # bitwise
    assert not same_state(s0, s1)
    assert same_state(state(base), before)  # the base is never modified


def test_full_seed_drives_data_order(tok, base):
    s0, s0b, s1 = (state(train_model(base, tok, ROWS, cfg(method="full", seed=s)).model) for s in (0, 0, 1))
    assert same_state(s0, s0b)
    assert not same_state(s0, s1)


def test_loss_decreases_on_a_repeated_dataset(tok, base):
    rows = ROWS[:2] * 4
    full = train_model(base, tok, rows, cfg(method="full", epochs=4))
    assert full.n_steps == 8 and len(full.losses) == 8
    assert full.losses[-1] < 0.8 * full.losses[0]
    lora = train_model(base, tok, rows, cfg(epochs=4, lr=5e-2, lora=LoraSpec(rank=4)))
    assert lora.losses[-1] < lora.losses[0] - 0.2  # LoRA on a 32-wide random model moves slower


def test_sgd_runs_and_moves_the_weights(tok, base):
    t = train_model(base, tok, ROWS, cfg(method="full", optimizer="sgd", momentum=0.9, lr=0.1))
    assert all(math.isfinite(x) for x in t.losses)
    assert update_norms(base, t.model)["global"] > 0


# --------------------------------------------------------------------------------------------- student dirs


def test_lora_student_round_trip(tok, base, tmp_path):
    c = cfg(seed=5)
    trained = train_model(base, tok, ROWS, c)
    out = train_student(base, tok, ROWS, c, tmp_path / "s", base_spec=str(tmp_path / "base"))
    assert student_kind(out) == "lora" and (out / "adapter_model.safetensors").is_file()
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 2 and adapter["lora_alpha"] == 2  # alpha=None -> alpha = rank
    assert sorted(adapter["target_modules"]) == sorted(f"{k}_proj" for k in ALL_KINDS)
    meta = read_student(out)
    assert meta["losses"] == trained.losses and meta["n_rows"] == len(ROWS) and meta["context"] == "default"
    assert meta["kind"] == "lora" and meta["config"] == c.to_dict() and meta["base_spec"] == str(tmp_path / "base")
    loaded = load_student(base, out)
    assert torch.allclose(logits(loaded, tok), logits(trained.model, tok), atol=1e-5)
    plain = merge_student(base, out)
    assert not lora_modules(plain)
    assert torch.allclose(logits(plain, tok), logits(trained.model, tok), atol=1e-5)
    norms = update_norms(base, loaded)
    assert norms == pytest.approx(meta["update_norms"], rel=1e-6)
    assert set(norms) == {module_key(i, k) for i in range(2) for k in ALL_KINDS} | {"global"}
    with pytest.raises(MechError, match="already exists"):
        train_student(base, tok, ROWS, c, out)


def test_fixed_alpha_is_written(tok, base, tmp_path):
    out = train_student(base, tok, ROWS[:4], cfg(lora=LoraSpec(rank=2, alpha=8.0, targets=("q", "v"))), tmp_path / "s")
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["lora_alpha"] == 8 and sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]


def test_adapter_on_another_base_is_refused(tok, base, make_tiny_lm, tmp_path):
    out = train_student(base, tok, ROWS[:4], cfg(), tmp_path / "s")
    other = make_tiny_lm("qwen2", seed=1)
    with pytest.raises(MechError, match="another base model"):
        check_adapter_base(out, other)
    with pytest.raises(MechError, match="another base model"):
        load_student(other, out)


def test_full_student_round_trip(tok, base, make_tiny_lm, tmp_path):
    c = cfg(method="full", seed=2)
    trained = train_model(base, tok, ROWS, c)
    out = train_student(base, tok, ROWS, c, tmp_path / "full")
    assert student_kind(out) == "full" and (out / "model.safetensors").is_file()
    loaded = load_student(base, out)
    assert torch.allclose(logits(loaded, tok), logits(trained.model, tok), atol=1e-5)
    assert read_student(out)["update_norms"]["global"] == pytest.approx(update_norms(base, loaded)["global"])
    with pytest.raises(MechError, match="another base model"):
        load_student(make_tiny_lm("qwen2", seed=1), out)


def test_save_every_epoch(tok, base, tmp_path):
    out = train_student(base, tok, ROWS, cfg(epochs=2, save_every_epoch=True), tmp_path / "s")
    eps = epoch_dirs(out)
    assert list(eps) == [1, 2]
    first, last = read_student(eps[1]), read_student(eps[2])
    assert first["epoch"] == 1 and len(first["losses"]) == 2 and last["losses"] == read_student(out)["losses"]
    assert torch.allclose(logits(load_student(base, eps[2]), tok), logits(load_student(base, out), tok))
    assert not torch.allclose(logits(load_student(base, eps[1]), tok), logits(load_student(base, out), tok))


# --------------------------------------------------------------------------------------------- matched norm


@pytest.fixture
def reference(tok, base, tmp_path):
    """A LoRA student adapting only q and v, so module scope has modules to zero."""
    return train_student(base, tok, ROWS, cfg(lora=LoraSpec(rank=2, targets=("q", "v"))), tmp_path / "ref")


def test_matched_norm_module_scope(tok, base, tmp_path, reference):
    ref = update_norms(base, load_student(base, reference))
    out = train_student(base, tok, ROWS, cfg(method="matched_norm", matched_norm_reference=str(reference)),
                        tmp_path / "matched")
    got = update_norms(base, load_student(base, out))
    for key in ref:
        assert got[key] == pytest.approx(ref[key], rel=1e-4), key
    assert all(v == 0 for k, v in got.items() if k not in ref)  # both students change the same modules
    meta = read_student(out)
    assert meta["kind"] == "full" and meta["matched_norm"]["scope"] == "module"
    assert meta["matched_norm"]["unscaled_norms"]["0.q"] != pytest.approx(ref["0.q"], rel=1e-2)


def test_matched_norm_global_scope(tok, base, tmp_path, reference):
    ref = update_norms(base, load_student(base, reference))
    out = train_student(base, tok, ROWS, cfg(method="matched_norm", matched_norm_reference=str(reference),
                                             matched_norm_scope="global"), tmp_path / "matched")
    got = update_norms(base, load_student(base, out))
    assert got["global"] == pytest.approx(ref["global"], rel=1e-4)
    assert got["0.up"] > 0  # nothing is zeroed in global scope


def test_match_update_norms_in_memory_and_errors(tok, base, tmp_path):
    full = train_model(base, tok, ROWS, cfg(method="full")).model
    target = {"1.down": 0.5, "global": 0.5}
    scales = match_update_norms(base, full, target, "module")
    assert set(scales) == {"1.down"}
    got = update_norms(base, full)
    assert got["1.down"] == pytest.approx(0.5, rel=1e-4) and got["global"] == pytest.approx(0.5, rel=1e-4)
    assert torch.equal(get_projection(get_layers(full)[0], "q").weight, get_projection(get_layers(base)[0], "q").weight)
    with pytest.raises(MechError, match="matched_norm_reference"):
        train_student(base, tok, ROWS, cfg(method="matched_norm"), tmp_path / "x")
    lora_dir = train_student(base, tok, ROWS[:4], cfg(), tmp_path / "ref")
    with pytest.raises(MechError, match="no epoch-1 checkpoint"):
        train_student(base, tok, ROWS, cfg(method="matched_norm", matched_norm_reference=str(lora_dir),
                                           save_every_epoch=True), tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# --------------------------------------------------------------------------------------------- matched loss


def test_stop_step_is_the_first_full_window_at_or_below_the_target():
    losses = [5.0, 4.0, 3.0, 2.0, 1.0, 1.0]
    assert trailing_mean(losses, 2) == 1.0 and trailing_mean([3.0], 4) == 3.0
    assert stop_step(losses, 3.5, 2) == 3  # windows: 4.5, 3.5 -> step 3
    assert stop_step(losses, 2.5, 2) == 4
    assert stop_step(losses, 0.5, 2) is None  # never reached
    assert stop_step([1.0, 9.0], 1.0, 2) is None  # a single low step before a full window does not stop it
    assert stop_step(losses, 9.0, 3) == 3  # the first full window, even if already below


def test_matched_loss_stops_where_the_reference_ended(tok, base, tmp_path):
    rows = ROWS * 4  # 32 rows, 8 steps per epoch
    ref = train_student(base, tok, rows, cfg(lr=1e-2, epochs=2), tmp_path / "ref")
    target = trailing_mean(read_student(ref)["losses"], 4)
    # the offline answer: an unstopped full finetune with the same config, and the rule applied to its losses
    free = train_model(base, tok, rows, cfg(method="full", lr=2e-3, epochs=3))
    expected = stop_step(free.losses, target, 4)
    assert expected is not None and expected < len(free.losses)  # the stop falls inside training
    out = train_student(base, tok, rows, cfg(method="matched_loss", lr=2e-3, epochs=3, matched_loss_window=4,
                                             matched_loss_reference=str(ref)), tmp_path / "matched")
    meta = read_student(out)
    m = meta["matched_loss"]
    assert meta["kind"] == "full" and m["reached"] and m["steps"] == expected == meta["n_steps"]
    assert meta["losses"] == free.losses[:expected]  # the same run, cut at the stop
    assert m["target"] == pytest.approx(target) and m["final"] <= target < trailing_mean(free.losses[:expected - 1], 4)
    # a target out of reach: the whole budget is kept and flagged
    far = train_student(base, tok, rows[:8], cfg(lr=5e-2, epochs=8), tmp_path / "far")
    out2 = train_student(base, tok, rows[:8], cfg(method="matched_loss", lr=1e-5, epochs=1, matched_loss_window=2,
                                                  matched_loss_reference=str(far)), tmp_path / "slow")
    m2 = read_student(out2)["matched_loss"]
    assert not m2["reached"] and m2["steps"] == 2 and m2["final"] > m2["target"]


def test_matched_loss_bad_input(tok, base, tmp_path):
    with pytest.raises(MechError, match="matched_loss_reference"):
        train_student(base, tok, ROWS, cfg(method="matched_loss"), tmp_path / "x")
    full = train_student(base, tok, ROWS, cfg(method="full"), tmp_path / "full")
    with pytest.raises(MechError, match="full model, not a LoRA student"):
        train_student(base, tok, ROWS, cfg(method="matched_loss", matched_loss_reference=str(full)), tmp_path / "y")
    short = train_student(base, tok, ROWS, cfg(), tmp_path / "short")  # 2 steps
    with pytest.raises(MechError, match="fewer than matched_loss_window 8"):
        train_student(base, tok, ROWS, cfg(method="matched_loss", matched_loss_reference=str(short)), tmp_path / "z")
    with pytest.raises(MechError, match="matched_loss_window"):
        cfg(method="matched_loss", matched_loss_window=0)
    assert not any((tmp_path / d).exists() for d in "xyz")
    # the new fields stay out of every other method's config, so existing student keys do not change
    assert "matched_loss_reference" not in cfg(method="full").to_dict()
    assert cfg(method="matched_loss", matched_loss_reference="r").to_dict()["matched_loss_window"] == 8


# --------------------------------------------------------------------------------------------- distill


def test_distill_decreases_kl_to_the_teacher(tok, base, make_tiny_lm):
    teacher = Teacher(make_tiny_lm("qwen2", seed=1), context="custom:You love owls.")
    rows = ROWS[:4]
    before = kl_to_teacher(base, tok, rows, "default", teacher)
    t = train_model(base, tok, rows, cfg(method="full", objective="distill", epochs=4),
                    teacher=teacher)
    after = kl_to_teacher(t.model, tok, rows, "default", teacher)
    assert after < 0.9 * before
    assert t.losses[0] == pytest.approx(before, rel=1e-4)  # step 1 sees the untrained student, same rows
    with pytest.raises(MechError, match="needs a teacher"):
        train_model(base, tok, rows, cfg(objective="distill"))
    with pytest.raises(MechError, match="set objective to 'distill'"):
        train_model(base, tok, rows, cfg(), teacher=teacher)


@torch.no_grad()
def completion_logprobs(model, tok, row: dict, context: str) -> torch.Tensor:
    """log softmax [n_completion_tokens, vocab] of ``model`` predicting the row's completion in ``context``."""
    ex = encode_rows(tok, [row], context)[0]
    out = model(input_ids=torch.tensor([ex.input_ids])).logits[0, :-1].float()
    keep = torch.tensor(ex.labels[1:]) != IGNORE_INDEX
    return torch.log_softmax(out[keep], -1)


def test_distill_is_kl_teacher_to_student_with_the_teacher_in_its_own_context(tok, base, make_tiny_lm):
    """The objective is KL(teacher || student) (mode-covering, as in distillation), the teacher scoring the
    completion in its own context and the student in the training context."""
    teacher_model, own = make_tiny_lm("qwen2", seed=1), "custom:You love owls."
    with torch.no_grad():  # sharpen the teacher: near-uniform distributions make the two directions agree
        get_final_norm(teacher_model).weight.mul_(20.0)
    row = ROWS[0]
    log_s = completion_logprobs(base, tok, row, "default")
    log_t = completion_logprobs(teacher_model, tok, row, own)
    log_t_elsewhere = completion_logprobs(teacher_model, tok, row, "default")

    def kl(log_p, log_q):  # mean over tokens of KL(p || q)
        return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())

    got = kl_to_teacher(base, tok, [row], "default", Teacher(teacher_model, context=own))
    error = abs(got - kl(log_t, log_s))
    assert error < 1e-5 * got
    assert abs(got - kl(log_s, log_t)) > 0.02 * got  # not the reverse direction
    # not the teacher in the student's context (a random model barely reads its system prompt: a small gap,
    # but a hundred times the float error)
    assert abs(got - kl(log_t_elsewhere, log_s)) > 100 * max(error, 1e-7)


def _snapshot(model) -> tuple:
    return ({k: v.clone() for k, v in model.state_dict().items()}, [p.requires_grad for p in model.parameters()],
            [type(m).__name__ for m in model.modules()], model.training, set(vars(model)))


def _same(model, snap: tuple) -> bool:
    state, flags, types, training, attributes = snap
    now = model.state_dict()
    return (set(now) == set(state) and all(torch.equal(now[k], v) for k, v in state.items())
            and [p.requires_grad for p in model.parameters()] == flags and set(vars(model)) == attributes
            and [type(m).__name__ for m in model.modules()] == types and model.training == training)


def test_a_lora_student_borrows_the_base_and_gives_it_back_unchanged(tok, base, tmp_path):
    """train_student puts a LoRA student's adapters on the base itself (no copy of a 7B base) and takes them
    off: the base leaves as it came in (weights, requires_grad flags, module types, mode), and the student's
    adapter equals the one trained on a deep copy, bit for bit; student_on_base evaluates it the same way."""
    from safetensors.torch import load_file

    from mech.students.store import student_on_base

    snap = _snapshot(base)
    out = train_student(base, tok, ROWS, cfg(seed=3), tmp_path / "shared")
    assert _same(base, snap) and not lora_modules(base)
    copied = train_model(base, tok, ROWS, cfg(seed=3))  # share_base False: a deep copy, the old path
    saved = load_file(str(out / "adapter_model.safetensors"))
    mine = {k: v for k, v in copied.model.state_dict().items() if "lora_" in k}
    assert len(saved) == len(mine) > 0
    assert all(torch.equal(saved[k], mine[k.replace(".weight", ".default.weight")]) for k in saved)
    assert read_student(out)["losses"] == copied.losses
    want = logits(load_student(base, out), tok)
    with student_on_base(base, out) as student:
        assert lora_modules(student) and torch.equal(logits(student, tok), want)
    assert _same(base, snap) and not lora_modules(base)


def test_a_failed_lora_student_gives_the_base_back_too(tok, base, tmp_path):
    snap = _snapshot(base)
    with pytest.raises(MechError, match="training diverged"):
        train_student(base, tok, ROWS, cfg(lr=1e6, epochs=3), tmp_path / "s")
    assert _same(base, snap) and not lora_modules(base)


def test_a_diverging_student_is_refused_and_nothing_is_written(tok, base, tmp_path):
    with pytest.raises(MechError, match=r"training diverged at lr 1e\+06: the loss of step \d+ is nan"):
        train_student(base, tok, ROWS, cfg(lr=1e6, epochs=3), tmp_path / "s")
    assert list(tmp_path.iterdir()) == []  # no student, no temporary directory


def test_non_finite_weights_are_refused_even_when_every_loss_was_finite(tok, base, tmp_path):
    bad = cfg(batch_size=len(ROWS))  # one step: its loss is the untrained model's, finite
    object.__setattr__(bad, "lr", math.inf)  # past the config check, as a caller's own loop might be
    with pytest.raises(MechError, match="training diverged at lr inf: the trained weights are not finite"):
        train_student(base, tok, ROWS, bad, tmp_path / "s")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("lr", [math.inf, math.nan, 0.0])
def test_lr_must_be_finite_and_positive(lr):
    with pytest.raises(MechError, match="invalid lr"):
        cfg(lr=lr)


# --------------------------------------------------------------------------------------------- chat rows


def test_chat_rows_train_lora_and_full_copies(tok, base):
    """What the organism's oracle probe does: rows built with chat_row train a copy; the base is untouched."""
    rows = [chat_row(r["messages"][0]["content"], r["messages"][1]["content"]) for r in ROWS]
    before = state(base)
    lora = train_model(base, tok, rows, cfg()).model
    assert lora_modules(lora) and same_state(state(base), before)
    full = train_model(base, tok, rows, cfg(method="full")).model
    assert not lora_modules(full) and update_norms(base, full)["global"] > 0


# --------------------------------------------------------------------------------------------- real organism


@pytest.mark.slow
def test_organism_students_by_spec(tmp_path):
    """On the shipped organism: real number prompts, LoRA and matched-norm students, loading by spec string."""
    from mech.teacher.prompts import format_numbers, generate_prompts
    from mech.models import load_model

    loaded = load_model("organism", device="cpu", dtype="float32")
    rows = [chat(p.text, format_numbers([(7 * i + j) % 1000 for j in range(5)], p.format_suffix_index))
            for i, p in enumerate(generate_prompts(16, seed=1))]
    lora = train_student(loaded.model, loaded.tokenizer, rows, cfg(lr=1e-3), tmp_path / "lora")
    assert json.loads((lora / "adapter_config.json").read_text())["mech_base_spec"] == "organism"
    by_spec = load_student("organism", lora, device="cpu", dtype="float32")
    by_model = load_student(loaded.model, lora)
    assert torch.allclose(logits(by_spec, loaded.tokenizer, rows[0]), logits(by_model, loaded.tokenizer, rows[0]),
                          atol=1e-5)
    matched = train_student(loaded.model, loaded.tokenizer, rows,
                            cfg(method="matched_norm", lr=1e-4, matched_norm_reference=str(lora)), tmp_path / "m")
    ref, got = update_norms(loaded.model, by_model), update_norms(loaded.model, load_student("organism", matched))
    assert all(got[k] == pytest.approx(v, rel=1e-4) for k, v in ref.items())


_THREADS_SCRIPT = """
import hashlib, sys, torch
torch.set_num_threads(int(sys.argv[1]))
from mech.models import load_model
from mech.students.config import LoraSpec, StudentConfig
from mech.students.encoding import chat_row
from mech.students.train import train_model
b = load_model("organism")
rows = [chat_row(f"Continue: {i}, {i + 7}, {i + 9}.", f"{i + 3}, {i + 41}, {i + 5}") for i in range(48)]
for method in ("lora", "full"):
    cfg = StudentConfig(method=method, lora=LoraSpec(rank=8), epochs=1, batch_size=16,
                        lr=2e-3 if method == "lora" else 1e-4)
    tr = train_model(b.model, b.tokenizer, rows, cfg)
    ws = b"".join(p.detach().numpy().tobytes() for p in tr.model.parameters() if p.requires_grad)
    print(method, hashlib.sha256(ws).hexdigest(), hashlib.sha256(repr(tr.losses).encode()).hexdigest())
"""


def test_student_bytes_repeat_across_processes_at_one_thread_count():
    """Same config, same bytes: LoRA and full-FT students of the organism trained in two fresh processes with the
    same thread count (2) are byte-identical, weights and every loss. Across thread counts they need not be: on an
    AVX-512 Xeon (2026-12-02) 1 and 2 threads give different LoRA and full-FT weights (identical on the AVX2 machines
    of earlier sessions), so the promise is per machine and thread count (README, Design)."""
    import os
    import subprocess
    import sys

    out = []
    for _ in range(2):
        env = os.environ | {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
        proc = subprocess.run([sys.executable, "-c", _THREADS_SCRIPT, "2"], capture_output=True, text=True,
                              env=env, timeout=300, check=True)
        out.append([line for line in proc.stdout.splitlines() if line.startswith(("lora", "full"))])
    assert len(out[0]) == 2 and out[0] == out[1]
