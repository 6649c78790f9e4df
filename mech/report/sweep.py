"""A sweep's tables: results and summary as CSV (``%.6g``) and parquet, and the headline summary.md."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Callable

from mech.store import atomic_write_bytes, atomic_write_text, content_hash, file_lock
from mech.sweep import SweepConfig, SweepRunner, finished_tables, parse_shard, run_shard
from mech.sweep.runner import Progress

HEADLINE = ("delta_logp_first", "paired_logp_first", "delta_p_first", "paired_p_first", "rate", "paired_rate")


def write_tables(out_dir: Path, rows: list[dict], summary: list[dict], name: str,
                 cross_trait: dict[str, list[dict]] | None = None, tests: list[dict] | None = None,
                 power: list[dict] | None = None, in_context: dict[str, list[dict]] | None = None,
                 rank_widths: list[dict] | None = None) -> list[Path]:
    """results.{csv,parquet}, summary.{csv,parquet} and summary.md in ``out_dir``, each written atomically; with
    ``cross_trait`` (mech.analysis.transfer.cross_trait_tables) also cross_trait{,_specificity}.{csv,parquet},
    cross_trait.md and a heatmap per student recipe under figures/; with ``tests`` (the declared hypotheses,
    mech.analysis.hypotheses) also tests.csv and tests.md; with ``power`` (mech.analysis.power.power_rows) power.csv
    and power.md; with ``in_context`` (mech.sweep.runner.in_context_rows and its summary) in_context.csv and
    in_context.md; with ``rank_widths`` (mech.sweep.runner.rank_width_rows) a table of each LoRA rank as a
    fraction of each projection's width at the end of summary.md."""
    import pandas as pd

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    frames = [("results", pd.DataFrame(rows)), ("summary", pd.DataFrame(summary))]
    if cross_trait is not None:
        frames += [("cross_trait", pd.DataFrame(cross_trait["matrix"])),
                   ("cross_trait_specificity", pd.DataFrame(cross_trait["specificity"]))]
    for stem, frame in frames:
        csv = out_dir / f"{stem}.csv"
        atomic_write_text(csv, frame.to_csv(index=False, float_format="%.6g"))
        buf = io.BytesIO()
        frame.to_parquet(buf, index=False)
        pq = out_dir / f"{stem}.parquet"
        atomic_write_bytes(pq, buf.getvalue())
        written += [csv, pq]
    md = out_dir / "summary.md"
    atomic_write_text(md, summary_markdown(summary, name)
                      + ("\n" + rank_width_markdown(rank_widths) if rank_widths else ""))
    written.append(md)
    if tests is not None:
        atomic_write_text(out_dir / "tests.csv", pd.DataFrame(tests).to_csv(index=False, float_format="%.6g"))
        atomic_write_text(out_dir / "tests.md", tests_markdown(tests, name))
        written += [out_dir / "tests.csv", out_dir / "tests.md"]
    if power:
        atomic_write_text(out_dir / "power.csv", pd.DataFrame(power).to_csv(index=False, float_format="%.6g"))
        atomic_write_text(out_dir / "power.md", power_markdown(power, name))
        written += [out_dir / "power.csv", out_dir / "power.md"]
    if in_context is not None:
        atomic_write_text(out_dir / "in_context.csv",
                          pd.DataFrame(in_context["rows"]).to_csv(index=False, float_format="%.6g"))
        atomic_write_text(out_dir / "in_context.md", in_context_markdown(in_context["summary"], name))
        written += [out_dir / "in_context.csv", out_dir / "in_context.md"]
    if cross_trait is not None:
        from mech.report import figures

        atomic_write_text(out_dir / "cross_trait.md", cross_trait_markdown(cross_trait, name))
        written.append(out_dir / "cross_trait.md")
        for group, fig in figures.cross_trait_figures(cross_trait["matrix"]).items():
            written += figures.save_figure(fig, out_dir / "figures" / f"cross_trait_{group}")
    return written


def _fmt(x: float, metric: str) -> str:
    return f"{x:+.4f}" if metric.startswith(("delta", "paired")) else f"{x:.4f}"


def _mean_ci(r: dict | None, metric: str) -> str:
    if r is None:
        return "–"
    if r["n"] < 2:
        return _fmt(r["mean"], metric)
    return f"{_fmt(r['mean'], metric)} [{_fmt(r['lo'], metric)}, {_fmt(r['hi'], metric)}]"


def rank_width_markdown(rows: list[dict]) -> str:
    """Each LoRA rank as a fraction of each projection's width (min(in, out)); 1 is full rank there."""
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    width = {r["kind"]: r["width"] for r in rows}
    by = {(r["rank"], r["kind"]): r["fraction"] for r in rows}
    lines = ["## LoRA ranks as a fraction of each projection's width", "",
             "rank / min(in, out) of each projection (its width in brackets); 1 means the update can be full "
             "rank there.", "", "| rank | " + " | ".join(f"{k} ({width[k]})" for k in kinds) + " |",
             "|" + "---|" * (1 + len(kinds))]
    for rank in sorted({r["rank"] for r in rows}):
        lines.append(f"| {rank} | " + " | ".join(f"{by[(rank, k)]:.3g}" for k in kinds) + " |")
    return "\n".join(lines) + "\n"


