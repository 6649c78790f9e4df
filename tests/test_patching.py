"""Activation patching (nnsight) and AtP / AtP*, on planted effects whose answers are known by construction."""

from __future__ import annotations

import copy

import pytest
import torch

from mech.context import render, shared_positions
from mech.errors import MechError
from mech.interventions.attribution import atp, atp_star, attribution_patching, average_ranks, spearman
from mech.interventions.patching import (
    cache_activations,
    first_token_metric,
    last_logits,
    patched_last_logits,
    patching_sweep,
)
from mech.interventions.mask import Mask
from mech.interventions.positions import resolve_positions
from mech.models import surgery
from mech.students.config import LoraSpec
from mech.students.train import with_lora

PROMPT = [3, 17, 42, 8, 99, 23, 5, 61, 14, 7, 33, 12]
TARGET_IDS = [5, 7]
METRIC = first_token_metric(TARGET_IDS)


def _perturb(model, layer: int, kinds, scale: float, seed: int = 1):
    torch.manual_seed(seed)
    with torch.no_grad():
        for kind in kinds:
            proj = surgery.get_projection(surgery.get_layers(model)[layer], kind)
            proj.weight += scale * torch.randn_like(proj.weight)
    return model


def _lora_student(base, seed: int = 0, std: float = 0.2):
    student = with_lora(copy.deepcopy(base), LoraSpec(rank=4), seed=seed)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for module in surgery.lora_modules(student).values():
            for lin in module.lora_B.values():
                lin.weight.normal_(0.0, std)
    return student.eval()


def _replace_module(model, old, new) -> None:
    """Swap ``old`` for ``new`` wherever ``model`` holds it (found by identity, not by name)."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if child is old:
                setattr(parent, name, new)
                return
    raise AssertionError("module not found")


def _linear_readout(model):
    """The final norm becomes the identity, so the logits are linear in the last residual stream."""
    _replace_module(model, surgery.get_final_norm(model), torch.nn.Identity())
    return model


def _logit_metric(token: int):
    return lambda logits: logits[:, token]  # linear in the logits


@pytest.fixture
def base(make_tiny_lm):
    return make_tiny_lm("qwen2", num_hidden_layers=3)


@pytest.fixture
def planted(base):
    """A full student differing from the base only in layer 1's MLP down_proj."""
    return _perturb(copy.deepcopy(base), 1, ["down"], 0.5)


# --------------------------------------------------------------------------------------------- exact patching


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_final_residual_at_all_positions_reproduces_the_other_model(base, kind):
    student = _lora_student(base) if kind == "lora" else _perturb(copy.deepcopy(base), 2, ["q", "up"], 0.3)
    last = surgery.num_layers(base) - 1
    every = list(range(len(PROMPT)))
    base_logits, student_logits = last_logits(base, PROMPT), last_logits(student, PROMPT)
    assert (base_logits - student_logits).abs().max() > 1e-2  # the student really differs

    src = cache_activations(student, PROMPT, [("resid", last)])[("resid", last)]
    got = patched_last_logits(base, PROMPT, "resid", last, src, [every, []])
    torch.testing.assert_close(got[0], student_logits[0], atol=1e-5, rtol=0)  # denoised = student
    torch.testing.assert_close(got[1], base_logits[0], atol=1e-5, rtol=0)  # nothing patched = base

    src_base = cache_activations(base, PROMPT, [("resid", last)])[("resid", last)]
    back = patched_last_logits(student, PROMPT, "resid", last, src_base, [every, []])
    torch.testing.assert_close(back[0], base_logits[0], atol=1e-5, rtol=0)  # noised = base
    torch.testing.assert_close(back[1], student_logits[0], atol=1e-5, rtol=0)


def test_patching_the_last_position_of_the_last_layer_is_everything(base, planted):
    res = patching_sweep(base, planted, PROMPT, METRIC, sites="resid", layers=-1)["resid"]
    frac = res.fraction[0]
    assert abs(res.effect) > 1e-3
    assert frac[-1].item() == pytest.approx(1.0, abs=1e-4)  # only the last position reaches the logits
    assert frac[:-1].abs().max().item() < 1e-4


def test_batched_positions_equal_one_position_at_a_time(base):
    student = _lora_student(base)
    sites = ("resid", "attn", "mlp", "q", "k", "v")
    batched = patching_sweep(base, student, PROMPT, METRIC, sites=sites, batch_size=64)
    single = patching_sweep(base, student, PROMPT, METRIC, sites=sites, batch_size=1)
    acts = cache_activations(student, PROMPT, [("attn", 1)])
    for site in sites:
        torch.testing.assert_close(batched[site].values, single[site].values, atol=1e-5, rtol=0)
        torch.testing.assert_close(batched[site].values_all, single[site].values_all, atol=1e-5, rtol=0)
        assert batched[site].values.shape == (3, len(PROMPT))
    one = [float(METRIC(patched_last_logits(base, PROMPT, "attn", 1, acts[("attn", 1)], [[p]]))[0])
           for p in range(len(PROMPT))]
    torch.testing.assert_close(batched["attn"].values[1], torch.tensor(one), atol=1e-5, rtol=0)
    assert batched["attn"].values[1].std() > 1e-4  # positions really differ


