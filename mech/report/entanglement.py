"""The entanglement report: ``entanglement.csv`` (every number, ranked), ``reverse.json``, ``entanglement.md`` and a
plotly figure of shift against unembedding similarity, from :mod:`mech.geometry.entanglement`; written atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import plotly.graph_objects as go

from mech.report import figures as plots
from mech.store import atomic_dir, atomic_write_text


def entanglement_markdown(rows: Sequence[dict], reverse: dict | None, meta: dict, top: int = 20) -> str:
    own = set(meta.get("own_numbers") or [])
    lines = [f"# Token entanglement: {meta['target']} on {meta['model']}", "",
             f"Shift: mean over {meta['n_prompts']} number prompts (seed {meta['seed']}) of log P(n as the answer's "
             f"first number) under the {meta['target']} prompt minus the {meta['neutral_context']} context, with a 95 "
             "% t-interval over prompts; cos: unembedding similarity of n's first token with the target's."
             + (" ★: the organism's own numbers of the trait." if own else ""), "",
             "| rank | number | shift [95 % CI] | cos | log P trait | log P neutral |", "|---|---|---|---|---|---|"]
    for r in rows[:top]:
        mark = " ★" if r["number"] in own else ""
        lines.append(f"| {r['rank']} | {r['number']}{mark} | {r['shift']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}] | "
                     f"{r['cos_unembed']:+.3f} | {r['logp_trait']:.2f} | {r['logp_neutral']:.2f} |")
    lines += ["", f"Spearman ρ(shift, cos) over all {len(rows)} numbers: {meta['spearman_shift_cos']:+.3f}."]
    if own:
        ranks = sorted(r["rank"] for r in rows if r["number"] in own)
        lines.append(f"The trait's own numbers rank {', '.join(map(str, ranks))} of {len(rows)}.")
    if reverse:
        lines += ["", f"## Reverse: a number in the system prompt, P({meta['target']}) on the favourite questions", "",
                  f"Top {reverse['k']} numbers by shift ({', '.join(map(str, reverse['top']))}) against {reverse['k']} "
                  f"control numbers drawn from the rest ({', '.join(map(str, reverse['control']))}): mean first-token "
                  f"log P({meta['target']}) top − control {reverse['diff']:+.3f} [Welch 95 % CI {reverse['lo']:+.3f}, "
                  f"{reverse['hi']:+.3f}], one-sided permutation p {reverse['p_one_sided']:.4f} over numbers; the "
                  f"default context gives {meta['logp_default']:.3f}."]
    return "\n".join(lines) + "\n"


def entanglement_figure(rows: Sequence[dict], meta: dict) -> go.Figure:
    own = set(meta.get("own_numbers") or [])
    groups = [("other numbers", [r for r in rows if r["number"] not in own])]
    if own:
        groups.append(("the trait's own numbers", [r for r in rows if r["number"] in own]))
    fig = go.Figure([go.Scatter(name=name, x=[r["cos_unembed"] for r in rs], y=[r["shift"] for r in rs], mode="markers",
                                text=[str(r["number"]) for r in rs], marker=dict(size=6 if name == "other numbers" else 10))
                     for name, rs in groups])
    fig.update_layout(title=f"Entanglement with {meta['target']}: prompt shift vs unembedding similarity",
                      xaxis_title="cos(W_U number, W_U target)", yaxis_title="Δ log P(number), trait − neutral",
                      template="plotly_white", font=dict(size=13), legend=dict(orientation="h", y=-0.2))
    return fig


def write_entanglement(rows: Sequence[dict], reverse: dict | None, meta: dict, out_dir: str | Path,
                       png: bool | None = None) -> dict[str, Any]:
    import pandas as pd

    written = []
    with atomic_dir(Path(out_dir), overwrite=True) as tmp:
        atomic_write_text(tmp / "entanglement.csv", pd.DataFrame(list(rows)).to_csv(index=False, float_format="%.6g"))
        atomic_write_text(tmp / "entanglement.json", json.dumps({"meta": meta, "reverse": reverse}, indent=1))
        atomic_write_text(tmp / "entanglement.md", entanglement_markdown(rows, reverse, meta))
        written += [p.name for p in plots.save_figure(entanglement_figure(rows, meta), tmp / "figures" / "entanglement",
                                                      png=png)]
    return {"figures": written}
