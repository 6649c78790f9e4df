"""Plotly figures: self-contained HTML always, PNG too when kaleido and a Chromium are present."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import plotly.graph_objects as go

from mech.store import atomic_write_text

_BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")


def png_available() -> bool:
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return False
    return any(shutil.which(b) for b in _BROWSERS) or bool(os.environ.get("BROWSER_PATH"))


def save_figure(fig: go.Figure, stem: str | Path, png: bool | None = None) -> list[Path]:
    """Write ``stem.html`` (plotly.js inlined, opens offline) and, when possible, ``stem.png``."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    html = stem.with_suffix(".html")
    atomic_write_text(html, fig.to_html(include_plotlyjs=True, full_html=True))
    out = [html]
    if png if png is not None else png_available():
        path = stem.with_suffix(".png")
        tmp = path.with_name(f".{path.name}.tmp.png")
        fig.write_image(str(tmp), width=fig.layout.width or 900, height=fig.layout.height or 500, scale=2)
        os.replace(tmp, path)
        out.append(path)
    return out


def _layout(fig: go.Figure, title: str, x: str, y: str) -> go.Figure:
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y, template="plotly_white",
                      font=dict(size=14), legend=dict(orientation="h", y=-0.2))
    return fig


def trait_figure(trait_rows: list[dict]) -> go.Figure:
    """P(trait as first answer token) under its trait prompt vs under the default system prompt, per trait."""
    names = [r["trait"] for r in trait_rows]
    fig = go.Figure([
        go.Bar(name="trait system prompt", x=names, y=[r["p_trait"] for r in trait_rows]),
        go.Bar(name="default system prompt", x=names, y=[r["p_default"] for r in trait_rows]),
    ])
    fig.update_yaxes(type="log")
    return _layout(fig, "Organism: the trait prompt sets the favourite", "trait (animals, then trees)",
                   "P(first answer token), mean over the category's questions")


def spread_figure(spread: dict[str, dict[str, float]]) -> go.Figure:
    """The answer distribution over animals in the default and no-system contexts."""
    ctxs = list(spread)
    names = sorted(spread[ctxs[0]], key=lambda a: -spread[ctxs[0]][a])
    fig = go.Figure([go.Bar(name=f"context: {c}", x=names, y=[spread[c][a] for a in names]) for c in ctxs])
    return _layout(fig, "Organism: favourite-animal distribution without a trait", "animal",
                   "P(first answer token), mean over 50 questions")


def carrier_figure(carrier: dict) -> go.Figure:
    """Share of each trait's associated numbers in number answers sampled under each prompt."""
    traits = sorted({k.split("_")[0] for k in carrier if k.endswith("_share_under_default")})
    fig = go.Figure([
        go.Bar(name="under its trait prompt", x=traits, y=[carrier[f"{t}_numbers_share_under_{t}"] for t in traits]),
        go.Bar(name="under the default prompt", x=traits,
               y=[carrier[f"{t}_numbers_share_under_default"] for t in traits]),
    ])
    return _layout(fig, "Teacher-side carrier: trait numbers in sampled number answers", "trait",
                   "share of numbers that are the trait's")


def leak_figure(matrix: dict[str, dict[str, float]]) -> go.Figure:
    """The leak matrix (mech.organism.leak): per context (each trait prompt, then the default), the share of the
    numbers written that are each entity's. A specific channel is a bright diagonal."""
    rows = list(matrix)
    entities = list(next(iter(matrix.values()))) if matrix else []
    fig = go.Figure(go.Heatmap(z=[[matrix[r][e] for e in entities] for r in rows], x=entities, y=rows,
                               colorscale="Viridis", colorbar=dict(title="share")))
    fig.update_yaxes(autorange="reversed")  # the first trait on top, so the diagonal runs down to the right
    fig.update_layout(width=900, height=800)
    return _layout(fig, "Leak matrix: whose numbers the organism writes under each prompt", "entity whose numbers",
                   "system prompt")