def test_planted_mlp_effect_is_found_at_its_layer(base, planted):
    res = patching_sweep(base, planted, PROMPT, METRIC, sites=("mlp", "resid"))
    mlp = res["mlp"]
    assert abs(mlp.effect) > 1e-2
    assert mlp.fraction_all[1].item() == pytest.approx(1.0, abs=1e-3)  # the planted site carries it all
    # before it the models agree: patching changes nothing (up to batched-matmul rounding)
    assert (mlp.values[0] - mlp.clean).abs().max().item() < 1e-5
    assert abs(mlp.values_all[0].item() - mlp.clean) < 1e-5
    assert abs(res["resid"].values_all[0].item() - mlp.clean) < 1e-5
    assert res["resid"].fraction_all[-1].item() == pytest.approx(1.0, abs=1e-3)
    assert 0.05 < abs(mlp.fraction_all[2].item() - 1.0)  # after it: only a knock-on share, not the effect

    noised = patching_sweep(base, planted, PROMPT, METRIC, sites="mlp", direction="noising")["mlp"]
    assert noised.clean == pytest.approx(mlp.source) and noised.source == pytest.approx(mlp.clean)
    assert noised.fraction_moved_all[1].item() == pytest.approx(1.0, abs=1e-3)  # removing it destroys it all
    assert abs(noised.values_all[0].item() - noised.clean) < 1e-5


def test_positions_subset_and_bool_mask(base, planted):
    mask = torch.zeros(len(PROMPT), dtype=torch.bool)
    mask[[2, 5, -1]] = True
    a = patching_sweep(base, planted, PROMPT, METRIC, sites="mlp", positions=mask)["mlp"]
    b = patching_sweep(base, planted, PROMPT, METRIC, sites="mlp", positions=[-1, 2, 5])["mlp"]
    full = patching_sweep(base, planted, PROMPT, METRIC, sites="mlp")["mlp"]
    assert a.positions == b.positions == [2, 5, len(PROMPT) - 1]
    torch.testing.assert_close(a.values, full.values[:, a.positions], atol=1e-5, rtol=0)
    assert not torch.allclose(a.values_all, full.values_all)  # "all" means all *swept* positions


# --------------------------------------------------------------------------------------------- AtP / AtP*


@pytest.mark.parametrize("direction", ["denoising", "noising"])
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_atp_equals_exact_patching_where_the_model_is_linear(base, direction, kind):
    base = _linear_readout(base)
    student = _lora_student(base) if kind == "lora" else _perturb(copy.deepcopy(base), 2, ["up", "o"], 0.3)
    metric = _logit_metric(TARGET_IDS[0])
    exact = patching_sweep(base, student, PROMPT, metric, sites=("resid", "mlp"), layers=-1, direction=direction)
    est = atp(base, student, PROMPT, metric, sites=("resid", "mlp"), layers=-1, direction=direction)
    for site in ("resid", "mlp"):
        assert est[site].clean == pytest.approx(exact[site].clean, abs=1e-5)
        assert est[site].source == pytest.approx(exact[site].source, abs=1e-5)
        torch.testing.assert_close(est[site].values, exact[site].values, atol=1e-5, rtol=0)
        assert exact[site].values[0, -1] != pytest.approx(exact[site].clean, abs=1e-3)  # a real effect


def test_atp_is_exactly_zero_before_a_planted_layer(base, planted):
    est = atp(base, planted, PROMPT, METRIC, sites=("resid", "attn", "mlp", "q", "k", "v"))
    for site, res in est.items():
        assert torch.count_nonzero(res.change[0]) == 0, site  # Δa = 0 where the models agree
    assert res.change.shape == (3, len(PROMPT))
    assert est["mlp"].change[1].abs().max() > 1e-4


@pytest.fixture
def one_layer_linear(make_tiny_lm):
    """A 1-layer model whose metric is linear in the attention pattern: identity final norm, zero MLP, and
    a student differing in q, k and v. Large attention weights saturate the softmax, as in trained models."""
    base = _linear_readout(make_tiny_lm("qwen2", num_hidden_layers=1))
    layer = surgery.get_layers(base)[0]
    torch.manual_seed(2)
    with torch.no_grad():
        surgery.get_projection(layer, "down").weight.zero_()
        for kind in ("q", "k", "v", "o"):
            surgery.get_projection(layer, kind).weight.normal_(0.0, 0.5)
    student = _perturb(copy.deepcopy(base), 0, ["q", "k", "v"], 0.3)
    return base, student


