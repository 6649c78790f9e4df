"""Per-token figures for localisation results: layer × token heatmaps, token strips, one row per mask.

Tokens are the x axis, written as text: whitespace is made visible (space ``·``, newline ``⏎``, tab ``⇥``,
other control characters as their Unicode control pictures) and each tick is coloured by the token's
segment (:data:`SEGMENT_COLORS`, the same palette in every figure, with a legend). Tokens shared with the
training context (:func:`mech.context.shared_mask`) are drawn in bold and starred in the strip above the
heatmap. Save with :func:`mech.report.figures.save_figure` (HTML always, PNG when kaleido + Chromium are present).
"""

from __future__ import annotations

import html
from typing import Any, Sequence

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from mech.context import ASSISTANT, CUSTOM_SYSTEM, DEFAULT_SYSTEM, SEGMENT_LABELS, TEMPLATE, USER
from mech.errors import MechError

# Okabe-Ito colours: distinguishable with the common colour-vision deficiencies, and readable as text on white.
SEGMENT_COLORS: dict[str, str] = {
    DEFAULT_SYSTEM: "#D55E00",  # vermillion
    CUSTOM_SYSTEM: "#CC79A7",  # reddish purple
    TEMPLATE: "#0072B2",  # blue
    USER: "#009E73",  # bluish green
    ASSISTANT: "#E69F00",  # orange
}
SEGMENT_NAMES: dict[str, str] = {
    DEFAULT_SYSTEM: "default system",
    CUSTOM_SYSTEM: "custom system",
    TEMPLATE: "template",
    USER: "user",
    ASSISTANT: "assistant",
}
SHARED_NAME = "shared with training"
SHARED_SYMBOL = "star"
MAX_TOKEN_CHARS = 12  # longer tokens are cut with "…" so one token cannot swallow the axis

_VISIBLE = {" ": "·", "\n": "⏎", "\t": "⇥", "\r": "␍"}
_STRIP_ROW_SHARE = 0.06  # of the figure height, for the segment strip above a heatmap


# --------------------------------------------------------------------------------------------- tokens


def format_token(token: str, max_chars: int = MAX_TOKEN_CHARS) -> str:
    """A token as plain visible text: whitespace and control characters shown, long tokens cut with "…"."""
    out = []
    for ch in token:
        if ch in _VISIBLE:
            out.append(_VISIBLE[ch])
        elif ord(ch) < 0x20:
            out.append(chr(0x2400 + ord(ch)))  # the Unicode control picture, e.g. ␀
        elif ch == "\x7f":
            out.append("␡")
        else:
            out.append(ch)
    text = "".join(out) or "∅"
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


def tick_label(token: str, segment: str, shared: bool = False) -> str:
    """Plotly tick text: the visible token, HTML-escaped ("<|im_start|>" must not parse as a tag), coloured by
    its segment, bold when shared."""
    text = html.escape(format_token(token), quote=False)
    if shared:
        text = f"<b>{text}</b>"
    return f'<span style="color:{SEGMENT_COLORS[segment]}">{text}</span>'


def _check_tokens(tokens: Sequence[str], segments: Sequence[str], shared: Sequence[bool] | None) -> list[bool]:
    if not tokens:
        raise MechError("no tokens to plot: pass the rendered prompt's tokens (Rendered.tokens())")
    if len(segments) != len(tokens):
        raise MechError(f"{len(tokens)} tokens but {len(segments)} segment labels: pass Rendered.segments of the "
                        "same rendering")
    unknown = sorted({s for s in segments if s not in SEGMENT_COLORS})
    if unknown:
        raise MechError(f"unknown segment labels {unknown}: expected {', '.join(SEGMENT_LABELS)}")
    if shared is None:
        return [False] * len(tokens)
    if len(shared) != len(tokens):
        raise MechError(f"{len(tokens)} tokens but {len(shared)} shared flags: pass shared_mask(eval, train) of "
                        "the same rendering")
    return [bool(s) for s in shared]


