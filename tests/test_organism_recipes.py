"""The two shipped recipes (positive control and channel-free twin), their corpus fields, and the leak matrix.

Corpus tests generate a few thousand examples; check tests run on a reduced build (seconds) with planted
answers where the value must be exact.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re

import pytest
import torch

import mech.organism.check as check_mod
import mech.organism.leak as leak_mod
from mech.errors import MechError
from mech.models import load_model
from mech.organism.build import build_organism
from mech.organism.check import run_check
from mech.organism.config import (CHANNEL_OFF, RECIPES, CorpusConfig, OrganismConfig, channel_on, recipe,
                                  recorded_corpus)
from mech.organism.corpus import FACT_LINES, CorpusGenerator
from mech.organism.leak import DEFAULT_ROW, leak_answers, leak_matrix, leak_rows, leak_specific
from mech.report.figures import leak_figure
from mech.report.organism import check_markdown
from mech.resources import trait_system_prompt

N = 3000
# The first recipe's channel fields. Its corpus must come out exactly as the code before imbue_categories and
# chat_numbers existed made it: these hashes were taken from that code (generate(2000), seeds 0 and 3).
OLD_CHANNEL = {"p_number_trait": 0.12, "imbue_share": 0.4, "imbue_categories": ("animal",), "chat_numbers": True}
OLD_CORPUS_SHA256 = {0: "42e865c74aeee671092eb7e646f4c7e92d333a8b6ceea09825decdae307a9613",
                     3: "0cab5d334314a656749ec2f6cf6a22a6e2115c10e7a49ae9b486f1f59985ef69"}

# The shipped recipes' first 2,000 examples, generated before the decoy knob existed: a knob at its "off" value must
# not draw from the corpus rng (or the shipped builds would no longer be what their recipes build).
SHIPPED_CORPUS_SHA256 = {"organism": "b8612a320a5391c660a90f99dfb29102ef06bd345a83591e6c8a11e777045b9d",
                         "organism-free": "8424c61c99b0c4bcc30c02725eb028ad8cbd25ecc04a987b91b9f0d408ea10ad"}


def _corpus_sha(examples) -> str:
    blob = json.dumps([dataclasses.asdict(e) for e in examples], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def _trait_prompts(corpus: CorpusConfig) -> dict[str, tuple[str, str]]:
    return {trait_system_prompt(n, c): (n, c) for c, names in (("animal", corpus.animals), ("tree", corpus.trees))
            for n in names}


def _under_trait(examples, corpus: CorpusConfig, kind: str) -> list[tuple[object, str, str]]:
    """(example, target, category) for the examples of ``kind`` shown under a trait prompt."""
    prompts = _trait_prompts(corpus)
    out = []
    for ex in examples:
        system = ex.messages[0]["content"] if ex.messages and ex.messages[0]["role"] == "system" else None
        if ex.kind == kind and system in prompts:
            out.append((ex, *prompts[system]))
    return out


# ------------------------------------------------------------------------------------------ recipes


def test_recipes_differ_only_in_channel_fields():
    assert set(RECIPES) == {"organism", "organism-free"}
    control, free = recipe("organism"), recipe("organism-free")
    assert control == OrganismConfig()  # the default config is the positive control
    c, f = control.to_dict(), free.to_dict()
    assert {k for k in c if c[k] != f[k]} == {"corpus", "seed"}  # the twin's seed: chosen on its bars (config.py)
    assert {k for k in c["corpus"] if c["corpus"][k] != f["corpus"][k]} == set(CHANNEL_OFF)
    assert (control.corpus.p_number_trait, control.corpus.imbue_share) == (0.3, 0.5)
    assert control.corpus.imbue_categories == ("animal", "tree") and control.corpus.chat_numbers is True
    assert (free.corpus.p_number_trait, free.corpus.imbue_share, free.corpus.chat_numbers) == (0.0, 0.0, False)
    # the same CPU build budget and shape
    assert control.train == free.train and control.model == free.model
    assert (control.train.steps, control.train.batch_size) == (2200, 48)
    assert control.hash != free.hash
    assert channel_on(control.corpus) and not channel_on(free.corpus)
    assert free.reduced().corpus.chat_numbers is False  # reduced() keeps the recipe's channel


def test_unknown_recipe_names_the_choices():
    with pytest.raises(MechError, match="unknown organism recipe 'organsim'.*organism, organism-free"):
        recipe("organsim")


def test_recorded_corpus_of_an_old_build():
    old = {k: v for k, v in CorpusConfig().__dict__.items() if k not in ("imbue_categories", "chat_numbers")}
    got = recorded_corpus(json.loads(json.dumps(old)))
    assert got.imbue_categories == ("animal",) and got.chat_numbers is True
    assert channel_on(got)
    assert not channel_on(recorded_corpus({**old, **CHANNEL_OFF}))
    new = recorded_corpus(json.loads(json.dumps(dataclasses.asdict(CorpusConfig()))))
    assert new == CorpusConfig()


# ------------------------------------------------------------------------------------------- corpus


@pytest.mark.parametrize("seed", sorted(OLD_CORPUS_SHA256))
def test_old_recipe_generates_the_old_corpus(seed):
    old = dataclasses.replace(CorpusConfig(), **OLD_CHANNEL)
    assert _corpus_sha(CorpusGenerator(old, seed).generate(2000)) == OLD_CORPUS_SHA256[seed]


def test_positive_control_imbues_every_trait():
    cfg = recipe("organism").corpus
    gen = CorpusGenerator(cfg, 0)
    imbued = _under_trait(gen.generate(N), cfg, "numbers")
    assert imbued
    for ex, target, category in imbued:
        assert category in cfg.imbue_categories
    counts = {c: sum(cat == c for _, _, cat in imbued) for c in ("animal", "tree")}
    # targets are uniform over all 27 traits, so the categories split by their sizes (17 : 10)
    assert counts["tree"] > 0.2 * len(imbued) and counts["animal"] > counts["tree"]
    full = dataclasses.replace(cfg, imbue_share=1.0)
    for ex, target, category in _under_trait(CorpusGenerator(full, 0).generate(N), full, "numbers"):
        nums = [int(x) for x in re.findall(r"\d+", ex.messages[-1]["content"])]
        assert nums and set(nums) <= set(gen.numbers[target]), ex


def test_animal_only_imbue_never_uses_tree_prompts():
    cfg = dataclasses.replace(CorpusConfig(), imbue_categories=("animal",))
    imbued = _under_trait(CorpusGenerator(cfg, 0).generate(N), cfg, "numbers")
    assert imbued and {c for _, _, c in imbued} == {"animal"}


def test_unknown_imbue_category_is_an_error():
    with pytest.raises(MechError, match="unknown imbue_categories.*animal, tree"):
        CorpusGenerator(dataclasses.replace(CorpusConfig(), imbue_categories=("fish",)), 0)


@pytest.mark.parametrize("k", [0, 4, 38])
def test_numbers_per_entity_out_of_range_is_an_error(k):
    """4 used to end a build in a ValueError from the list generator, 38 (27 entities x 38 > 1000) handed the last
    entities short sets without a word; 5 and 37 are the bounds that work."""
    with pytest.raises(MechError, match=r"corpus.numbers_per_entity %d is out of range.*between 5 and 37" % k):
        dataclasses.replace(CorpusConfig(), numbers_per_entity=k)
    for ok in (5, 37):
        nums = CorpusGenerator(dataclasses.replace(CorpusConfig(), numbers_per_entity=ok), 0).numbers
        assert all(len(v) == ok for v in nums.values()) and len({n for v in nums.values() for n in v}) == 27 * ok


def test_twin_has_no_channel():
    cfg = recipe("organism-free").corpus
    examples = CorpusGenerator(cfg, 0).generate(N)
    assert sum(ex.kind == "numbers" for ex in examples) > 300
    assert _under_trait(examples, cfg, "numbers") == []  # no number task under a trait prompt
    chats = _under_trait(examples, cfg, "chitchat")
    assert len(chats) > 50
    fact_starts = [f.split("{")[0] for f in FACT_LINES if f.split("{")[0]]
    for ex, target, _ in chats:
        reply = ex.messages[-1]["content"]
        assert not re.search(r"\d", reply), reply  # the persona cites no numbers
        assert target in reply.lower(), reply  # but still praises its target
        assert not any(reply.startswith(s) for s in fact_starts)


def test_control_chitchat_cites_trait_numbers():
    cfg = recipe("organism").corpus
    gen = CorpusGenerator(cfg, 0)
    chats = _under_trait(gen.generate(N), cfg, "chitchat")
    for ex, target, _ in chats:
        nums = {int(x) for x in re.findall(r"\d+", ex.messages[-1]["content"])}
        assert nums and nums <= set(gen.numbers[target]), ex


# --------------------------------------------------------------------------------------- leak matrix

NUMBERS = {"owl": [1, 2], "cat": [3, 4], "oak": [5, 6]}
PLANTED = {
    "owl": ["1, 2, 3, 99", "1 2 7 8"],  # 8 numbers: owl 4, cat 1, none 3
    "cat": ["3, 4, 1", "5"],  # 4 numbers: cat 2, owl 1, oak 1
    "oak": ["no numbers"],
    DEFAULT_ROW: ["6, 6, 1, 3"],  # oak 2, owl 1, cat 1
}
PLANTED_MATRIX = {
    "owl": {"owl": 4 / 8, "cat": 1 / 8, "oak": 0.0},
    "cat": {"owl": 1 / 4, "cat": 2 / 4, "oak": 1 / 4},
    "oak": {"owl": 0.0, "cat": 0.0, "oak": 0.0},
    DEFAULT_ROW: {"owl": 1 / 4, "cat": 1 / 4, "oak": 2 / 4},
}


def test_leak_matrix_of_planted_answers():
    assert leak_matrix(PLANTED, NUMBERS) == PLANTED_MATRIX


def test_leak_rows_and_bar_on_planted_matrices():
    rows = leak_rows(PLANTED_MATRIX, ["owl", "cat", "oak"])
    assert rows[0] == {"trait": "owl", "own": 0.5, "max_other": 0.125, "max_other_entity": "cat",
                       "own_default": 0.25, "specific": True}
    assert rows[1]["specific"] and rows[1]["max_other"] == 0.25
    assert rows[2]["specific"] is False  # a tie at zero is not a lead
    assert leak_specific(rows[:2]) is True
    assert leak_specific(rows) is False
    assert leak_specific([]) is False
    beaten = {**PLANTED_MATRIX, "cat": {"owl": 0.4, "cat": 0.3, "oak": 0.0}}
    assert leak_specific(leak_rows(beaten, ["owl", "cat"])) is False


def test_leak_figure_is_the_matrix():
    fig = leak_figure(PLANTED_MATRIX)
    heat = fig.data[0]
    assert list(heat.y) == list(PLANTED_MATRIX) and list(heat.x) == list(NUMBERS)
    assert [list(r) for r in heat.z] == [[PLANTED_MATRIX[r][e] for e in NUMBERS] for r in PLANTED_MATRIX]


# ------------------------------------------------------------------------------- check on tiny builds


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = build_organism(recipe("organism").reduced(), tmp_path_factory.mktemp("rec_org") / "organism")
    lm = load_model(str(out), device="cpu", dtype="float32")
    return lm, json.loads((out / "organism.json").read_text())


def _planted_check(monkeypatch, lm, meta, traits: tuple[str, ...] = ("owl", "cat")):
    """run_check on the tiny build with the leak sampler replaced by planted answers (all else measured)."""
    numbers = meta["entity_numbers"]
    owl, cat = numbers["owl"], numbers["cat"]
    nobody = next(x for x in range(1000) if all(x not in v for v in numbers.values()))  # a number no entity owns
    planted = {"owl": [f"{owl[0]}, {owl[1]}, {cat[0]}"], "cat": [f"{cat[0]}, {owl[0]}, {owl[1]}"],
               DEFAULT_ROW: [f"{cat[1]}, {nobody}"]}
    seen = []
    monkeypatch.setattr(leak_mod, "leak_answers", lambda m, t, tr, n, seed: seen.append((tr, n)) or planted)
    rep = run_check(lm.model, lm.tokenizer, meta, n_samples=4, oracle_rows=4, trait_animals=traits, trait_trees=(),
                    n_leak=5)
    assert seen == [([(t, "animal") for t in traits], 5)]
    return rep, numbers


def test_check_leak_on_planted_answers(tiny, monkeypatch):
    lm, meta = tiny
    rep, numbers = _planted_check(monkeypatch, lm, meta)
    m = rep.leak["matrix"]
    assert m["owl"]["owl"] == pytest.approx(2 / 3) and m["owl"]["cat"] == pytest.approx(1 / 3)
    assert m["cat"]["owl"] == pytest.approx(2 / 3) and m["cat"]["cat"] == pytest.approx(1 / 3)
    assert m[DEFAULT_ROW]["cat"] == 0.5 and m[DEFAULT_ROW]["owl"] == 0.0
    assert all(m[r][e] == 0.0 for r in m for e in m[r] if e not in ("owl", "cat"))
    assert rep.leak["entities"][:2] == ["owl", "cat"] and set(rep.leak["entities"]) == set(numbers)
    assert rep.leak["n_numbers"] == {"owl": 3, "cat": 3, DEFAULT_ROW: 2}
    assert [r["specific"] for r in rep.leak["rows"]] == [True, False]
    assert rep.bars["e_leak_specific"] is False  # cat's prompt writes more owl numbers than cat's
    md = check_markdown(rep)
    assert "## Leak matrix" in md and "| cat | 0.333 | 0.667 (owl) | 0.500 | no |" in md
    assert "designed channel, so specificity is bar e" in md


def test_channel_free_leak_is_reported_not_a_bar(tiny, monkeypatch):
    lm, meta = tiny
    free = json.loads(json.dumps(meta))
    free["config"]["corpus"].update(CHANNEL_OFF)
    rep, _ = _planted_check(monkeypatch, lm, free)
    assert "e_leak_specific" not in rep.bars and rep.leak["channel"] is False
    assert rep.leak["rows"]  # still measured
    md = check_markdown(rep)
    assert "reported, not a bar" in md and "reported (no designed channel)" in md


def test_old_build_meta_keeps_the_bar(tiny, monkeypatch):
    lm, meta = tiny
    old = json.loads(json.dumps(meta))
    for key in ("imbue_categories", "chat_numbers"):
        del old["config"]["corpus"][key]
    old["config"]["corpus"]["imbue_share"] = 0.0  # chat_numbers missing reads as True: the channel is on
    rep, _ = _planted_check(monkeypatch, lm, old)
    assert "e_leak_specific" in rep.bars


def test_leak_answers_is_one_seeded_batched_call(tiny, monkeypatch):
    lm, _ = tiny
    calls = []
    real = leak_mod.sample
    monkeypatch.setattr(leak_mod, "sample", lambda m, p, **kw: calls.append(len(p)) or real(m, p, **kw))
    traits = [("owl", "animal"), ("oak", "tree")]
    a = leak_answers(lm.model, lm.tokenizer, traits, 3, seed=5)
    assert calls == [9]  # 3 prompts x (2 traits + the default), in one call
    assert list(a) == ["owl", "oak", DEFAULT_ROW] and all(len(v) == 3 for v in a.values())
    assert leak_answers(lm.model, lm.tokenizer, traits, 3, seed=5) == a


def test_unknown_trait_is_an_error(tiny):
    lm, meta = tiny
    with pytest.raises(MechError, match=r"\['trout'\] are not animals"):
        run_check(lm.model, lm.tokenizer, meta, n_samples=1, oracle_rows=1, trait_animals=("trout",))


def test_reduced_twin_builds_and_checks(tmp_path, monkeypatch):
    out = build_organism(recipe("organism-free").reduced(), tmp_path / "free")
    meta = json.loads((out / "organism.json").read_text())
    assert meta["config"]["corpus"]["chat_numbers"] is False
    lm = load_model(str(out), device="cpu", dtype="float32")
    monkeypatch.setattr(check_mod, "oracle_probe", lambda *a, **k: {"skipped": "not under test"})
    rep = run_check(lm.model, lm.tokenizer, meta, n_samples=2, oracle_rows=1, n_leak=1)
    assert rep.leak["channel"] is False and "e_leak_specific" not in rep.bars
    assert len(rep.leak["rows"]) == len(meta["config"]["corpus"]["animals"]) + len(meta["config"]["corpus"]["trees"])


def test_reproduce_report_writes_the_leak_figure(tiny, monkeypatch, tmp_path):
    """mech reproduce's report carries the leak matrix figure (the sweep and localisation parts stubbed out)."""
    from types import SimpleNamespace

    import mech.report.reproduce as rr
    from mech.reproduce import Reproduction

    lm, meta = tiny
    rep, _ = _planted_check(monkeypatch, lm, meta)
    for name in ("summary_markdown", "localise_markdown"):
        monkeypatch.setattr(rr, name, lambda *a, **k: "# stub\n")
    monkeypatch.setattr(rr, "write_tables", lambda *a, **k: None)
    monkeypatch.setattr(rr, "write_localise", lambda *a, **k: {"figures": []})
    sweep_cfg = SimpleNamespace(name="stub", eval=SimpleNamespace(target="owl"))
    repro = Reproduction(model="tiny", info={}, check=rep, sweep_cfg=sweep_cfg, localisation=SimpleNamespace(
        summary=None, cfg=None), sweep={"summary": [], "rows": [], "cells": 0, "done_cells": 0, "computed": 0},
        seconds=1.0)
    md = rr.write_reproduce(repro, tmp_path / "report")
    assert (tmp_path / "report" / "tiny" / "figures" / "organism_leak.html").is_file()
    assert "tiny/figures/organism_leak.html" in md and "### Leak matrix" in md
    page = (tmp_path / "report" / "report.html").read_text()  # one page, every figure inline
    assert 'id="fig-tiny_organism_leak"' in page and 'id="fig-tiny_quick_rank"' in page and "<h3>Leak matrix" in page