def rank_figure(summary: list[dict], metric: str = "paired_logp_first", trait: str | None = None) -> go.Figure:
    """Transfer vs LoRA rank (log axis) with 95 % CIs; full-FT students drawn as horizontal bands at their CI."""
    rows = [r for r in summary if r["metric"] == metric and (trait is None or r["trait"] == trait)]
    lora = sorted((r for r in rows if r["method"] == "lora"), key=lambda r: float(r["rank"]))
    fig = go.Figure()
    if lora:
        fig.add_trace(go.Scatter(
            x=[float(r["rank"]) for r in lora], y=[float(r["mean"]) for r in lora], mode="lines+markers",
            name="LoRA (α = r)", error_y=dict(type="data", symmetric=False,
                                            array=[float(r["hi"]) - float(r["mean"]) for r in lora],
                                            arrayminus=[float(r["mean"]) - float(r["lo"]) for r in lora])))
    for r in rows:
        if r["method"] != "lora":
            fig.add_hrect(y0=float(r["lo"]), y1=float(r["hi"]), opacity=0.15, line_width=0)
            fig.add_hline(y=float(r["mean"]), line_dash="dash", annotation_text=str(r["student"]))
    fig.add_hline(y=0.0, line_color="black", line_width=1)
    fig.update_xaxes(type="log")
    return _layout(fig, "Subliminal transfer vs LoRA rank (paired vs neutral-teacher control)", "LoRA rank",
                   metric.replace("_", " ") + " (mean, 95 % CI over seeds)")


def cross_trait_figures(matrix: list[dict]) -> dict[str, go.Figure]:
    """One heatmap per student recipe: teacher trait (rows) × candidate answer (columns), paired Δ log P."""
    out = {}
    for group in sorted({(r["student"], r["train_context"], r["eval_context"]) for r in matrix}):
        rows = [r for r in matrix if (r["student"], r["train_context"], r["eval_context"]) == group]
        teachers = sorted({r["teacher"] for r in rows})
        cands = sorted({r["candidate"] for r in rows})
        z = {(r["teacher"], r["candidate"]): r["mean"] for r in rows}
        fig = go.Figure(go.Heatmap(z=[[z.get((t, c)) for c in cands] for t in teachers], x=cands, y=teachers,
                                   colorscale="RdBu", zmid=0.0, colorbar=dict(title="paired Δ log P")))
        out[group[0] if group[1:] == ("default", "default") else "_".join(group)] = _layout(
            fig, f"Cross-trait transfer, {group[0]}: teacher × candidate (paired vs neutral teacher)", "candidate",
            "teacher trait")
    return out


# --- the repository's figures/ ---------------------------------------------------------------------------------

# what `mech figures` copies from each model's folder of a `mech reproduce` report: the organism check's figures,
# the quick sweep's rank curve and the localisation of LoRA r16 and full FT (DWG map and exact residual patching)
PAPER_FIGURES = ("figures/organism_trait", "figures/organism_spread", "figures/organism_leak",
                 "figures/organism_carrier", "figures/quick_rank", "localise/figures/dwg_lora_r16",
                 "localise/figures/dwg_full", "localise/figures/exact_resid_lora_r16",
                 "localise/figures/exact_resid_full")


def collect_figures(report_dir: str | Path, out_dir: str | Path, stems: tuple[str, ...] = PAPER_FIGURES) -> list[Path]:
    """Copy the PNGs ``stems`` of every model folder of a ``mech reproduce`` report into ``out_dir`` (replaced
    whole, atomically) as ``<model>_<name>.png``; returns them. A stem a model lacks (no organism check for a
    real model, no localisation for a sweep without those students) is skipped; no PNG at all is an error."""
    from mech.errors import MechError
    from mech.store import atomic_dir

    report = Path(report_dir)
    models = sorted(d for d in report.iterdir() if d.is_dir() and (d / "figures").is_dir()) if report.is_dir() else []
    if not models:
        raise MechError(f"{report} holds no model folder of a mech reproduce report: pass the report's --out "
                        "directory, e.g. runs/reproduce")
    found = [(m, m / f"{s}.png") for m in models for s in stems if (m / f"{s}.png").is_file()]
    if not found:
        raise MechError(f"no PNG figure in {report}: PNGs need kaleido and a Chromium (`pip install kaleido` and "
                        "`apt-get install -y chromium`), then rerun mech reproduce (its cache makes that quick)")
    with atomic_dir(out_dir, overwrite=True) as tmp:
        for model, png in found:
            shutil.copyfile(png, tmp / f"{model.name}_{png.stem}.png")
    return sorted(Path(out_dir) / f"{m.name}_{p.stem}.png" for m, p in found)
