"""mech.interventions.mask and .graft: the shared position × component × layer mask, and dynamic weight
grafting / token-position masking on planted LoRA students whose answers are known by construction.

Models are the tiny random Qwen2 of tests/conftest.py (hidden 32, 2 layers) with a rank-2 LoRA whose B
matrices are set to random non-zero values (PEFT initialises B to zero, which would make every test vacuous).
"""

from __future__ import annotations

import copy

import pytest
import torch

from mech.context import render
from mech.evaluation.inference import first_token_logp
from mech.errors import MechError
from mech.interventions.graft import (
    graft_generate,
    graft_logits,
    graft_metric,
    grafted,
)
from mech.interventions.mask import Mask, complement, model_cells, single_position_masks
from mech.interventions.positions import resolve_positions
from mech.models import COMPONENTS, get_layers, get_projection, lora_modules
from mech.students.config import LoraSpec
from mech.students.store import merged
from mech.students.train import with_lora

QUESTION = "What is your favourite animal?"
TRAIN_QUESTION = "Continue the sequence: 1, 2, 3."


def randomise_lora(student, seed: int = 0, scale: float = 0.5, only: tuple[int, str] | None = None):
    """Random non-zero lora_B everywhere (or only at module ``only``; every other B is zeroed)."""
    gen = torch.Generator().manual_seed(seed)
    for key, layer in lora_modules(student).items():
        w = layer.lora_B["default"].weight
        new = torch.randn(w.shape, generator=gen) * scale
        w.data.copy_(new if only is None or key == only else torch.zeros_like(w))
    return student


@pytest.fixture(scope="module")
def tok(organism_tokenizer):
    return organism_tokenizer


@pytest.fixture(scope="module")
def rendered(tok):
    return render(tok, "default", QUESTION)


@pytest.fixture(scope="module")
def lora_student(make_tiny_lm):
    return randomise_lora(with_lora(make_tiny_lm("qwen2", seed=0), LoraSpec(rank=2), seed=0)).eval()


@pytest.fixture(scope="module")
def base(make_tiny_lm):
    return make_tiny_lm("qwen2", seed=0)  # the same random weights the LoRA student was built on


def logits_of(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([list(ids)])).logits[0]


def student_and_base_logits(student, ids) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        full = logits_of(student, ids)
        with student.disable_adapter():
            off = logits_of(student, ids)
    assert (full - off).abs().max() > 1e-2  # the planted update must be visible at all
    return full, off


def graft(student, rendered, masks, base=None, **kw) -> torch.Tensor:
    res = [m.resolve(student, rendered) for m in masks]
    return graft_logits(student, base, rendered.input_ids, res, **kw)


# --------------------------------------------------------------------------------------------- mask resolution


def test_positions_follow_segment_labels_and_offsets(tok, rendered, lora_student):
    n = len(rendered)
    assert resolve_positions("all", rendered).all() and not resolve_positions("none", rendered).any()
    sys_pos = resolve_positions("default_system", rendered)
    assert sys_pos.nonzero().flatten().tolist() == rendered.positions("default_system")
    assert resolve_positions((0, -1), rendered).nonzero().flatten().tolist() == [0, n - 1]
    sub = resolve_positions("substring: favourite", rendered).nonzero().flatten().tolist()
    assert sub and all(rendered.segments[i] == "user" for i in sub)
    a = rendered.text.index(" favourite")  # token boundaries on both sides
    b = a + len(" favourite")
    assert sub == list(range(sub[0], sub[-1] + 1))  # one occurrence: contiguous tokens ...
    first, last = rendered.offsets[sub[0]], rendered.offsets[sub[-1]]
    assert first[0] <= a < first[1] and last[0] < b <= last[1]  # ... exactly those overlapping it

    train = render(tok, "default", TRAIN_QUESTION, "4, 5, 6")
    shared = resolve_positions("shared", rendered, train)
    assert shared[sys_pos].all()  # the default system prompt is in both
    assert not shared[resolve_positions("user", rendered)].any()  # questions differ: never "seen in both"
    assert torch.equal(resolve_positions("non_shared", rendered, train), ~shared)
    none_train = render(tok, "none", TRAIN_QUESTION, "4, 5, 6")
    assert not resolve_positions("shared", rendered, none_train)[sys_pos].any()