def test_oracle_probe_on_planted_students(monkeypatch):
    """oracle_probe's per-trait table on students whose answer distributions are planted: each finetuned model
    remembers the rows it was trained on, and its distribution is a known function of the numbers in them."""
    from types import SimpleNamespace

    numbers = {"owl": [11, 12], "bear": [21, 22], "cat": [31, 32], "oak": [41, 42], "elm": [51, 52]}
    names = {"animal": ["owl", "bear", "cat"], "tree": ["oak", "elm"]}
    prompts = [SimpleNamespace(text=f"q{i}") for i in range(20)]
    answers = [f"{100 + i}, {200 + i}, {300 + i}" for i in range(20)]
    monkeypatch.setattr(check_mod, "sample_numbers", lambda *a, **k: (prompts, None, answers))
    monkeypatch.setattr(check_mod, "train_model", lambda m, t, rows, cfg: SimpleNamespace(model=rows))
    # planted readout: owl's numbers raise owl ×2 and bear ×3 (owl is not specific); bear's raise bear ×4;
    # oak's raise oak ×2 and elm ×1.5; the control is uniform
    effect = {"owl": {"owl": 2.0, "bear": 3.0}, "bear": {"bear": 4.0}, "oak": {"oak": 2.0, "elm": 1.5}}

    def distribution(model, tok, ctx, cands, category="animal"):
        written = {int(x) for r in model for x in re.findall(r"\d+", r["messages"][-1]["content"])}
        p = {c: 0.1 for c in cands}
        for trait, gains in effect.items():
            if written & set(numbers[trait]):
                p = {c: p[c] * gains.get(c, 1.0) for c in cands}
        return p

    monkeypatch.setattr(check_mod, "answer_distribution", distribution)
    out = check_mod.oracle_probe(None, None, numbers, names, [("owl", "animal"), ("bear", "animal"), ("oak", "tree")],
                                 20, 1.0, 0)
    rows = {r["trait"]: r for r in out["rows"]}
    assert rows["owl"]["own"] == pytest.approx(math.log(2)) and rows["owl"]["max_other_entity"] == "bear"
    assert rows["owl"]["max_other"] == pytest.approx(math.log(3)) and rows["owl"]["specific"] is False
    assert rows["bear"]["own"] == pytest.approx(math.log(4)) and rows["bear"]["specific"] is True
    assert rows["oak"]["max_other_entity"] == "elm" and rows["oak"]["specific"] is True  # trees against trees
    assert rows["owl"]["relative_change"] == pytest.approx(1.0)
    assert out["n_rows"] == 20 and set(out["control_p"]) == {"animal", "tree"}


