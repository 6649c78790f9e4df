"""The ``mech reproduce`` report: one directory, written atomically, for one or more models.

Layout of ``out_dir``: ``report.md``, which opens with the verdict table (the paper's claims × the models run,
mech.analysis.paper), then how each verdict was reached, then one section per model; ``report.html``, the same
report as one self-contained page with every figure inline; and per model a folder named after it holding
``check.json`` (the organism check and the build's provenance; organism builds only), ``sweep/`` (the main sweep's
tables, mech.report.sweep), ``sweep-<name>/`` (each further sweep's), ``localise/`` (mech.report.localise's
tables and figures) and ``figures/`` (the organism's and the rank figure).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

from mech.analysis.paper import NULL_ALPHA, PAPER_CLAIMS
from mech.analysis.paper import __doc__ as paper_doc
from mech.report import figures as plots
from mech.report.html import render_html
from mech.report.localise import localise_markdown, write_localise
from mech.report.organism import check_markdown
from mech.report.sweep import rank_width_markdown, summary_markdown, tests_markdown, write_tables
from mech.reproduce import Reproduction
from mech.store import atomic_dir, atomic_write_json, atomic_write_text


def _demote(markdown: str, levels: int = 1) -> str:
    """Every heading ``levels`` deeper: a part's own '# Title' becomes '## Title' inside the report."""
    return "\n".join("#" * levels + line if re.match(r"#+ ", line) else line for line in markdown.splitlines()) + "\n"


def model_slugs(models: Sequence[str]) -> list[str]:
    """A folder name per model: its spec's last path part made file-safe, numbered where two would collide."""
    out: list[str] = []
    for m in models:
        base = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(m).rstrip("/")).name) or "model"
        slug, k = base, 2
        while slug in out:
            slug, k = f"{base}-{k}", k + 1
        out.append(slug)
    return out


def _ci(e: dict[str, Any]) -> str:
    est = e["estimate"]
    if est != est:
        return "–"
    ci = f" [{e['lo']:+.3g}, {e['hi']:+.3g}]" if e["lo"] == e["lo"] and e["hi"] == e["hi"] else ""
    return f"{est:+.3g}{ci}"


def verdict_markdown(reps: Sequence[Reproduction], slugs: Sequence[str]) -> str:
    """The verdict table, what each column is, the rule, and per claim the tests behind every cell."""
    from mech.analysis.paper import verdict_rows

    evidence = [rep.evidence() for rep in reps]
    rows = verdict_rows([(slug, ev) for slug, ev in zip(slugs, evidence)])
    lines = ["# mech reproduce: the paper's claims", "",
             "Nief et al. 2026, *Subliminal Learning is a LoRA Artifact*: each claim and referee objection against "
             "the tests this run declared and ran, per model. A cell is agrees / disagrees (with the paper) / mixed "
             "/ undecided / not tested, by the rule below; the number of tests behind it is in brackets.", ""]
    lines += [f"- **{slug}** (`{rep.model}`): {rep.role or 'model'}" for rep, slug in zip(reps, slugs)]
    lines += ["", "| claim | " + " | ".join(slugs) + " |", "|---|" + "---|" * len(slugs)]
    for r in rows:
        cells = [f"**{r[s]}**" + (f" ({r[f'{s} tests']})" if r[f"{s} tests"] else "") for s in slugs]
        lines.append(f"| {r['claim']}: {r['text']} | " + " | ".join(cells) + " |")
    lines += ["", "Rule (mech.analysis.paper): " + " ".join(
        paper_doc.split("Verdict rule, per claim and model.", 1)[1].split("\n\n", 1)[0].split()), "",
              "## How each verdict was reached", ""]
    for cid, text in PAPER_CLAIMS.items():
        lines += [f"### {cid}: {text}", ""]
        found = False
        for slug, ev in zip(slugs, evidence):
            for e in ev[cid]:
                found = True
                lines.append(f"- {slug} — {e['test']}: **{e['verdict']}** (agrees with the paper if "
                             f"{e['agrees_if']}) → {e['reading']}; estimate {_ci(e)}; {e['detail']}")
        if not found:
            hint = {"C3": "experiments/context_grid.yaml", "R1": "experiments/full_ft_controls.yaml",
                    "C1": "experiments/quick.yaml or experiments/rank_sweep.yaml",
                    "C2": "experiments/quick.yaml or experiments/context_grid.yaml"}.get(
                cid, f"the localisation nulls (mech localise --null-sets N; p < {NULL_ALPHA:g} on 'shared')")
            lines.append(f"- not tested in this run: {hint}")
        lines.append("")
    return "\n".join(lines) + "\n"


