"""A sweep's tables: results and summary as CSV (``%.6g``) and parquet, and the headline summary.md."""

from __future__ import annotations

import io
from pathlib import Path

from mech.store import atomic_write_bytes, atomic_write_text

HEADLINE = ("delta_logp_first", "paired_logp_first", "delta_p_first", "paired_p_first", "rate", "paired_rate")


def write_tables(out_dir: Path, rows: list[dict], summary: list[dict], name: str) -> list[Path]:
    """results.{csv,parquet}, summary.{csv,parquet} and summary.md in ``out_dir``, each written atomically."""
    import pandas as pd

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, frame in (("results", pd.DataFrame(rows)), ("summary", pd.DataFrame(summary))):
        csv = out_dir / f"{stem}.csv"
        atomic_write_text(csv, frame.to_csv(index=False, float_format="%.6g"))
        buf = io.BytesIO()
        frame.to_parquet(buf, index=False)
        pq = out_dir / f"{stem}.parquet"
        atomic_write_bytes(pq, buf.getvalue())
        written += [csv, pq]
    md = out_dir / "summary.md"
    atomic_write_text(md, summary_markdown(summary, name))
    return written + [md]


def _fmt(x: float, metric: str) -> str:
    return f"{x:+.4f}" if metric.startswith(("delta", "paired")) else f"{x:.4f}"


def _mean_ci(r: dict | None, metric: str) -> str:
    if r is None:
        return "–"
    if r["n"] < 2:
        return _fmt(r["mean"], metric)
    return f"{_fmt(r['mean'], metric)} [{_fmt(r['lo'], metric)}, {_fmt(r['hi'], metric)}]"


def summary_markdown(summary: list[dict], name: str) -> str:
    """The headline table: per student, Δ vs base and paired Δ vs control for logP(first) and sampled rate."""
    index: dict[tuple, dict] = {}
    for r in summary:
        if r["metric"] in HEADLINE:
            k = (r["trait"], r["student"], r["train_context"], r["eval_context"])
            index.setdefault(k, {})[r["metric"]] = r
    lines = [f"# Sweep {name}", "",
             "Mean over training seeds (× teacher seeds) with 95 % t-intervals. Δ: vs the base model in the same "
             "rendered evaluation context. Paired: vs the student trained identically on the neutral teacher's data.",
             "", "| trait | student | train ctx | eval ctx | " + " | ".join(HEADLINE) + " |",
             "|" + "---|" * (4 + len(HEADLINE))]
    for k in sorted(index, key=lambda k: (str(k[0]), k[1], k[2], k[3])):
        lines.append("| " + " | ".join(map(str, k)) + " | "
                     + " | ".join(_mean_ci(index[k].get(m), m) for m in HEADLINE) + " |")
    return "\n".join(lines) + "\n"