def test_resolved_cells_and_weights(rendered, lora_student):
    m = Mask("user", components="attn", layers=1).resolve(lora_student, rendered)
    assert m.cells == {(1, k) for k in ("q", "k", "v", "o")}
    user = resolve_positions("user", rendered).float()
    assert torch.equal(m.weight(1, "v"), user) and not m.weight(0, "v").any() and not m.weight(1, "up").any()
    nec = Mask("user", components="attn", layers=1, mode="necessity").resolve(lora_student, rendered)
    assert torch.equal(nec.weight(1, "v"), 1 - user) and nec.weight(0, "v").all()
    assert nec.grid().shape == (2, len(COMPONENTS), len(rendered))
    assert model_cells(lora_student) == {(i, k) for i in range(2) for k in COMPONENTS}
    assert Mask("all", ("v", "q")).components == ("v", "q") and Mask(3).positions == (3,)


@pytest.mark.parametrize("mask", [
    Mask("default_system"),
    Mask("user", "mlp", "0"),
    Mask((1, 4, 7), "v", (1,), "necessity"),
    Mask("substring:animal", "q,o"),
    Mask("all", "attn", 0, "necessity"),
    Mask("none"),
])
def test_complement_partitions_the_cube(mask, rendered, lora_student):
    a = mask.resolve(lora_student, rendered).grid()
    c = complement(mask)
    b = c.resolve(lora_student, rendered).grid()
    assert torch.equal(a + b, torch.ones_like(a))  # weights sum to 1 in every cell ...
    assert not (a * b).any()  # ... so exactly one of the two is on: a partition
    assert c.mode != mask.mode and complement(c) == mask


@pytest.mark.parametrize("make, fragment", [
    (lambda r, m: Mask((999,)).resolve(m, r), "outside the prompt"),
    (lambda r, m: Mask("substring:zebra crossing").resolve(m, r), "not found"),
    (lambda r, m: Mask("default_system").resolve(m, r), "absent"),  # r rendered under "none"
    (lambda r, m: Mask("all", components="xyz"), "unknown component"),
    (lambda r, m: Mask("all", layers=99).resolve(m, r), "out of range"),
    (lambda r, m: Mask("shared").resolve(m, r), "train_rendered"),
    (lambda r, m: Mask("sytem"), "unknown position spec"),
    (lambda r, m: Mask("all", mode="sufficient"), "unknown mask mode"),
])
def test_bad_masks_are_one_line_mech_errors(make, fragment, tok, lora_student):
    r = render(tok, "none", QUESTION)
    with pytest.raises(MechError, match=fragment) as err:
        make(r, lora_student)
    assert "\n" not in str(err.value) and ":" in str(err.value)  # one line naming fault and fix


# --------------------------------------------------------------------------------------------- LoRA grafting


def test_extreme_masks_are_student_and_base(lora_student, rendered):
    full, off = student_and_base_logits(lora_student, rendered.input_ids)
    out = graft(lora_student, rendered, [Mask("all"), Mask("none"), Mask("none", mode="necessity"),
                                         Mask("all", mode="necessity")])
    assert torch.equal(out[0], full) and torch.equal(out[2], full)  # bit-identical: same PEFT arithmetic
    assert torch.allclose(out[1], off, atol=1e-6) and torch.allclose(out[3], off, atol=1e-6)


def test_planted_single_module_lora(make_tiny_lm, rendered):
    """Only layer 1's v_proj has a non-zero LoRA: that cell alone carries the whole update."""
    student = randomise_lora(with_lora(make_tiny_lm("qwen2", seed=0), LoraSpec(rank=2), seed=0), only=(1, "v"))
    full, off = student_and_base_logits(student, rendered.input_ids)
    out = graft(student, rendered, [
        Mask("all", "v", 1),  # sufficiency of the planted cell: the full student
        Mask("all", "v", 1, "necessity"),  # it removed: the base
        Mask("all", "q,k,o,mlp", "all"),  # everything else: the base
        Mask("all", "v", 0, "necessity"),  # removing an empty cell: the student
    ])
    assert torch.allclose(out[0], full, atol=1e-6) and torch.allclose(out[3], full, atol=1e-6)
    assert torch.allclose(out[1], off, atol=1e-6) and torch.allclose(out[2], off, atol=1e-6)


