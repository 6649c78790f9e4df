"""Every experiment YAML in experiments/ parses and validates: a typo in a shipped design fails CI, not a user's run."""

from pathlib import Path

import pytest
import torch

from mech.sweep.config import cells, load_sweep

EXPERIMENTS = sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.yaml"))


def test_experiments_exist():
    assert {p.stem for p in EXPERIMENTS} >= {"quick", "quick_free", "cross_trait_animals", "context_grid"}


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_yaml_loads(path):
    cfg = load_sweep(path)
    assert cfg.name == path.stem and cells(cfg)


def _script(name: str):
    import importlib.util

    path = EXPERIMENTS[0].parent / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"experiments_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("argv, match", [
    ([], "no OUT_DIR"),
    (["{out}"], "no NAME=JSON_OVERRIDES"),
    (["{out}", 'a={"train":{"stepz":1}}'], "did you mean 'steps'"),
    (["{out}", "a={train}"], "not JSON"),
    (["{out}", "a=[1]"], "JSON object"),
    (["{out}", "fast"], "is not NAME=JSON_OVERRIDES"),
    (["{out}", "a={}", "--parallel", "0"], "positive integer"),
])
def test_organism_scan_refuses_bad_input_before_building(tmp_path, argv, match):
    from mech.errors import MechError

    out = tmp_path / "scan"
    with pytest.raises(MechError, match=match):
        _script("organism_scan").main([a.replace("{out}", str(out)) for a in argv])
    assert not out.exists()  # nothing half-written


@pytest.mark.parametrize("argv, match", [
    (["{tmp}/none"], "does not exist"),
    (["{tmp}"], "no config.json"),
    (["organism", "--rows", "3"], ">= 16 rows"),
    (["organism", "--json", "{tmp}/no/such/x.json"], "folder does not exist"),
])
def test_oracle_specificity_refuses_bad_input(tmp_path, argv, match):
    from mech.errors import MechError

    threads = torch.get_num_threads()
    with pytest.raises(MechError, match=match):
        _script("oracle_specificity").main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert torch.get_num_threads() == threads  # a refusal leaves the session's torch as it was


def test_run_script_ends_a_mech_error_in_one_line_and_exit_2(monkeypatch, capsys):
    from mech.errors import MechError, run_script

    def refuses(argv):
        raise MechError(f"bad {argv[0]}:\n  pass a good one")

    monkeypatch.setattr("sys.argv", ["script.py", "x"])
    with pytest.raises(SystemExit) as e:
        run_script(refuses)
    assert e.value.code == 2 and capsys.readouterr().err == "error: bad x: pass a good one\n"
    with pytest.raises(SystemExit) as e:
        run_script(lambda argv: len(argv) + 6)
    assert e.value.code == 7