def summary_markdown(summary: list[dict], name: str) -> str:
    """The headline table: per student, Δ vs base and paired Δ vs control for logP(first) and sampled rate."""
    index: dict[tuple, dict] = {}
    for r in summary:
        if r["metric"] in HEADLINE:
            k = (r["trait"], r["student"], r["train_context"], r["eval_context"])
            index.setdefault(k, {})[r["metric"]] = r
    lines = [f"# Sweep {name}", "",
             "Mean with a 95 % t-interval over data (teacher) seeds of each data seed's mean over training seeds "
             "(with one data seed: over training seeds, conditional on its dataset). Δ: vs the base model in the same "
             "rendered evaluation context. Paired: vs the student trained identically on the neutral teacher's data.",
             "", "| trait | student | train ctx | eval ctx | " + " | ".join(HEADLINE) + " |",
             "|" + "---|" * (4 + len(HEADLINE))]
    for k in sorted(index, key=lambda k: (str(k[0]), k[1], k[2], k[3])):
        lines.append("| " + " | ".join(map(str, k)) + " | "
                     + " | ".join(_mean_ci(index[k].get(m), m) for m in HEADLINE) + " |")
    return "\n".join(lines) + "\n"


def _ci(mean: float, lo: float, hi: float, n: int) -> str:
    return f"{mean:+.3f}" + (f" [{lo:+.3f}, {hi:+.3f}]" if n > 1 else "")


def cross_trait_markdown(tables: dict[str, list[dict]], name: str) -> str:
    """Per student recipe: each teacher's own paired Δ log P, its strongest rival and the specificity margin."""
    spec = tables["specificity"]
    lines = [f"# Cross-trait transfer: sweep {name}", "",
             "Paired Δ mean first-token log P (teacher's student − neutral-teacher student, same seeds), mean [95 % "
             "t-interval] over replicates. Own: toward the teacher's trait. Specificity: own − the largest Δ toward "
             "any other candidate, per replicate. Transmits / specific: the interval excludes 0.", ""]
    for group in sorted({(r["student"], r["train_context"], r["eval_context"]) for r in spec}):
        rows = [r for r in spec if (r["student"], r["train_context"], r["eval_context"]) == group]
        lines += [f"## {group[0]} (train {group[1]}, eval {group[2]})", "",
                  f"{sum(r['transmits'] for r in rows)} of {len(rows)} traits transmit; "
                  f"{sum(r['specific'] for r in rows)} of {len(rows)} are specific.", "",
                  "| teacher | own Δ log P | specificity | most-moved other | transmits | specific |",
                  "|---|---|---|---|---|---|"]
        for r in sorted(rows, key=lambda r: r["teacher"]):
            lines.append(f"| {r['teacher']} | {_ci(r['own_mean'], r['own_lo'], r['own_hi'], r['n'])} | "
                         f"{_ci(r['specificity_mean'], r['specificity_lo'], r['specificity_hi'], r['n'])} | "
                         f"{r['rival']} | {'yes' if r['transmits'] else 'no'} | {'yes' if r['specific'] else 'no'} |")
        lines.append("")
    return "\n".join(lines)


def _g(x: float) -> str:
    return "–" if x != x else f"{x:.3g}"


def tests_markdown(tests: list[dict], name: str) -> str:
    """One line per declared hypothesis: the claim, the test, its statistic, estimate, p (raw, Holm, BH), verdict."""
    from mech.analysis.hypotheses import __doc__ as rule

    lines = [f"# Declared tests: sweep {name}", "",
             "Each hypothesis was declared in the experiment YAML before it was run. Units: the replicates the test "
             "is over (data seeds, each the mean over its training seeds; training seeds when the sweep has one data "
             "seed). p is adjusted over every hypothesis here (Holm; BH beside it); the verdict uses Holm. The "
             "estimate's interval is the (1 − 2α) one (TOST's); an inverted U's estimate is its weaker slope per log2 "
             "rank, and "
             "its breakpoint interval a two-stage bootstrap over data and training seeds.", "",
             "| name | claim | test | arms | units (n) | statistic | estimate [CI] | breakpoint [CI] | p | p Holm | "
             "p BH | verdict |", "|" + "---|" * 12]
    for t in tests:
        est = "–" if t["estimate"] != t["estimate"] else \
            f"{t['estimate']:+.4g}" + (f" [{t['lo']:+.4g}, {t['hi']:+.4g}]" if t["lo"] == t["lo"] else "")
        bp = "–" if t["breakpoint"] != t["breakpoint"] else \
            f"r{t['breakpoint']:g} [r{t['breakpoint_lo']:g}, r{t['breakpoint_hi']:g}]"
        lines.append(f"| {t['name']} | {t['claim']} | {t['test']} (α {t['alpha']:g}"
                     + (f", margin {t['margin']:g}" if t["margin"] == t["margin"] else "") + f") | {t['arms']} | "
                     f"{t['units']} ({t['n_units']}) | {_g(t['statistic'])} | {est} | {bp} | {_g(t['p'])} | "
                     f"{_g(t['p_holm'])} | {_g(t['p_bh'])} | **{t['verdict']}** |")
    lines += ["", "Details: " + "; ".join(f"{t['name']}: {t['detail']}" for t in tests), "",
              "Verdict rule:" + rule.split("Verdict rule, per test", 1)[1].split(":", 1)[1]]
    return "\n".join(lines) + "\n"