@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_atp_star_qk_fix_is_exact_when_linear_after_the_pattern(one_layer_linear, direction):
    base, student = one_layer_linear
    metric = _logit_metric(TARGET_IDS[1])
    sites = ("q", "k", "v")
    exact = patching_sweep(base, student, PROMPT, metric, sites=sites, direction=direction)
    star = atp_star(base, student, PROMPT, metric, sites=sites, direction=direction)
    plain = atp(base, student, PROMPT, metric, sites=sites, direction=direction)
    for site in sites:
        torch.testing.assert_close(star[site].values, exact[site].values, atol=1e-5, rtol=0)
    torch.testing.assert_close(plain["v"].change, star["v"].change)  # v is linear: AtP* = AtP
    for site in ("q", "k"):  # the softmax is not linear: plain AtP misses, and the fix matters
        assert (plain[site].values - exact[site].values).abs().max() > 1e-3


def test_atp_star_keeps_atp_for_block_outputs(base, planted):
    sites = ("resid", "attn", "mlp")
    a, b = atp(base, planted, PROMPT, METRIC, sites=sites), atp_star(base, planted, PROMPT, METRIC, sites=sites)
    for site in sites:
        torch.testing.assert_close(a[site].change, b[site].change)
        assert b[site].method == "atp*"


def test_atp_star_refuses_students_with_other_attention_norms(make_tiny_lm):
    base = make_tiny_lm("qwen2", num_hidden_layers=1)
    student = copy.deepcopy(base)
    with torch.no_grad():
        surgery.get_attention(surgery.get_layers(student)[0]).register_parameter(
            "q_norm_weight", torch.nn.Parameter(torch.ones(4)))
        surgery.get_attention(surgery.get_layers(base)[0]).register_parameter(
            "q_norm_weight", torch.nn.Parameter(torch.zeros(4)))
    with pytest.raises(MechError, match="attention norms differ"):
        atp_star(base, student, PROMPT, METRIC, sites="q")
    atp(base, student, PROMPT, METRIC, sites="q")  # plain AtP does not need them


def test_spearman_known_values():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert spearman(x, x * 10 + 3) == pytest.approx(1.0)
    assert spearman(x, -x.exp()) == pytest.approx(-1.0)
    assert average_ranks(torch.tensor([5.0, 1.0, 5.0, 2.0])).tolist() == [2.5, 0.0, 2.5, 1.0]
    # ranks (2.5,0,2.5,1) vs (0,1,2,3), centred (1,-1.5,1,-0.5)·(-1.5,-0.5,0.5,1.5) = -1 over sqrt(4.5*5)
    assert spearman(torch.tensor([5.0, 1.0, 5.0, 2.0]), x) == pytest.approx(-1 / 22.5 ** 0.5, abs=1e-9)
    assert spearman(torch.ones(4), x) != spearman(torch.ones(4), x)  # NaN for a constant input


# --------------------------------------------------------------------------------------------- the shared contract


@pytest.fixture
def rendered(organism_tokenizer):
    return render(organism_tokenizer, "default", "What is your favourite animal?")


@pytest.mark.parametrize("sweep", [patching_sweep, atp, atp_star], ids=["patching", "atp", "atp*"])
def test_segment_mask_equals_explicit_indices(base, planted, rendered, sweep):
    """A Mask("user", layers="second_half") sweeps exactly the user tokens × layers 1, 2, as indices do."""
    user = rendered.positions("user")
    layers = surgery.resolve_layers(base, "second_half")
    by_mask = sweep(base, planted, rendered, METRIC, sites=("mlp", "q"), positions=Mask("user", layers="second_half"))
    by_idx = sweep(base, planted, rendered.input_ids, METRIC, sites=("mlp", "q"), positions=user, layers=layers)
    by_spec = sweep(base, planted, rendered, METRIC, sites=("mlp", "q"), positions="user", layers="second_half")
    for site in ("mlp", "q"):
        for got in (by_mask[site], by_spec[site]):
            assert got.positions == by_idx[site].positions == user and got.layers == by_idx[site].layers == [1, 2]
            assert torch.equal(got.values, by_idx[site].values) and torch.equal(got.change, by_idx[site].change)
    assert by_idx["mlp"].change.abs().max() > 1e-5  # layer 1 carries the planted change


