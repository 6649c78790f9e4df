"""The ``mech reproduce`` report: one directory, written atomically, with report.md, every table and figure.

Layout of ``out_dir``: ``report.md``; ``report.html`` (the same report as one self-contained page, figures
inline); ``check.json`` (the organism check and the build's provenance; organism builds only); ``sweep/``
(mech.report.sweep's tables); ``localise/`` (mech.report.localise's tables and figures); ``figures/`` (the
organism's and the rank figure).
"""

from __future__ import annotations

from pathlib import Path

from mech.report import figures as plots
from mech.report.html import render_html
from mech.report.localise import localise_markdown, write_localise
from mech.report.organism import check_markdown
from mech.report.sweep import summary_markdown, tests_markdown, write_tables
from mech.reproduce import Reproduction
from mech.store import atomic_dir, atomic_write_json, atomic_write_text


def _demote(markdown: str) -> str:
    """A section's own '# Title' becomes '## Title' inside the report."""
    return "\n".join("#" + line if line.startswith("# ") else line for line in markdown.splitlines()) + "\n"


def report_markdown(rep: Reproduction, figures: str) -> str:
    """The report from the computed parts: the organism check, the sweep summary, the localisation battery, then
    ``figures`` (the body of its Figures section: links for report.md, placeholders for report.html)."""
    c = rep.sweep
    head = (check_markdown(rep.check, title=f"mech reproduce: {rep.model}") if rep.check is not None else
            f"# mech reproduce: {rep.model}\n\nNot an organism build: no organism check.\n")
    parts = [head,
             _demote(summary_markdown(c["summary"], rep.sweep_cfg.name)),
             *([_demote(tests_markdown(c["tests"], rep.sweep_cfg.name))] if c.get("tests") else []),
             _demote(localise_markdown(rep.localisation.summary, rep.localisation.cfg,
                                       *(getattr(rep.localisation, k, None) for k in ("duplicates", "tests", "nulls")))),
             "## Figures\n\n" + figures + "\n",
             f"Sweep cells: {c['done_cells']}/{c['cells']} (computed this run: {c['computed']}). "
             f"Wall time: {rep.seconds / 60:.1f} min.\n"]
    return "\n".join(parts)


def write_reproduce(rep: Reproduction, out_dir: str | Path) -> str:
    """Write the whole report into ``out_dir`` (replaced atomically: a failure leaves the old one): report.md with
    its figures as files, and report.html, one self-contained page with every figure inline. Returns report.md's
    text."""
    with atomic_dir(Path(out_dir), overwrite=True) as tmp:
        figs = {"quick_rank": plots.rank_figure(rep.sweep["summary"], trait=rep.sweep_cfg.eval.target)}
        if rep.check is not None:  # an organism build: its check and its figures
            atomic_write_json(tmp / "check.json", rep.check.to_dict() | {"model": rep.model, "info": rep.info})
            figs = {"organism_trait": plots.trait_figure(rep.check.trait_rows),
                    "organism_spread": plots.spread_figure(rep.check.spread),
                    "organism_carrier": plots.carrier_figure(rep.check.carrier),
                    "organism_leak": plots.leak_figure(rep.check.leak["matrix"])} | figs
        written = [p for name, fig in figs.items() for p in plots.save_figure(fig, tmp / "figures" / name)]
        write_tables(tmp / "sweep", rep.sweep["rows"], rep.sweep["summary"], rep.sweep_cfg.name,
                     rep.sweep.get("cross_trait"), rep.sweep.get("tests"), rep.sweep.get("power"))
        loc = write_localise(rep.localisation, tmp / "localise")
        written += [Path(f) for f in loc["figures"]]
        paths = [str(w.relative_to(tmp)) for w in written]
        md = report_markdown(rep, "\n".join(f"- [{p}]({p})" for p in paths))
        atomic_write_text(tmp / "report.md", md)
        inline = figs | {f"localise_{k}": v for k, v in loc.get("figure_objects", {}).items()}
        page = report_markdown(rep, "\n\n".join(f"{{{{figure:{name}}}}}" for name in inline))
        atomic_write_text(tmp / "report.html", render_html(page, inline, title=f"mech reproduce: {rep.model}"))
    return md