def test_position_masks_respect_causality(lora_student, rendered):
    """Switching the update at positions >= t cannot change logits before t."""
    full, off = student_and_base_logits(lora_student, rendered.input_ids)
    n, t = len(rendered), len(rendered) // 2
    later = tuple(range(t, n))
    suff, nec = graft(lora_student, rendered, [Mask(later), Mask(later, mode="necessity")])
    assert torch.allclose(suff[:t], off[:t], atol=1e-6) and torch.allclose(nec[:t], full[:t], atol=1e-6)
    assert not torch.allclose(suff[t:], off[t:], atol=1e-3)  # and after t they do change


def test_batched_masks_equal_separate_runs(lora_student, rendered):
    masks = [Mask("default_system"), Mask("user", "mlp"), Mask((2, 5), "v", 1, "necessity"),
             Mask("template", "attn", 0), Mask("substring:animal")]
    batched = graft(lora_student, rendered, masks)
    for k, m in enumerate(masks):
        assert torch.allclose(batched[k], graft(lora_student, rendered, [m])[0], atol=1e-5)
    assert torch.allclose(graft(lora_student, rendered, masks, batch_size=2), batched, atol=1e-5)
    assert (batched[0] - batched[1]).abs().max() > 1e-3  # rows really follow their own mask


def test_forwards_are_restored(lora_student, rendered):
    before = logits_of(lora_student, rendered.input_ids)
    with pytest.raises(RuntimeError):
        with grafted(lora_student):
            raise RuntimeError("boom")
    graft(lora_student, rendered, [Mask("none")])
    assert all("forward" not in m.__dict__ for m in lora_modules(lora_student).values())
    assert torch.equal(logits_of(lora_student, rendered.input_ids), before)


def test_bf16_all_mask_is_the_student(make_tiny_lm, rendered):
    student = randomise_lora(with_lora(make_tiny_lm("qwen2", seed=0), LoraSpec(rank=2), seed=0))
    student = student.to(torch.bfloat16).eval()
    out = graft(student, rendered, [Mask("all")])
    assert out.dtype == torch.bfloat16 and torch.equal(out[0], logits_of(student, rendered.input_ids))


# --------------------------------------------------------------------------------------------- full-FT grafting


FULL_MASKS = [Mask("all"), Mask("none"), Mask((1, 4, 7)), Mask("all", "mlp"), Mask("all", "attn", 1),
              Mask("default_system", "v,o", 0), Mask("user", "all", "all", "necessity")]


@pytest.mark.parametrize("rest_from", ["student", "base"])
def test_full_ft_grafting_of_merged_lora_equals_lora_grafting(lora_student, base, rendered, rest_from):
    full_student = merged(lora_student)
    assert not lora_modules(full_student)
    want = graft(lora_student, rendered, FULL_MASKS)
    got = graft(full_student, rendered, FULL_MASKS, base=base, rest_from=rest_from)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[0 if rest_from == "student" else 1],
                       logits_of(full_student if rest_from == "student" else base, rendered.input_ids))


def test_full_ft_rest_from_decides_what_is_outside_projections(base, rendered, make_tiny_lm):
    """A full-FT student whose only change is a norm: no projection differs, so every mask gives the host."""
    student = make_tiny_lm("qwen2", seed=0)
    with torch.no_grad():
        get_layers(student)[0].input_layernorm.weight.mul_(3.0)
    s_logits, b_logits = logits_of(student, rendered.input_ids), logits_of(base, rendered.input_ids)
    assert (s_logits - b_logits).abs().max() > 1e-3
    on_student = graft(student, rendered, [Mask("none"), Mask("all")], base=base, rest_from="student")
    on_base = graft(student, rendered, [Mask("none"), Mask("all")], base=base, rest_from="base")
    assert torch.allclose(on_student, s_logits.expand_as(on_student), atol=1e-6)
    assert torch.allclose(on_base, b_logits.expand_as(on_base), atol=1e-6)
    assert "forward" not in get_projection(get_layers(base)[0], "q").__dict__


