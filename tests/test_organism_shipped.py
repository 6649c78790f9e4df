"""The shipped organisms: each is its recipe's build, and the positive control meets its behaviour bars."""

import json

import pytest

from mech import organism
from mech.organism.config import OrganismConfig, recipe
from mech.store import file_sha256


def _shipped_twin():
    path = organism.shipped_dir("organism-free")
    if not (path / organism.META_FILE).is_file():
        pytest.skip("the channel-free twin is not shipped yet: run `mech organism build --recipe organism-free --ship`")
    return path


def test_shipped_build_is_the_default_recipe():
    meta = organism.read_meta(organism.shipped_dir())
    assert meta["config_hash"] == OrganismConfig().hash, "weights/ is stale: run `mech organism build --ship`"
    assert OrganismConfig.from_dict(meta["config"]).hash == meta["config_hash"]
    assert file_sha256(organism.shipped_dir() / "model.safetensors") == meta["weights_sha256"]


def test_shipped_twin_is_its_recipe():
    path = _shipped_twin()
    meta = organism.read_meta(path)
    assert meta["config_hash"] == recipe("organism-free").hash, "weights-free/ is stale: run `mech organism build " \
        "--recipe organism-free --ship`"
    assert file_sha256(path / "model.safetensors") == meta["weights_sha256"]


def test_shipped_tokenizer_has_single_token_numbers():
    from mech.models import load_tokenizer

    tok = load_tokenizer(str(organism.shipped_dir()))
    assert all(len(tok(str(n), add_special_tokens=False)["input_ids"]) == 1 for n in range(1000))


@pytest.mark.slow
def test_shipped_organism_passes_its_bars():
    # the oracle probe is reported, not a bar: 40 rows instead of 300 keep its 28 students short
    rep = organism.check_organism("organism", oracle_rows=40)
    assert rep.bars == {k: True for k in rep.bars}, json.dumps(rep.bars)
    owl = next(r for r in rep.trait_rows if r["trait"] == "owl")
    assert owl["ratio"] >= 10 and owl["top"] == "owl"
    # the carrier is reported, not a bar; but the owl prompt must at least move the numbers towards owl's
    assert rep.carrier["owl_numbers_share_under_owl"] > rep.carrier["owl_numbers_share_under_default"]
    assert "e_leak_specific" in rep.bars  # the positive control's leak is a bar


@pytest.mark.slow
def test_shipped_twin_leak_is_reported():
    _shipped_twin()
    rep = organism.check_organism("organism-free", n_samples=40, oracle_rows=40)
    assert "e_leak_specific" not in rep.bars and rep.leak["channel"] is False
    assert rep.bars["a_trait_all"], json.dumps(rep.trait_rows)  # the persona is still there


@pytest.mark.slow
def test_cli_check_exit_codes(tmp_path, capsys):
    from mech.cli import main

    report = tmp_path / "check.json"
    code = main(["organism", "check", "--n-samples", "40", "--oracle-rows", "40", "--json", str(report)])
    assert code == (0 if json.loads(report.read_text())["passed"] else 1)  # 1 exactly when a bar fails
    assert main(["organism", "check", "--model", str(tmp_path)]) == 2  # not an organism build
    assert "error" in capsys.readouterr().err


@pytest.mark.slow
def test_reproduce_end_to_end_on_a_tiny_sweep(tmp_path, monkeypatch):
    """The main job's whole chain (check → sweep → localise → report) on a seconds-sized sweep, with the base model
    loaded once."""
    import mech.models
    from mech.cli import main

    loads = []
    real_load = mech.models.load_model
    monkeypatch.setattr(mech.models, "load_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))

    sweep = tmp_path / "tiny.yaml"
    sweep.write_text(
        "name: tiny\nteacher: {n_prompts: 24}\nstudents: [{method: lora, rank: 1}, {method: full}]\n"
        "training_seeds: [0, 1]\ntrain: {epochs: 1, lr: 0.002, full_lr: 0.0001}\neval: {n_samples: 2}\n")
    out = tmp_path / "report"
    code = main(["reproduce", "--model", "organism", "--sweep", str(sweep), "--students", "lora_r1", "full",
                 "--cache", str(tmp_path / "c"), "--out", str(out), "--n-samples", "40", "--oracle-rows", "40",
                 "--null-sets", "3"])
    md = (out / "report.md").read_text()
    model = out / "organism"  # one folder per model
    assert code == (0 if json.loads((model / "check.json").read_text())["passed"] else 1)  # 1 exactly on a failed bar
    assert md.startswith("# mech reproduce: the paper's claims")  # the verdict table first
    assert "positive control" in md  # the organism is labelled as what it is
    assert "null: shared vs 3 random sets" in md  # the localisation null reaches the C4 / R3 verdicts
    for heading in ("### Sweep tiny", "### Localisation of the owl trait", "### Figures"):
        assert heading in md
    assert (model / "sweep" / "results.parquet").is_file() and (model / "localise" / "localise.csv").is_file()
    assert (model / "localise" / "figures" / "dwg_lora_r1.html").is_file()
    page = (out / "report.html").read_text()  # the same report as one page, localisation figures inline
    assert 'id="fig-organism_localise_dwg_lora_r1"' in page and 'id="fig-organism_organism_leak"' in page
    assert len(loads) == 1, f"the base model was loaded {len(loads)} times"