def _as_array(values: Any, what: str) -> torch.Tensor:
    try:
        return torch.as_tensor(values, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise MechError(f"{what} must be numbers (a tensor or nested lists), got {type(values).__name__}") from None


# --------------------------------------------------------------------------------------------- traces


def _segment_strip_traces(tokens: Sequence[str], segments: Sequence[str], shared: Sequence[bool]) -> list[Any]:
    """A one-row heatmap of segment colours (x = position) plus a star over each shared token."""
    order = list(SEGMENT_COLORS)
    n = len(order)
    # discrete colourscale: segment k fills the band [k/n, (k+1)/n]
    scale = []
    for k, seg in enumerate(order):
        scale += [[k / n, SEGMENT_COLORS[seg]], [(k + 1) / n, SEGMENT_COLORS[seg]]]
    hover = [[f"{p}: {html.escape(format_token(t), quote=False)} ({SEGMENT_NAMES[s]}{', shared' if sh else ''})"
              for p, (t, s, sh) in enumerate(zip(tokens, segments, shared))]]
    strip = go.Heatmap(
        z=[[order.index(s) + 0.5 for s in segments]], x=list(range(len(tokens))), y=[0], zmin=0, zmax=n,
        colorscale=scale, showscale=False, hoverinfo="text", text=hover, xgap=1, name="segments",
    )
    traces: list[Any] = [strip]
    marked = [p for p, sh in enumerate(shared) if sh]
    if marked:
        traces.append(go.Scatter(
            x=marked, y=[0] * len(marked), mode="markers", name=SHARED_NAME, showlegend=False, hoverinfo="skip",
            marker=dict(symbol=SHARED_SYMBOL, size=9, color="white", line=dict(color="black", width=1)),
        ))
    return traces


def _legend_traces(segments: Sequence[str], any_shared: bool) -> list[Any]:
    """Legend-only entries (no data) for the segments present and the shared marker."""
    present = [s for s in SEGMENT_COLORS if s in set(segments)]
    traces = [go.Scatter(x=[None], y=[None], mode="markers", name=SEGMENT_NAMES[s],
                         marker=dict(symbol="square", size=12, color=SEGMENT_COLORS[s])) for s in present]
    if any_shared:
        traces.append(go.Scatter(
            x=[None], y=[None], mode="markers", name=SHARED_NAME + " (bold)",
            marker=dict(symbol=SHARED_SYMBOL, size=11, color="white", line=dict(color="black", width=1)),
        ))
    return traces


def _token_axis(tokens: Sequence[str], segments: Sequence[str], shared: Sequence[bool]) -> dict[str, Any]:
    return dict(
        tickmode="array", tickvals=list(range(len(tokens))),
        ticktext=[tick_label(t, s, sh) for t, s, sh in zip(tokens, segments, shared)],
        tickangle=-90, tickfont=dict(size=11), range=[-0.5, len(tokens) - 0.5], showgrid=False,
    )


def _finish(fig: go.Figure, title: str, n_tokens: int, height: int) -> go.Figure:
    # title in the top margin's upper half, the legend (one row of short names) in its lower half
    fig.update_layout(
        title=dict(text=title, y=0.98, yanchor="top", x=0.01), template="plotly_white", font=dict(size=12),
        width=max(700, 16 * n_tokens + 260), height=height, margin=dict(t=90, b=120),
        legend=dict(orientation="h", yanchor="bottom", y=1.01, xanchor="left", x=0, font=dict(size=11)),
    )
    return fig


# --------------------------------------------------------------------------------------------- figures


def token_strip(tokens: Sequence[str], segments: Sequence[str], shared: Sequence[bool] | None = None,
                title: str = "") -> go.Figure:
    """The prompt as one row of cells coloured by segment, tokens as x ticks, shared tokens starred."""
    flags = _check_tokens(tokens, segments, shared)
    fig = go.Figure(_segment_strip_traces(tokens, segments, flags) + _legend_traces(segments, any(flags)))
    fig.update_xaxes(**_token_axis(tokens, segments, flags))
    # a band, not the whole plot area: save_figure may render it taller than the strip needs
    fig.update_yaxes(visible=False, range=[-0.5, 0.5], domain=[0.55, 0.8])
    return _finish(fig, title, len(tokens), height=300)


def patching_heatmap(values: Any, tokens: Sequence[str], segments: Sequence[str],
                     shared: Sequence[bool] | None = None, title: str = "", zlabel: str = "metric",
                     layer_labels: Sequence[str] | None = None, colorscale: str | None = None,
                     zmid: float | None = None) -> go.Figure:
    """Layer × token heatmap of ``values`` ``[n_layers, seq_len]`` (e.g. a residual patching grid).

    Row ``l`` is layer ``l`` (bottom to top); x ticks are the tokens, coloured by segment; a strip above shows
    the segments and stars the shared tokens. ``zmid`` centres a diverging colourscale there (e.g. 0 for
    effects, the base's metric for raw metrics); without it the scale is sequential.
    """
    z = _as_array(values, "patching values")
    flags = _check_tokens(tokens, segments, shared)
    if z.ndim != 2 or z.shape[1] != len(tokens) or z.shape[0] == 0:
        raise MechError(f"patching values of shape {tuple(z.shape)} for {len(tokens)} tokens: expected "
                        f"[n_layers, {len(tokens)}]")
    n_layers = z.shape[0]
    labels = list(layer_labels) if layer_labels is not None else [f"L{i}" for i in range(n_layers)]
    if len(labels) != n_layers:
        raise MechError(f"{len(labels)} layer labels for {n_layers} rows: pass one label per row")

    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.01,
                        row_heights=[_STRIP_ROW_SHARE, 1 - _STRIP_ROW_SHARE])
    for trace in _segment_strip_traces(tokens, segments, flags):
        fig.add_trace(trace, row=1, col=1)
    shown = [format_token(t) for t in tokens]
    hover = [[f"{labels[i]}, {p}: {html.escape(shown[p], quote=False)} ({SEGMENT_NAMES[segments[p]]})"
              f"<br>{html.escape(zlabel)} = {float(z[i, p]):.4g}" for p in range(len(tokens))]
             for i in range(n_layers)]
    fig.add_trace(go.Heatmap(
        z=z.tolist(), x=list(range(len(tokens))), y=list(range(n_layers)), text=hover, hoverinfo="text",
        colorscale=colorscale or ("RdBu_r" if zmid is not None else "Viridis"), zmid=zmid,
        colorbar=dict(title=dict(text=zlabel, side="right"), len=0.85, y=0.45), name=zlabel,
    ), row=2, col=1)
    for trace in _legend_traces(segments, any(flags)):
        fig.add_trace(trace, row=2, col=1)
    fig.update_xaxes(**_token_axis(tokens, segments, flags), row=2, col=1)
    fig.update_xaxes(showticklabels=False, row=1, col=1)
    fig.update_yaxes(visible=False, range=[-0.5, 0.5], row=1, col=1)
    fig.update_yaxes(tickmode="array", tickvals=list(range(n_layers)), ticktext=labels, title_text="layer",
                     range=[-0.5, n_layers - 0.5], row=2, col=1)
    return _finish(fig, title, len(tokens), height=max(420, 30 * n_layers + 300))