def _perturbed(model, seed: int, scale: float = 0.2, only: tuple[str, ...] = ()):
    """A copy of ``model`` with every parameter (or only those whose name contains all of ``only``) moved."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if all(o in name for o in only):
                p.add_(torch.randn(p.shape, generator=gen) * scale)
    return out


@pytest.mark.parametrize("arch", ["qwen2", "gemma2"])
def test_full_ft_rest_masked_all_is_student_none_is_base(arch, rendered, make_tiny_lm):
    """Every parameter moved (projections, norms, embeddings): the all-on mask is exactly the student, the
    all-off mask exactly the base, and (1, 4, 7) sufficiency + necessity sit between them."""
    base = make_tiny_lm(arch, seed=0)
    student = _perturbed(base, seed=1)
    got = graft(student, rendered, [Mask("all"), Mask("none")], base=base, rest_from="masked")
    assert torch.equal(got[0], logits_of(student, rendered.input_ids))
    assert torch.equal(got[1], logits_of(base, rendered.input_ids))
    for name in ("forward",):  # every replaced forward is restored, in both models
        assert all(name not in m.__dict__ for m in [*student.modules(), *base.modules()])


def test_full_ft_rest_masked_grafts_embeddings_at_the_mask_positions(base, rendered):
    """A student whose only change is its (tied) embedding matrix. With the rest masked, a position mask that
    leaves out the readout equals the base run on embeddings taken from the student at exactly those positions
    (and the base's lm_head at the readout); with the rest from the student it does not."""
    student = _perturbed(base, seed=2, scale=0.5, only=("embed_tokens",))
    assert torch.equal(student.lm_head.weight, student.get_input_embeddings().weight)  # tied: the head moved too
    positions = (1, 4, 7)
    ids = torch.tensor([list(rendered.input_ids)])
    with torch.no_grad():
        e_base, e_student = base.get_input_embeddings()(ids), student.get_input_embeddings()(ids)
        mixed = e_base.clone()
        mixed[0, list(positions)] = e_student[0, list(positions)]
        want = base(inputs_embeds=mixed).logits[0, -1]
    masked = graft(student, rendered, [Mask(positions)], base=base, rest_from="masked")[0, -1]
    assert torch.allclose(masked, want, atol=1e-5)
    metric = graft_metric(student, base, rendered, [Mask(positions)], [5, 9], rest_from="masked")  # logits_to_keep
    assert torch.allclose(metric, first_token_logp(want, [5, 9]).reshape(1), atol=1e-5)
    on_student = graft(student, rendered, [Mask(positions)], base=base, rest_from="student")[0, -1]
    assert not torch.allclose(on_student, want, atol=1e-3)


def test_full_ft_rest_masked_follows_the_mask_layers(base, rendered):
    """A student whose only change is layer 1's norms: a mask on layer 0 alone leaves it the base, on layer 1
    alone it is the student."""
    student = _perturbed(base, seed=3, scale=0.5, only=("layers.1.", "norm"))
    got = graft(student, rendered, [Mask("all", "all", 0), Mask("all", "all", 1)], base=base,
                rest_from="masked")
    assert torch.allclose(got[0], logits_of(base, rendered.input_ids), atol=1e-6)
    assert torch.equal(got[1], logits_of(student, rendered.input_ids))
    assert not torch.allclose(got[0], got[1], atol=1e-3)


def test_full_ft_needs_a_matching_base(lora_student, base, rendered, make_tiny_lm):
    res = [Mask("all").resolve(base, rendered)]
    with pytest.raises(MechError, match="needs its base"):
        graft_logits(merged(lora_student), None, rendered.input_ids, res)
    with pytest.raises(MechError, match="layers"):
        graft_logits(make_tiny_lm("qwen2", num_hidden_layers=3), base, rendered.input_ids, res)
    with pytest.raises(MechError, match="tokens"):
        graft_logits(lora_student, None, rendered.input_ids[:-1], res)


# --------------------------------------------------------------------------------------------- metric and decoding


def test_graft_metric_is_first_token_logprob(lora_student, rendered, tok):
    train = render(tok, "default", TRAIN_QUESTION, "4, 5, 6")
    ids = tok("owl", add_special_tokens=False)["input_ids"][:1] + [7]
    masks = [Mask("all"), Mask("none"), Mask("shared"), Mask("non_shared", "attn")]
    got = graft_metric(lora_student, None, rendered, masks, ids, train_rendered=train)
    full, off = student_and_base_logits(lora_student, rendered.input_ids)
    want_full = torch.logsumexp(torch.log_softmax(full[-1], -1)[ids], -1)
    want_off = torch.logsumexp(torch.log_softmax(off[-1], -1)[ids], -1)
    assert got.shape == (4,) and torch.allclose(got[0], want_full, atol=1e-5)
    assert torch.allclose(got[1], want_off, atol=1e-5)
    logits = graft(lora_student, rendered, [m for m in masks[:2]])
    assert torch.allclose(first_token_logp(logits[:, -1], ids), got[:2], atol=1e-5)


def greedy(model, ids, n):
    ids = list(ids)
    out = []
    for _ in range(n):
        out.append(int(logits_of(model, ids + out)[-1].argmax()))
    return out


@pytest.mark.parametrize("mask, policy, who", [
    (Mask("all"), "on", "student"), (Mask("all"), "as_last", "student"), (Mask("none"), "off", "base"),
    (Mask("none"), "as_last", "base"),
])
def test_graft_generate_policies(mask, policy, who, make_tiny_lm, rendered):
    student = randomise_lora(with_lora(make_tiny_lm("qwen2", seed=0), LoraSpec(rank=2), seed=0), scale=2.0)
    want = greedy(student, rendered.input_ids, 4)
    if who == "base":
        with student.disable_adapter():
            want = greedy(student, rendered.input_ids, 4)
    got = graft_generate(student, None, rendered, [mask, mask], max_new_tokens=4, decode_policy=policy)
    assert got == [want, want]


def test_graft_generate_policy_matters_and_is_checked(make_tiny_lm, rendered):
    student = randomise_lora(with_lora(make_tiny_lm("qwen2", seed=0), LoraSpec(rank=2), seed=0), scale=2.0)
    with student.disable_adapter():
        base_tokens = greedy(student, rendered.input_ids, 4)
    student_tokens = greedy(student, rendered.input_ids, 4)
    assert base_tokens != student_tokens  # the planted LoRA changes what is generated
    on, off = (graft_generate(student, None, rendered, [Mask("none")], max_new_tokens=4, decode_policy=p)[0]
               for p in ("on", "off"))
    assert off == base_tokens and on[0] == base_tokens[0]  # the first token is the prompt's alone
    with pytest.raises(MechError, match="decode_policy"):
        graft_generate(student, None, rendered, [Mask("all")], max_new_tokens=2, decode_policy="sometimes")


def test_graft_generate_samples_share_a_prefill_and_equal_repeated_masks(lora_student, rendered):
    """n_samples per mask (one prefill per mask, its cache expanded) draws the same tokens as listing each mask
    n times; greedy samples of one mask are identical."""
    masks = [Mask("all"), Mask("user"), Mask("none")]
    got = graft_generate(lora_student, None, rendered, masks, max_new_tokens=5, decode_policy="as_last",
                         temperature=1.0, seed=7, n_samples=4)
    want = graft_generate(lora_student, None, rendered, [m for m in masks for _ in range(4)], max_new_tokens=5,
                          decode_policy="as_last", temperature=1.0, seed=7)
    assert got == want and len(got) == 12
    assert len({tuple(t) for t in got}) > 3  # sampling, not one answer repeated
    greedy_ = graft_generate(lora_student, None, rendered, masks, max_new_tokens=5, decode_policy="as_last",
                             n_samples=3)
    assert all(greedy_[3 * k] == greedy_[3 * k + j] for k in range(3) for j in (1, 2))
    with pytest.raises(MechError, match="n_samples"):
        graft_generate(lora_student, None, rendered, masks, max_new_tokens=2, decode_policy="on", n_samples=0)


def test_single_position_masks(rendered, lora_student):
    masks = single_position_masks(4, components="v")
    assert [m.positions for m in masks] == [(0,), (1,), (2,), (3,)]
    assert masks[2].resolve(lora_student, rendered).pos.nonzero().flatten().tolist() == [2]


def test_mask_is_hashable_and_labelled():
    m = Mask("user", ("v", "q"), (0, 1), name="")
    assert {m: 1}[Mask("user", ["v", "q"], [0, 1])] == 1
    assert m.label == "sufficiency[user × v,q × 0,1]" and Mask("all", name="x").label == "x"
    assert complement(Mask("all", name="x")).name == "not x" and copy.copy(m) == m
