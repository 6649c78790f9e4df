"""The `mech steer` report: ``steer.csv``, ``steer.md`` and a figure (trait log P and number pass rate against α,
one line per layer), from :func:`mech.teacher.steered.steering_curve`; written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from mech.report import figures as plots
from mech.store import atomic_dir, atomic_write_text


def steer_markdown(rows: Sequence[dict], meta: dict) -> str:
    sampled = any(r["rate"] == r["rate"] for r in rows)  # NaN unless sampled
    lines = [f"# Steering {meta['model']} with the {meta['vector']} vector of {meta['target']}", "",
             f"α·v added after each layer at every position; v: {meta['what']}. First-token P({meta['target']}) on the "
             f"{meta['category']} favourite questions in the {meta['context']} context (Δ log P vs α = 0 unsteered, "
             f"{meta['logp_base']:.3f}); pass rate: the share of {meta['n_pilot']} number answers (seed "
             f"{meta['seed']}) that pass the filter under the same steering.", "",
             "| layer | α | ‖α·v‖ | P(target) | Δ log P | " + ("sampled rate | " if sampled else "") + "pass rate |",
             "|---|---|---|---|---|" + ("---|" if sampled else "") + "---|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['alpha']:g} | {abs(r['alpha']) * r['norm']:.2f} | {r['p_first']:.4f} | "
                     f"{r['delta_logp_first']:+.3f} | " + (f"{r['rate']:.4f} | " if sampled else "")
                     + f"{r['pass_rate']:.2f} |")
    return "\n".join(lines) + "\n"


def steer_figure(rows: Sequence[dict], meta: dict) -> go.Figure:
    fig = make_subplots(rows=1, cols=2, subplot_titles=(f"Δ log P({meta['target']})", "number pass rate"))
    for layer in dict.fromkeys(r["layer"] for r in rows):
        rs = [r for r in rows if r["layer"] == layer]
        for col, key in ((1, "delta_logp_first"), (2, "pass_rate")):
            fig.add_trace(go.Scatter(name=f"layer {layer}", legendgroup=str(layer), showlegend=col == 1,
                                     x=[r["alpha"] for r in rs], y=[r[key] for r in rs], mode="lines+markers"),
                          row=1, col=col)
    fig.update_xaxes(title_text="α")
    fig.update_layout(title=f"Steering with the {meta['vector']} vector of {meta['target']}", template="plotly_white",
                      font=dict(size=13), legend=dict(orientation="h", y=-0.2))
    return fig


def write_steer(rows: Sequence[dict], meta: dict, out_dir: str | Path, png: bool | None = None) -> dict[str, Any]:
    import pandas as pd

    written = []
    with atomic_dir(Path(out_dir), overwrite=True) as tmp:
        atomic_write_text(tmp / "steer.csv", pd.DataFrame(list(rows)).to_csv(index=False, float_format="%.6g"))
        atomic_write_text(tmp / "steer.md", steer_markdown(rows, meta))
        written += [p.name for p in plots.save_figure(steer_figure(rows, meta), tmp / "figures" / "steer", png=png)]
    return {"figures": written}