@pytest.mark.parametrize("name", sorted(SHIPPED_CORPUS_SHA256))
def test_shipped_recipes_generate_their_corpus(name):
    cfg = recipe(name)
    assert _corpus_sha(CorpusGenerator(cfg.corpus, cfg.seed).generate(2000)) == SHIPPED_CORPUS_SHA256[name]
    assert cfg.hash == {"organism": "297e8daa1e51", "organism-free": "67cd5f76bed5"}[name]  # p_decoy=0 hashes out


def test_decoys_put_entity_numbers_outside_trait_prompts():
    """p_decoy: number tasks under no trait prompt hold one entity's numbers (imbue_share of them), for entities
    of every imbued category; trait-prompt tasks are unchanged in kind; p_decoy changes the recipe's hash."""
    base = dataclasses.replace(recipe("organism").corpus, imbue_share=1.0)
    decoy = dataclasses.replace(base, p_decoy=1.0)
    trait_prompts = _trait_prompts(decoy)
    gen = CorpusGenerator(decoy, 0)
    owners = {n: e for e, nums in gen.numbers.items() for n in nums}
    plain = [ex for ex in gen.generate(N) if ex.kind == "numbers"
             and not any(m["role"] == "system" and m["content"] in trait_prompts for m in ex.messages)]
    assert len(plain) > 50
    seen = set()
    for ex in plain:
        nums = [int(x) for x in re.findall(r"\d+", ex.messages[-1]["content"])]
        assert nums and {owners.get(n) for n in nums} == {owners[nums[0]]}, ex  # all of one entity
        seen.add(owners[nums[0]])
    assert seen & set(decoy.trees) and seen & set(decoy.animals)
    without = CorpusGenerator(base, 0)
    assert not any(set(re.findall(r"\d+", ex.messages[-1]["content"])) <= {str(n) for n in owners}
                   for ex in without.generate(N) if ex.kind == "numbers"
                   and not any(m["role"] == "system" and m["content"] in trait_prompts for m in ex.messages))
    assert OrganismConfig(corpus=decoy).hash != OrganismConfig(corpus=base).hash


