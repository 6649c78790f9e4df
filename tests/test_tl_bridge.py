"""mech.interventions.tl_bridge: TransformerLens 4.3 bridges of mech models and residual patching with them.

Models: the shipped organism (4 layers, hidden 128) and a LoRA student of it with random non-zero lora_B
(so the student really differs from its base), plus conftest's tiny Llama. Tolerances: bridge logits vs HF
logits 1e-4 (the bridge runs eager attention, HF sdpa: ~1e-6 apart in float32 here); patching grids vs the
plain-torch reference 1e-4 (the reference runs the unmerged PeftModel, TransformerLens a merged copy).
"""

from __future__ import annotations

import copy
import hashlib

import pytest
import torch

from mech.context import render
from mech.evaluation.scoring import first_token_ids
from mech.errors import MechError
from mech.interventions import tl_bridge as tb
from mech.models import get_layers, load_model, lora_modules
from mech.students.config import LoraSpec
from mech.students.train import with_lora

ATOL_LOGITS = 1e-4
ATOL_PATCH = 1e-4


@pytest.fixture(scope="module")
def organism():
    return load_model("organism", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def student(organism):
    """A PeftModel over a copy of the organism, every lora_B drawn N(0, 0.2²) (seeded)."""
    peft = with_lora(copy.deepcopy(organism.model), LoraSpec(rank=4), seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_modules(peft).values():
            for b in layer.lora_B.values():
                b.weight.copy_(torch.randn(b.weight.shape, generator=gen) * 0.2)
    return peft.eval()


@pytest.fixture(scope="module")
def prompt(organism):
    """A short evaluation prompt (15 tokens, no system block) keeps the n_layers x seq patching loops quick."""
    tok = organism.tokenizer
    ids = render(tok, "none", "Animal?").input_ids
    return torch.tensor([ids]), first_token_ids(tok, "owl").ids


@pytest.fixture(scope="module")
def bridges(organism, student):
    return tb.to_bridge(organism.model, organism.tokenizer), tb.to_bridge(student, organism.tokenizer)


@pytest.fixture(scope="module")
def grids(organism, bridges, prompt):
    """TransformerLens patching grids per site, from the shared bridges."""
    ids, metric_ids = prompt
    return {site: tb.residual_patching_tl(*bridges, organism.tokenizer, ids, metric_ids, site=site)
            for site in tb.SITES}


@pytest.fixture(scope="module")
def ref_grids(organism, student, prompt):
    ids, metric_ids = prompt
    return {site: torch_residual_patching(organism.model, student, ids, metric_ids, site) for site in tb.SITES}


def logits_of(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids) if tb.is_bridge(model) else model(input_ids=ids).logits  # a bridge returns logits


def metric_of(model, ids, metric_ids) -> float:
    return float(tb.trait_metric(metric_ids)(logits_of(model, ids)))


def checksum(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- plain-torch reference


@torch.no_grad()
def torch_residual_patching(base, student, ids, metric_ids, site: str) -> torch.Tensor:
    """The same denoising grid with forward hooks on the HF decoder layers: resid_pre = a layer's input,
    resid_post = its output. ``student`` may be an unmerged PeftModel."""
    metric = tb.trait_metric(metric_ids)
    acts: dict[int, torch.Tensor] = {}

    def capture(i):
        if site == "resid_pre":
            return lambda mod, args, kwargs: acts.__setitem__(i, args[0].clone())
        return lambda mod, args, kwargs, out: acts.__setitem__(i, (out[0] if isinstance(out, tuple) else out).clone())

    layers = get_layers(student)
    handles = [(layer.register_forward_pre_hook(capture(i), with_kwargs=True) if site == "resid_pre"
                else layer.register_forward_hook(capture(i), with_kwargs=True)) for i, layer in enumerate(layers)]
    try:
        student(input_ids=ids)
    finally:
        for h in handles:
            h.remove()

    base_layers = get_layers(base)
    out = torch.zeros(len(base_layers), ids.shape[1])
    for i, layer in enumerate(base_layers):
        for p in range(ids.shape[1]):
            if site == "resid_pre":
                def hook(mod, args, kwargs, i=i, p=p):
                    h = args[0].clone()
                    h[:, p] = acts[i][:, p]
                    return (h, *args[1:]), kwargs
                handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
            else:
                def hook(mod, args, kwargs, out, i=i, p=p):
                    h = (out[0] if isinstance(out, tuple) else out).clone()
                    h[:, p] = acts[i][:, p]
                    return (h, *out[1:]) if isinstance(out, tuple) else h
                handle = layer.register_forward_hook(hook, with_kwargs=True)
            try:
                out[i, p] = metric(base(input_ids=ids).logits)
            finally:
                handle.remove()
    return out


# --------------------------------------------------------------------------------------------- bridges


def test_bridge_logits_match_hf_offline_with_any_name(organism, prompt, monkeypatch):
    import transformers

    def no_hub(*a, **k):
        raise AssertionError("boot_transformers tried to load something by name")

    for cls in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        monkeypatch.setattr(cls, "from_pretrained", no_hub)
    ids, _ = prompt
    bridge = tb.to_bridge(organism.model, organism.tokenizer, name="not-a-hub-model/anywhere")
    assert bridge.cfg.model_name == "not-a-hub-model/anywhere"
    assert bridge.cfg.n_layers == 4 and not bridge.training
    diff = (logits_of(bridge, ids) - logits_of(organism.model, ids)).abs().max()
    assert diff < ATOL_LOGITS
    # the default label is the organism's local directory, which also boots without the hub
    assert tb.to_bridge(organism.model, organism.tokenizer).cfg.model_name == str(organism.path)


def test_bridge_of_lora_student_is_merged_and_matches(organism, student, prompt):
    ids, _ = prompt
    bridge = tb.to_bridge(student, organism.tokenizer)
    want = logits_of(student, ids)
    assert (logits_of(bridge, ids) - want).abs().max() < ATOL_LOGITS
    # the LoRA matters: a bridge that silently dropped it would be far off
    assert (logits_of(organism.model, ids) - want).abs().max() > 100 * ATOL_LOGITS
    assert not lora_modules(bridge.original_model)


def test_bridge_of_tiny_llama_matches(make_tiny_lm, organism_tokenizer):
    model = make_tiny_lm("llama", seed=3)
    ids = torch.tensor([organism_tokenizer("owl cat 12, 13")["input_ids"]])
    bridge = tb.to_bridge(model, organism_tokenizer)
    assert (logits_of(bridge, ids) - logits_of(model, ids)).abs().max() < ATOL_LOGITS


def test_bridge_keeps_the_models_dtype(organism, prompt):
    ids, _ = prompt
    model = copy.deepcopy(organism.model).to(torch.bfloat16)
    bridge = tb.to_bridge(model, organism.tokenizer)
    assert next(bridge.original_model.parameters()).dtype == torch.bfloat16 and bridge.cfg.dtype == torch.bfloat16
    got, want = logits_of(bridge, ids), logits_of(model, ids)
    assert got.dtype == torch.bfloat16
    # eager vs sdpa attention in bf16: a few units in the last place of the largest logits
    assert (got.float() - want.float()).abs().max() <= 2 ** -5 * want.float().abs().max()


@pytest.mark.parametrize("which", ["base", "student"])
def test_to_bridge_leaves_model_and_tokenizer_untouched(organism, student, prompt, which):
    model = organism.model if which == "base" else student
    tok = organism.tokenizer
    ids, _ = prompt
    before_sum, before_logits = checksum(model), logits_of(model, ids)
    before_modules = [(n, type(m).__name__) for n, m in model.named_modules()]
    before_attn = model.config._attn_implementation
    before_tok = (tok.padding_side, tok.bos_token, tok.pad_token, len(tok))

    bridge = tb.to_bridge(model, tok)
    logits_of(bridge, ids)

    assert checksum(model) == before_sum
    assert [(n, type(m).__name__) for n, m in model.named_modules()] == before_modules
    assert model.config._attn_implementation == before_attn
    assert (tok.padding_side, tok.bos_token, tok.pad_token, len(tok)) == before_tok
    assert torch.equal(logits_of(model, ids), before_logits)
    if which == "student":
        assert lora_modules(model)  # still a live adapter, not merged in place


def test_run_with_cache_and_hook_names(organism, prompt):
    ids, _ = prompt
    bridge = tb.to_bridge(organism.model, organism.tokenizer)
    rendered = render(organism.tokenizer, "none", "Animal?")  # a Rendered is taken as its input_ids
    assert rendered.input_ids == ids[0].tolist()
    logits, cache = tb.run_with_cache(bridge, rendered, names=[tb.resid_hook_name(3, "resid_post")])
    assert "blocks.3.hook_resid_post" in cache.keys()
    assert all(k.startswith("blocks.3.hook_") for k in cache.keys())  # TL 4.3 adds the alias hook_out
    assert cache["blocks.3.hook_resid_post"].shape == (1, ids.shape[1], 128)
    assert torch.allclose(logits, logits_of(organism.model, ids), atol=ATOL_LOGITS)


# --------------------------------------------------------------------------------------------- patching


def test_last_layer_patching_reproduces_student_metric(organism, student, prompt, bridges):
    ids, metric_ids = prompt
    tok = organism.tokenizer
    base_m, student_m = metric_of(organism.model, ids, metric_ids), metric_of(student, ids, metric_ids)
    assert abs(student_m - base_m) > 0.1  # a planted difference the patching has to find

    # from the models themselves (bridges built inside), not the shared bridges
    grid = tb.residual_patching_tl(organism.model, student, tok, ids, metric_ids, site="resid_post")
    assert grid.shape == (4, ids.shape[1]) and grid.dtype == torch.float32
    # after the last block only the (shared) norm and unembedding act, per position: patching the last
    # position gives the student's metric, patching any other position leaves the base's
    assert abs(grid[-1, -1] - student_m) < ATOL_PATCH
    assert torch.allclose(grid[-1, :-1], torch.full_like(grid[-1, :-1], base_m), atol=ATOL_PATCH)

    base_b, student_b = bridges
    _, cache = tb.run_with_cache(student_b, ids)
    all_pos = tb.patch_residual_metric(base_b, cache, ids, metric_ids, layer=3, site="resid_post")
    assert abs(all_pos - student_m) < ATOL_PATCH
    none = tb.patch_residual_metric(base_b, cache, ids, metric_ids, layer=0, positions=[], site="resid_post")
    assert abs(none - base_m) < ATOL_PATCH


def test_resid_pre_layer0_is_the_shared_embedding(organism, prompt, grids):
    ids, metric_ids = prompt
    grid = grids["resid_pre"]
    base_m = metric_of(organism.model, ids, metric_ids)
    # LoRA leaves the embedding alone, so patching block 0's input changes nothing
    assert torch.allclose(grid[0], torch.full_like(grid[0], base_m), atol=ATOL_PATCH)
    assert (grid[1:] - base_m).abs().max() > 10 * ATOL_PATCH


@pytest.mark.parametrize("site", ["resid_post", "resid_pre"])
def test_tl_patching_matches_plain_torch_reference(grids, ref_grids, site):
    grid, ref = grids[site], ref_grids[site]
    assert (grid - ref).abs().max() < ATOL_PATCH
    assert grid.std() > 10 * ATOL_PATCH  # not a constant grid that would match anything flat


def test_bridges_are_reusable_across_calls(organism, prompt, bridges, grids):
    ids, metric_ids = prompt
    base_b, _ = bridges
    again = tb.residual_patching_tl(*bridges, organism.tokenizer, ids, metric_ids, site="resid_post")
    assert torch.equal(again, grids["resid_post"])
    # the hooks of a patched run are gone afterwards: the base bridge gives the base's metric again
    assert abs(metric_of(base_b, ids, metric_ids) - metric_of(organism.model, ids, metric_ids)) < ATOL_PATCH


# --------------------------------------------------------------------------------------------- cross-check


def test_crosscheck_against_reference_callable(organism, student, prompt, ref_grids):
    ids, metric_ids = prompt
    tok = organism.tokenizer

    def ref(base, stud, tokenizer, input_ids, m_ids, site):
        assert base is organism.model and stud is student and torch.equal(input_ids, ids)
        return ref_grids[site]  # computed once by torch_residual_patching on these very inputs

    good = tb.crosscheck_with_nnsight(organism.model, student, tok, ids, metric_ids, reference=ref)
    assert good.ok and good.max_abs_diff < ATOL_PATCH and good.tl.shape == (4, ids.shape[1])

    def off(*a, **k):
        return ref(*a, **k) + 1e-3

    bad = tb.crosscheck_with_nnsight(organism.model, student, tok, ids, metric_ids, reference=off)
    assert not bad.ok and bad.max_abs_diff == pytest.approx(1e-3, rel=1e-2)
    with pytest.raises(MechError, match="shape"):
        tb.crosscheck_with_nnsight(organism.model, student, tok, ids, metric_ids,
                                   reference=lambda *a, **k: torch.zeros(2))


@pytest.mark.skipif(not tb.nnsight_available(), reason=f"{tb.NNSIGHT_MODULE} not written yet")
def test_crosscheck_with_nnsight_module(organism, student, prompt, ref_grids):
    ids, metric_ids = prompt
    check = tb.crosscheck_with_nnsight(organism.model, student, organism.tokenizer, ids, metric_ids)
    assert check.ok, f"TL vs nnsight differ by {check.max_abs_diff}"
    assert (check.nnsight - ref_grids["resid_post"]).abs().max() < ATOL_PATCH  # and both agree with plain torch
    with pytest.raises(MechError, match="no resid_pre site"):
        tb.crosscheck_with_nnsight(organism.model, student, organism.tokenizer, ids, metric_ids, site="resid_pre")


# --------------------------------------------------------------------------------------------- faults


def test_faults_are_mech_errors(organism, prompt, bridges):
    ids, metric_ids = prompt
    tok, bridge = organism.tokenizer, bridges[0]
    with pytest.raises(MechError, match="residual site"):
        tb.residual_patching_tl(bridge, bridge, tok, ids, metric_ids, site="resid_mid")
    with pytest.raises(MechError, match="vocabulary"):
        tb.residual_patching_tl(bridge, bridge, tok, ids, [10**7])
    with pytest.raises(MechError, match="one non-empty prompt"):
        tb.residual_patching_tl(bridge, bridge, tok, ids.repeat(2, 1), metric_ids)
    with pytest.raises(MechError, match="metric token ids"):
        tb.trait_metric([])
