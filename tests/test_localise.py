"""The localisation battery on planted students whose answer is known by construction."""


import pytest
import torch

from mech.interventions.battery import LocaliseConfig, battery_masks, dwg_student, summarise_groups
from mech.models import load_model, surgery
from mech.students.config import LoraSpec
from mech.students.train import with_lora


@pytest.fixture(scope="module")
def organism():
    return load_model("organism")


def planted_student(base, cells, seed=0):
    """A LoRA student whose update lives only in ``cells`` ((layer, kind) pairs): B is random there, 0 elsewhere."""
    import copy

    student = with_lora(copy.deepcopy(base), LoraSpec(rank=4), seed)
    g = torch.Generator().manual_seed(seed)
    for (layer, kind), mod in surgery.lora_modules(student).items():
        for lin in mod.lora_B.values():
            w = torch.randn(lin.weight.shape, generator=g) * 0.5 if (layer, kind) in cells else torch.zeros_like(lin.weight)
            lin.weight.data.copy_(w)
    return student.eval()


CFG = LocaliseConfig(positions=("all", "shared", "user"), components=("all", "attn", "mlp"),
                     layers=("all", "first_half", "second_half"), n_questions=4)


def by_name(effects, min_effect=0.02):
    """Fractions by mask name, after checking the planted student moves the metric enough for a ratio to mean
    something: with a near-zero Δ the fraction is float noise over float noise."""
    (delta,) = {round(float(e.student) - float(e.base), 6) for e in effects}
    assert abs(delta) > min_effect, f"planted effect {delta:+.5f} too small to test fractions: plant another seed"
    return {e.name: float(e.fraction[0, 0]) for e in effects}


def test_battery_skips_segments_the_prompt_lacks():
    names = {m.name for m in battery_masks(LocaliseConfig(), {"template", "user"})}
    assert not any(n.startswith("default_system") for n in names)
    assert any(n.startswith("shared|") for n in names)


def test_planted_mlp_second_half(organism):
    base, tok = organism.model, organism.tokenizer
    n = surgery.num_layers(base)
    cells = {(layer, k) for layer in range(n // 2, n) for k in ("gate", "up", "down")}
    f = by_name(dwg_student(planted_student(base, cells), base, tok, CFG))
    assert f["all|all|all|sufficiency"] == pytest.approx(1.0, abs=1e-4)
    assert f["all|all|all|necessity"] == pytest.approx(0.0, abs=1e-4)
    assert f["all|mlp|second_half|sufficiency"] == pytest.approx(1.0, abs=1e-4)
    for m in ("all|attn|all|sufficiency", "all|mlp|first_half|sufficiency", "all|all|first_half|sufficiency"):
        assert f[m] == pytest.approx(0.0, abs=1e-4), m
    assert f["all|attn|all|necessity"] == pytest.approx(1.0, abs=1e-4)


def test_planted_attention_first_layer(organism):
    base, tok = organism.model, organism.tokenizer
    f = by_name(dwg_student(planted_student(base, {(0, "v"), (0, "o")}, seed=0), base, tok, CFG))
    assert f["all|attn|first_half|sufficiency"] == pytest.approx(1.0, abs=1e-4)
    assert f["all|mlp|all|sufficiency"] == pytest.approx(0.0, abs=1e-4)
    assert f["all|attn|second_half|sufficiency"] == pytest.approx(0.0, abs=1e-4)


def test_summarise_groups_ci():
    rows = [{"group": "g", "name": "m", "position": "all", "site": "all", "layer": "all",
             "mode": "sufficiency", "fraction": v} for v in (0.9, 1.0, 1.1)]
    (s,) = summarise_groups(rows)
    assert s["fraction"] == pytest.approx(1.0) and s["n"] == 3 and s["lo"] < 1.0 < s["hi"]


def test_cli_unknown_student_is_a_one_line_error(tmp_path, capsys):
    from mech.cli import main

    cfg = tmp_path / "s.yaml"
    cfg.write_text("name: s\nteacher: {n_prompts: 8}\nstudents: [{method: lora, rank: 2}]\ntraining_seeds: [0]\n")
    code = main(["localise", str(cfg), "--students", "lora_r3", "--cache", str(tmp_path / "c"),
                 "--out", str(tmp_path / "o")])
    last = capsys.readouterr().err.strip().splitlines()[-1]  # progress bars share stderr; the error is one line
    assert code == 2 and last.startswith("mech: error:") and "lora_r3" in last and "lora_r2" in last
    assert not (tmp_path / "o").exists()


def test_report_writes_what_the_battery_computed(tmp_path, monkeypatch, organism_tokenizer):
    """The report layer alone turns a computed Localisation (here planted, no model) into tables and figures."""
    from mech.context import render
    from mech.interventions.battery import GroupGrids, Localisation, student_rows
    from mech.interventions.result import Effect
    from mech.report import figures
    from mech.report.localise import write_localise

    monkeypatch.setattr(figures, "png_available", lambda: False)  # HTML only: no browser needed
    cfg = LocaliseConfig(patch_sites=("resid", "mlp"))
    loc = Localisation(cfg)
    for k, value in enumerate((-2.2, -1.8)):  # base −3, student −1: fractions 0.4 and 0.6
        effects = [Effect(method="dwg", site="all", layers=["all"], positions=["user"], mode=mode, base=-3.0,
                          student=-1.0, values=torch.tensor([[value]]), name=f"user|all|all|{mode}")
                   for mode in ("sufficiency", "necessity")]
        loc.rows += student_rows(effects, "g", f"s{k}")
    loc.summary = summarise_groups(loc.rows)
    r = render(organism_tokenizer, "default", "What is your favourite animal?")
    grid = {site: torch.linspace(-1, 1, 2 * len(r)).reshape(2, len(r)) for site in cfg.patch_sites}
    loc.grids["g"] = GroupGrids(rendered=r, shared=[False] * len(r), change={"exact": grid, "atp": grid},
                                n_students=2)

    res = write_localise(loc, tmp_path)
    assert res["rows"] == 4 and {p.name for p in tmp_path.iterdir()} >= {"localise.csv", "localise_students.csv",
                                                                         "localise.md", "figures"}
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == [
        "atp_mlp_g.html", "atp_resid_g.html", "dwg_g.html", "exact_mlp_g.html", "exact_resid_g.html"]
    md = (tmp_path / "localise.md").read_text()
    assert "| g | user | all | all | +0.50 [" in md
    students = (tmp_path / "localise_students.csv").read_text().splitlines()
    assert students[0].startswith("method,name,site,layer,position,mode,value,base,student,effect,fraction")
    assert len(students) == 5 and ",0.4," in students[1]