def in_context_markdown(summary: list[dict], name: str) -> str:
    """The in-context control per teacher arm: mean [95 % CI over data seeds] of each metric."""
    lines = [f"# In-context control: sweep {name}", "",
             "The base model, not finetuned, with the teacher's first answers as its system prompt. Paired: minus the "
             "same with the neutral teacher's answers (same data seed). Delta: minus the plain base. Mean [95 % "
             "t-interval] over data seeds.", "", "| teacher | metric | mean [95 % CI] | n |", "|---|---|---|---|"]
    for r in summary:
        lines.append(f"| {r['trait']} | {r['metric']} | {_ci(r['mean'], r['lo'], r['hi'], r['n'])} | {r['n']} |")
    return "\n".join(lines) + "\n"


def power_markdown(power: list[dict], name: str) -> str:
    """Per student: the sampled rate's SE at this sweep's sample count, and the samples its effect would need."""
    lines = [f"# Sampled-rate power: sweep {name}", "",
             "p0: the neutral student's mean first-token P(target); p1 = p0 + the paired first-token ΔP. Samples per "
             "arm a two-sided two-proportion test (α 0.05, power 0.8, Cohen's h) needs to see p1 vs p0 in the sampled "
             "rate; samples are taken as independent, so these are lower bounds.", "",
             "| trait | student | train ctx | eval ctx | p0 | p1 | samples per arm | rate SE | samples needed "
             "| enough |",
             "|" + "---|" * 10]
    for r in power:
        lines.append(f"| {r['trait']} | {r['student']} | {r['train_context']} | {r['eval_context']} | {r['p0']:.4f} | "
                     f"{r['p1']:.4f} | {r['samples_per_arm']} | {r['rate_se']:.4f} | {r['samples_needed']:,.0f} | "
                     f"{'yes' if r['enough'] else 'no'} |")
    return "\n".join(lines) + "\n"


def run_sweep(cfg: SweepConfig, out_dir: str | Path, shard: str | None = None, cache: Path | None = None,
              progress: Progress | None = None, cell_progress: Callable[[int, int], None] | None = None,
              trust_remote_code: bool = False) -> dict:
    """Compute this shard's cells, then write the tables of every finished cell to ``out_dir``
    (mech.report.sweep); returns the run statistics and the files written. For the tables as data, use
    ``run_shard`` and ``finished_tables`` on a SweepRunner."""
    i, n = parse_shard(shard)  # a bad spec fails before the model loads
    runner = SweepRunner(cfg, cache, progress, trust_remote_code=trust_remote_code)
    res = run_shard(runner, i, n, cell_progress)
    out = Path(out_dir)
    # shards sharing an out dir write in turn, each reading the cache afresh under the lock: the last writer
    # sees every cell the others finished, so a shard that scanned early never overwrites a fuller table
    with file_lock(runner.cache / "locks" / f"tables-{content_hash(str(out.resolve()))}.lock"):
        tables = finished_tables(runner)
        written = write_tables(out, tables.pop("rows"), tables.pop("summary"), cfg.name,
                               tables.pop("cross_trait", None), tables.pop("tests", None),
                               tables.pop("power", None), tables.pop("in_context", None),
                               tables.pop("rank_widths", None))
    return res | tables | {"written": [str(p) for p in written]}


def _columns(header: list[str], rows: list[list]) -> list[str]:
    cells = [header] + [["–" if v is None else str(v) for v in r] for r in rows]
    width = [max(len(r[k]) for r in cells) for k in range(len(header))]
    return ["  ".join(v.ljust(w) for v, w in zip(r, width)).rstrip() for r in cells]


def status_text(status: dict) -> str:
    """mech.sweep.status.sweep_status as text: the counts, where the keys came from, per-shard counts (with
    shards) and one line per cell."""
    c = status["counts"]
    lines = [f"sweep {status['name']}: {status['cells']} cells in {status['cache']}: {c['done']} done, "
             f"{c['running']} running, {c['missing']} missing", status["note"], ""]
    if status["per_shard"] is not None:
        lines += _columns(["shard", "cells", "done", "running", "missing"],
                          [[s["shard"], s["cells"], s["done"], s["running"], s["missing"]]
                           for s in status["per_shard"]]) + [""]
    keys = ["shard", "state", "trait", "teacher_seed", "student", "training_seed", "train_context", "eval_context"]
    head = ["shard", "state", "trait", "data seed", "student", "train seed", "train ctx", "eval ctx"]
    if not status["shards"]:
        keys, head = keys[1:], head[1:]
    lines += _columns(head, [[r[k] for k in keys] for r in status["rows"]])
    return "\n".join(lines) + "\n"
