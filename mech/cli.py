"""The `mech` command line: parse, call the library, print. No logic the Python API lacks."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from mech.errors import MechError

EXIT_BAR_FAILED = 1


def _bar(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True, mininterval=1.0)


def _stage_progress(stages: tuple[str, ...], desc: str):
    bar = _bar(len(stages), desc)

    def tell(stage: str) -> None:
        if bar.n or stage != stages[0]:
            bar.update(1)
        bar.set_postfix_str(stage)

    return bar, tell


def _load_config(path: str | None):
    from mech.organism.config import OrganismConfig

    if path is None:
        return OrganismConfig()
    from mech.config import load_dataclass_yaml

    return load_dataclass_yaml(OrganismConfig, path)


def cmd_organism_build(a) -> int:
    from mech import organism

    cfg = _load_config(a.config)
    if a.seed is not None:
        import dataclasses

        cfg = dataclasses.replace(cfg, seed=a.seed)
    bar = _bar(cfg.train.steps, f"organism {cfg.hash} pretraining")

    def progress(step, total, metrics):
        bar.update(step - bar.n)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", refresh=False)

    out = organism.shipped_dir() if a.ship else a.out
    path = organism.build_cached(cfg, out, force=a.force or a.ship, progress=progress)
    bar.close()
    meta = organism.read_meta(path)
    print(f"organism {meta['config_hash']} at {path} ({meta['n_parameters']:,} parameters, "
          f"built in {meta['build_seconds'] / 60:.1f} min, weights sha256 {meta['weights_sha256']})")
    return 0


def _check(a):
    from mech import organism
    from mech.organism.check import STAGES

    bar, tell = _stage_progress(STAGES, "organism check")
    rep = organism.check_organism(a.model, progress=tell, n_samples=a.n_samples, oracle_rows=a.oracle_rows)
    bar.update(bar.total - bar.n)
    bar.close()
    return rep


def cmd_organism_check(a) -> int:
    from mech.report import check_markdown
    from mech.store import atomic_write_json

    rep = _check(a)
    print(check_markdown(rep, title=f"Organism check: {a.model}"))
    if a.json:
        atomic_write_json(a.json, rep.to_dict())
    return 0 if rep.passed else EXIT_BAR_FAILED


def cmd_organism_info(a) -> int:
    from mech import organism

    print(json.dumps(organism.organism_info(a.model), indent=1, sort_keys=True))
    return 0


def cmd_reproduce(a) -> int:
    """The main job: measure the organism and write a report with figures."""
    from mech import organism, plots
    from mech.report import check_markdown
    from mech.store import atomic_dir, atomic_write_json, atomic_write_text

    t0 = time.time()
    if a.rebuild:
        a.model = str(organism.shipped_dir() if a.model == "organism" else a.model)
        cmd_organism_build(argparse.Namespace(config=None, seed=None, out=None, ship=a.model ==
                                              str(organism.shipped_dir()), force=False))
    rep = _check(a)
    out = Path(a.out)
    with atomic_dir(out, overwrite=True) as tmp:
        atomic_write_json(tmp / "check.json", rep.to_dict() | {"model": a.model, "info": organism.organism_info(a.model)})
        figs = {"organism_trait": plots.trait_figure(rep.trait_rows),
                "organism_spread": plots.spread_figure(rep.spread),
                "organism_carrier": plots.carrier_figure(rep.carrier)}
        written = [p for name, fig in figs.items() for p in plots.save_figure(fig, tmp / "figures" / name)]
        md = check_markdown(rep, title=f"mech reproduce: {a.model}")
        md += "\n## Figures\n\n" + "\n".join(f"- [{p.name}](figures/{p.name})" for p in written) + "\n"
        md += f"\nWall time: {(time.time() - t0) / 60:.1f} min.\n"
        atomic_write_text(tmp / "report.md", md)
    print(md.replace(str(tmp), str(out)))
    print(f"report: {out / 'report.md'}")
    return 0 if rep.passed else EXIT_BAR_FAILED


def cmd_sweep(a) -> int:
    from tqdm.auto import tqdm

    from mech.sweep import load_sweep, run_sweep

    cfg = load_sweep(a.config)
    out = a.out or f"runs/{cfg.name}"
    cells_bar = tqdm(desc=f"sweep {cfg.name}: cells", unit="cell", dynamic_ncols=True, position=0)
    stage_bar = tqdm(desc="stage", dynamic_ncols=True, position=1, leave=False)

    def stage(desc: str, done: int, total: int) -> None:
        if stage_bar.desc != desc:
            stage_bar.reset(total=total or None)
            stage_bar.set_description_str(desc[:60])
        if total:
            stage_bar.update(done - stage_bar.n)

    def cell(done: int, total: int) -> None:
        cells_bar.total = total
        cells_bar.update(done - cells_bar.n)

    res = run_sweep(cfg, out, shard=a.shard, cache=a.cache, progress=stage, cell_progress=cell)
    stage_bar.close()
    cells_bar.close()
    print(Path(out, "summary.md").read_text())
    print(f"{res['done_cells']}/{res['cells']} cells finished; this run computed {res['computed']} "
          f"in {res['seconds'] / 60:.1f} min; tables in {out}/")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mech", description="Mechanistic interpretability of subliminal learning.")
    sub = p.add_subparsers(dest="command", required=True)

    org = sub.add_parser("organism", help="the embedded model organism").add_subparsers(dest="action", required=True)
    b = org.add_parser("build", help="build the organism from its recipe (cached under its config hash)")
    b.add_argument("--config", help="YAML overrides of the recipe (OrganismConfig fields)")
    b.add_argument("--seed", type=int, help="override the recipe's seed")
    b.add_argument("--out", help="output directory (default: $MECH_CACHE/organism/<hash>)")
    b.add_argument("--ship", action="store_true", help="write into the package's shipped weights/ (developers)")
    b.add_argument("--force", action="store_true", help="rebuild even when a complete build exists")
    b.set_defaults(func=cmd_organism_build)
    for name, func, hlp in (("check", cmd_organism_check, "measure bars a–d and probes e–f; exit 1 if a bar fails"),
                            ("info", cmd_organism_info, "print a build's recipe, hash and provenance")):
        c = org.add_parser(name, help=hlp)
        c.add_argument("--model", default="organism", help="organism (shipped) or an organism build directory")
        if name == "check":
            c.add_argument("--json", help="also write the report as JSON here")
            c.add_argument("--n-samples", type=int, default=200, help="number completions sampled per measurement")
            c.add_argument("--oracle-rows", type=int, default=300, help="number prompts in the oracle probe")
        c.set_defaults(func=func)

    sw = sub.add_parser("sweep", help="run a YAML grid of teacher × student × context cells (cached, resumable)")
    sw.add_argument("config", help="sweep YAML, e.g. experiments/quick.yaml")
    sw.add_argument("--out", help="table directory (default runs/<name>)")
    sw.add_argument("--shard", help="i/n: compute only every n-th cell starting at i (for job arrays)")
    sw.add_argument("--cache", type=Path, help="artifact cache (default $MECH_CACHE/sweeps)")
    sw.set_defaults(func=cmd_sweep)

    r = sub.add_parser("reproduce", help="the main job: measure the organism, write report.md and figures")
    r.add_argument("--model", default="organism")
    r.add_argument("--out", default="runs/reproduce", help="report directory (replaced atomically)")
    r.add_argument("--rebuild", action="store_true", help="rebuild the organism from its recipe first")
    r.add_argument("--n-samples", type=int, default=200)
    r.add_argument("--oracle-rows", type=int, default=300)
    r.set_defaults(func=cmd_reproduce)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach for a hub unless the user asks
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except MechError as e:
        print(f"mech: error: {e}", file=sys.stderr)
        return MechError.exit_code
    except KeyboardInterrupt:
        print("mech: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