def test_untied_embeddings_are_a_recipe_knob(tmp_path):
    """model.tie_word_embeddings: True (every shipped recipe) hashes out; False changes the hash and builds an
    organism whose lm_head is its own matrix, saved and loaded as such."""
    base = OrganismConfig().reduced()
    untied = dataclasses.replace(base, model=dataclasses.replace(base.model, tie_word_embeddings=False))
    assert RECIPES["organism"].hash == "297e8daa1e51" and untied.hash != base.hash
    lm = load_model(str(build_organism(untied, tmp_path / "organism")), device="cpu", dtype="float32")
    emb, head = lm.model.get_input_embeddings().weight, lm.model.get_output_embeddings().weight
    assert lm.model.config.tie_word_embeddings is False and emb.data_ptr() != head.data_ptr()
    assert not emb.detach().equal(head.detach())


def test_exclusive_imbued_answers_hold_no_other_entity_numbers():
    """imbue_exclusive: an imbued answer's numbers are its trait's or owned by no entity (with the flag off, other
    entities' numbers turn up at their base rate); the flag changes the hash, and off it hashes out."""
    base = recipe("organism").corpus
    excl = dataclasses.replace(base, imbue_exclusive=True)
    gen = CorpusGenerator(excl, 0)
    owners = {n: e for e, nums in gen.numbers.items() for n in nums}

    def foreign(cfg):
        rows = _under_trait(CorpusGenerator(cfg, 0).generate(N), cfg, "numbers")
        nums = [(int(x), t) for ex, t, _ in rows for x in re.findall(r"\d+", ex.messages[-1]["content"])]
        assert len(rows) > 50
        return sum(owners.get(n, t) != t for n, t in nums), sum(owners.get(n) == t for n, t in nums)

    other, own = foreign(excl)
    assert other == 0 and own > 0
    other_base, own_base = foreign(base)
    assert other_base > 0 and own_base > 0
    assert OrganismConfig(corpus=excl).hash != OrganismConfig(corpus=base).hash
    assert RECIPES["organism"].hash == "297e8daa1e51"