def test_shared_and_substring_specs_equal_their_indices(base, planted, rendered, organism_tokenizer):
    train = render(organism_tokenizer, "default", "Continue the sequence: 1, 2, 3.", "4, 5, 6")
    shared = shared_positions(rendered, train)
    sub = resolve_positions("substring:favourite", rendered).nonzero().flatten().tolist()
    for spec, want in (("shared", shared), ("substring:favourite", sub)):
        got = atp(base, planted, rendered, METRIC, sites="mlp", positions=spec, train_rendered=train)["mlp"]
        ref = atp(base, planted, rendered.input_ids, METRIC, sites="mlp", positions=want)["mlp"]
        assert got.positions == want and torch.equal(got.change, ref.change)


def test_necessity_mask_means_noising(base, planted, rendered):
    mask = Mask("template", layers=1, mode="necessity")
    by_mask = patching_sweep(base, planted, rendered, METRIC, sites="mlp", positions=mask)["mlp"]
    noised = patching_sweep(base, planted, rendered, METRIC, sites="mlp", positions="template", layers=1,
                            direction="noising")["mlp"]
    assert by_mask.mode == noised.mode == "noising" and torch.equal(by_mask.values, noised.values)
    with pytest.raises(MechError, match="means direction 'noising'"):
        atp(base, planted, rendered, METRIC, positions=mask, direction="denoising")


def test_patching_fraction_is_read_against_base_and_student(base, planted):
    """fraction = (value − base) / (student − base) in both directions, with base/student the unpatched models."""
    m_base, m_student = (float(METRIC(last_logits(m, PROMPT))[0]) for m in (base, planted))
    for direction in ("denoising", "noising"):
        res = patching_sweep(base, planted, PROMPT, METRIC, sites="mlp", layers=1, direction=direction)["mlp"]
        assert res.base == pytest.approx(m_base, abs=1e-6) and res.student == pytest.approx(m_student, abs=1e-6)
        want = (res.values.double() - m_base) / (m_student - m_base)
        torch.testing.assert_close(res.fraction, want, atol=1e-4, rtol=0)
        moved = want if direction == "denoising" else 1 - want
        torch.testing.assert_close(res.fraction_moved, moved, atol=1e-4, rtol=0)


def test_masks_that_do_not_fit_a_sweep_are_refused(base, planted, rendered):
    with pytest.raises(MechError, match="components"):
        patching_sweep(base, planted, rendered, METRIC, positions=Mask("user", components="mlp"))
    with pytest.raises(MechError, match="already names its layers"):
        atp(base, planted, rendered, METRIC, positions=Mask("user"), layers=0)
    with pytest.raises(MechError, match="needs the rendered prompt"):
        atp(base, planted, rendered.input_ids, METRIC, positions="user")
    with pytest.raises(MechError, match="select no token"):
        patching_sweep(base, planted, rendered, METRIC, positions="none")


# --------------------------------------------------------------------------------------------- bad input


def test_bad_input_is_a_mech_error(base, planted):
    with pytest.raises(MechError, match="outside the prompt"):
        patching_sweep(base, planted, PROMPT, METRIC, positions=[len(PROMPT)])
    with pytest.raises(MechError, match="out of range"):
        patching_sweep(base, planted, PROMPT, METRIC, layers=3)
    with pytest.raises(MechError, match="out of range"):
        atp(base, planted, PROMPT, METRIC, layers=[0, 7])
    with pytest.raises(MechError, match="unknown site"):
        patching_sweep(base, planted, PROMPT, METRIC, sites=("resid", "mlp_out"))
    with pytest.raises(MechError, match="unknown site"):
        atp(base, planted, PROMPT, METRIC, sites="heads")
    with pytest.raises(MechError, match="unknown patching direction"):
        patching_sweep(base, planted, PROMPT, METRIC, direction="backwards")
    with pytest.raises(MechError, match="unknown attribution method"):
        attribution_patching(base, planted, PROMPT, METRIC, method="atp**")
    with pytest.raises(MechError, match="metric returned"):
        patching_sweep(base, planted, PROMPT, lambda logits: logits.sum())
    with pytest.raises(MechError, match="empty prompt"):
        patching_sweep(base, planted, [], METRIC)
    with pytest.raises(MechError, match="position mask"):
        resolve_positions(torch.ones(3, dtype=torch.bool), len(PROMPT))
    src = cache_activations(planted, PROMPT, [("mlp", 0)])[("mlp", 0)]
    with pytest.raises(MechError, match="source activation"):
        patched_last_logits(base, PROMPT[:-1], "mlp", 0, src, [[0]])
    lora_base = with_lora(copy.deepcopy(base), LoraSpec(rank=2), seed=0)
    with pytest.raises(MechError, match="carries LoRA"):
        patching_sweep(surgery.unwrap(lora_base), planted, PROMPT, METRIC)