def report_markdown(rep: Reproduction, figures: str) -> str:
    """One model's report from its computed parts: the organism check, the sweep summary and tests, any further
    sweeps, the localisation battery, then ``figures`` (the body of its Figures section: links for report.md,
    placeholders for report.html)."""
    c = rep.sweep
    head = (check_markdown(rep.check, title=f"mech reproduce: {rep.model}") if rep.check is not None else
            f"# mech reproduce: {rep.model}\n\nNot an organism build: no organism check.\n")
    if rep.role:
        head += f"\nWhat this model's results are: {rep.role}.\n"
    parts = [head,
             _demote(summary_markdown(c["summary"], rep.sweep_cfg.name)),
             *([_demote(rank_width_markdown(c["rank_widths"]))] if c.get("rank_widths") else []),
             *([_demote(tests_markdown(c["tests"], rep.sweep_cfg.name))] if c.get("tests") else [])]
    for cfg, tables in rep.more_sweeps:
        parts.append(_demote(summary_markdown(tables["summary"], cfg.name)))
        if tables.get("tests"):
            parts.append(_demote(tests_markdown(tables["tests"], cfg.name)))
    parts += [_demote(localise_markdown(rep.localisation.summary, rep.localisation.cfg,
                                        *(getattr(rep.localisation, k, None)
                                          for k in ("duplicates", "tests", "nulls", "sampled")))),
              "## Figures\n\n" + figures + "\n",
              f"Sweep cells: {c['done_cells']}/{c['cells']} (computed this run: {c['computed']}). "
              f"Wall time: {rep.seconds / 60:.1f} min.\n"]
    return "\n".join(parts)


def _write_model(rep: Reproduction, root: Path) -> dict[str, Any]:
    """One model's files under ``root``; returns its figures by name and the written figure files."""
    figs = {"quick_rank": plots.rank_figure(rep.sweep["summary"], trait=rep.sweep_cfg.eval.target)}
    if rep.check is not None:  # an organism build: its check and its figures
        atomic_write_json(root / "check.json", rep.check.to_dict() | {"model": rep.model, "info": rep.info})
        figs = {"organism_trait": plots.trait_figure(rep.check.trait_rows),
                "organism_spread": plots.spread_figure(rep.check.spread),
                "organism_carrier": plots.carrier_figure(rep.check.carrier),
                "organism_leak": plots.leak_figure(rep.check.leak["matrix"])} | figs
    written = [p for name, fig in figs.items() for p in plots.save_figure(fig, root / "figures" / name)]
    write_tables(root / "sweep", rep.sweep["rows"], rep.sweep["summary"], rep.sweep_cfg.name,
                 rep.sweep.get("cross_trait"), rep.sweep.get("tests"), rep.sweep.get("power"),
                 rank_widths=rep.sweep.get("rank_widths"))
    for cfg, tables in rep.more_sweeps:
        write_tables(root / f"sweep-{cfg.name}", tables["rows"], tables["summary"], cfg.name,
                     tables.get("cross_trait"), tables.get("tests"), tables.get("power"),
                     rank_widths=tables.get("rank_widths"))
    loc = write_localise(rep.localisation, root / "localise")
    written += [Path(f) for f in loc["figures"]]
    return {"figures": figs | {f"localise_{k}": v for k, v in loc.get("figure_objects", {}).items()},
            "files": written}


def write_reproduce(reps: Reproduction | Sequence[Reproduction], out_dir: str | Path) -> str:
    """Write the whole report into ``out_dir`` (replaced atomically: a failure leaves the old one): report.md with
    its figures as files, and report.html, one self-contained page with every figure inline. Returns report.md's
    text."""
    reps = [reps] if isinstance(reps, Reproduction) else list(reps)
    slugs = model_slugs([r.model for r in reps])
    with atomic_dir(Path(out_dir), overwrite=True) as tmp:
        verdicts = verdict_markdown(reps, slugs)
        md_parts, html_parts, inline = [verdicts], [verdicts], {}
        for rep, slug in zip(reps, slugs):
            made = _write_model(rep, tmp / slug)
            links = "\n".join(f"- [{p}]({p})" for p in (str(f.relative_to(tmp)) for f in made["files"]))
            named = {f"{slug}_{k}": v for k, v in made["figures"].items()}
            inline |= named
            md_parts.append(_demote(report_markdown(rep, links)))
            html_parts.append(_demote(report_markdown(rep, "\n\n".join(f"{{{{figure:{n}}}}}" for n in named))))
        total = sum(r.seconds for r in reps)
        tail = f"Models: {len(reps)}. Total wall time: {total / 60:.1f} min.\n"
        md = "\n".join(md_parts + [tail])
        atomic_write_text(tmp / "report.md", md)
        title = "mech reproduce: " + ", ".join(r.model for r in reps)
        atomic_write_text(tmp / "report.html", render_html("\n".join(html_parts + [tail]), inline, title=title))
    return md


def summary_line(reps: Sequence[Reproduction]) -> str:
    """One line per model for the terminal: its role and how many claims each reading got."""
    from collections import Counter

    from mech.analysis.paper import combine

    out = []
    for rep, slug in zip(reps, model_slugs([r.model for r in reps])):
        counts = Counter(combine([e["reading"] for e in ev]) for ev in rep.evidence().values())
        out.append(f"{slug}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + f" ({rep.role})")
    return "\n".join(out)