def mask_rows_heatmap(values: Any, mask_names: Sequence[str], title: str = "", zlabel: str = "metric",
                      column_labels: Sequence[str] | None = None, references: dict[str, float] | None = None,
                      errors: Any = None) -> go.Figure:
    """One row per mask (e.g. DWG results), in the order given, top to bottom.

    ``values`` ``[n_masks]``: one dot per mask (``errors`` ``[n_masks]`` half-widths as error bars;
    ``references`` ``{name: value}`` as dashed vertical lines, e.g. the base's and the student's metric).
    ``values`` ``[n_masks, n_cols]``: a heatmap with one row per mask and ``column_labels`` columns, each
    cell labelled with its value.
    """
    z = _as_array(values, "mask values")
    names = [str(m) for m in mask_names]
    if z.ndim not in (1, 2) or z.shape[0] != len(names) or z.shape[0] == 0:
        raise MechError(f"mask values of shape {tuple(z.shape)} for {len(names)} masks: expected [n_masks] or "
                        "[n_masks, n_cols] with one row per mask name")
    height = max(300, 36 * len(names) + 200)
    if z.ndim == 1:
        err = None
        if errors is not None:
            e = _as_array(errors, "errors")
            if e.shape != z.shape:
                raise MechError(f"errors of shape {tuple(e.shape)} for {len(names)} masks: pass one half-width "
                                "per mask")
            err = dict(type="data", array=e.tolist(), visible=True)
        # dots, not bars: metrics such as log P have no natural zero for a bar to grow from
        fig = go.Figure(go.Scatter(x=z.tolist(), y=names, mode="markers+text", error_x=err, name=zlabel,
                                   marker=dict(size=11, color="#0072B2"), text=[f"{v:.4g}" for v in z.tolist()],
                                   textposition="top center", cliponaxis=False, showlegend=False))
        palette = ("#D55E00", "#009E73", "#555555", "#CC79A7")
        for k, (ref_name, ref) in enumerate((references or {}).items()):
            line = dict(dash="dash", color=palette[k % len(palette)], width=2)
            fig.add_vline(x=float(ref), line=line)
            # named in the legend, not annotated: labels of nearby lines (base vs student) would overprint
            fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", line=line,
                                     name=f"{html.escape(str(ref_name))} = {float(ref):.4g}"))
        fig.update_xaxes(title_text=zlabel)
    else:
        cols = list(column_labels) if column_labels is not None else [str(j) for j in range(z.shape[1])]
        if len(cols) != z.shape[1]:
            raise MechError(f"{len(cols)} column labels for {z.shape[1]} columns: pass one label per column")
        fig = go.Figure(go.Heatmap(z=z.tolist(), x=cols, y=names, texttemplate="%{z:.3g}", colorscale="Viridis",
                                   colorbar=dict(title=dict(text=zlabel, side="right")), name=zlabel))
    fig.update_yaxes(autorange="reversed", type="category", title_text="mask")
    fig.update_layout(title=dict(text=title, y=0.98, yanchor="top", x=0.01), template="plotly_white",
                      font=dict(size=12), height=height, width=900, margin=dict(t=90),
                      legend=dict(orientation="h", yanchor="bottom", y=1.01, xanchor="left", x=0))
    return fig