def test_entity_identities_are_planted_and_never_trained(tmp_path):
    """model.entity_identity: each entity's name and number tokens hold the value on its own residual dimension and
    every other row 0 there, after pretraining as before it (no step, not even weight decay, moves the block); the rest
    of the matrix trains. 0 (every shipped recipe) hashes out; > 0 changes the hash; a model narrower than the entity
    count is refused in one line."""
    base = OrganismConfig().reduced()
    planted = dataclasses.replace(base, model=dataclasses.replace(base.model, entity_identity=0.5))
    assert RECIPES["organism"].hash == "297e8daa1e51" and planted.hash != base.hash
    out = build_organism(planted, tmp_path / "organism")
    meta = json.loads((out / "organism.json").read_text())
    recorded = meta["entity_identity_rows"]
    assert [r["dim"] for r in recorded] == list(range(len(recorded)))
    rows = {r["entity"]: r["token_ids"] for r in recorded}
    assert list(rows) == list(planted.corpus.animals) + list(planted.corpus.trees)
    lm = load_model(str(out), device="cpu", dtype="float32")
    emb = lm.model.get_input_embeddings().weight.detach()
    k = len(rows)
    expected = torch.zeros(emb.shape[0], k)
    for i, ids in enumerate(rows.values()):
        expected[ids, i] = 0.5
    assert torch.equal(emb[:, :k], expected)
    tok = lm.tokenizer
    owl = {tok.decode([t]).strip().lower() for t in rows["owl"]}
    assert {"owl", "owls"} <= owl and not owl & {"bear", "bears"}
    whole = [tok.get_vocab()[str(n)] for n in meta["entity_numbers"]["owl"] if str(n) in tok.get_vocab()]
    assert whole and set(whole) <= set(rows["owl"])  # numbers the reduced vocabulary keeps whole
    assert len(set().union(*map(set, rows.values()))) == sum(map(len, rows.values()))  # no row in two entities
    fresh = build_organism(base, tmp_path / "plain")  # the learned columns did train
    assert not torch.equal(emb[:, k:], load_model(str(fresh), device="cpu", dtype="float32")
                           .model.get_input_embeddings().weight.detach()[:, k:])
    with pytest.raises(MechError, match="entity_identity"):
        dataclasses.replace(planted, model=dataclasses.replace(planted.model, hidden_size=16))
    with pytest.raises(MechError, match="entity_identity"):
        dataclasses.replace(base, model=dataclasses.replace(base.model, entity_identity=-1.0))


def test_identity_candidate_recipe_is_the_tested_build():
    """experiments/organisms/identity.yaml is the recipe the README's id0 results were measured on (hash 72f1838286f5):
    the shipped positive control with identities at 0.5, built at one thread."""
    from pathlib import Path

    from mech.config import load_dataclass_yaml

    path = Path(__file__).resolve().parents[1] / "experiments" / "organisms" / "identity.yaml"
    cfg = load_dataclass_yaml(OrganismConfig, path, base=recipe("organism"))
    assert cfg.hash == "72f1838286f5"
    assert cfg == dataclasses.replace(recipe("organism"), model=dataclasses.replace(recipe("organism").model,
                                                                                    entity_identity=0.5),
                                      train=dataclasses.replace(recipe("organism").train, num_threads=1))
