"""mech.report.heatmaps: layer × token heatmaps, token strips and per-mask rows, saved through mech.report.figures.

The tokens and segments come from a real rendering of the shipped organism's chat template (default system
prompt, template, user), so ticks meet "<|im_start|>", newlines and leading spaces. One PNG is rendered
(kaleido + Chromium) and decoded here to check that the segment colours really are in the image.
"""

from __future__ import annotations

import struct
import zlib

import plotly.graph_objects as go
import pytest
import torch

from mech.report import heatmaps as hm
from mech.context import CUSTOM_SYSTEM, DEFAULT_SYSTEM, TEMPLATE, USER, render, shared_mask
from mech.errors import MechError
from mech.models import load_tokenizer, organism_dir
from mech.report.figures import png_available, save_figure


@pytest.fixture(scope="module")
def rendered():
    tok = load_tokenizer(organism_dir())
    ev = render(tok, "default", "What is your favourite animal?")
    train = render(tok, "default", "Continue: 1, 2, 3", "4, 5")
    return ev, shared_mask(ev, train)


def heatmap_traces(fig: go.Figure) -> list[go.Heatmap]:
    return [t for t in fig.data if isinstance(t, go.Heatmap)]


# --------------------------------------------------------------------------------------------- tokens


@pytest.mark.parametrize("token, shown", [
    ("\n", "⏎"), (" animal", "·animal"), ("\t", "⇥"), ("a\r\n", "a␍⏎"), ("\x00", "␀"), ("", "∅"),
    ("owl", "owl"), ("x" * 20, "x" * 11 + "…"),
])
def test_format_token_makes_whitespace_visible(token, shown):
    assert hm.format_token(token) == shown


def test_tick_label_escapes_and_colours():
    label = hm.tick_label("<|im_start|>", TEMPLATE)
    assert "&lt;|im_start|&gt;" in label and "<|im_start|>" not in label
    assert hm.SEGMENT_COLORS[TEMPLATE] in label and "<b>" not in label
    assert "<b>·You</b>" in hm.tick_label(" You", DEFAULT_SYSTEM, shared=True)


def test_palette_covers_every_segment_with_distinct_colours():
    from mech.context import SEGMENT_LABELS

    assert set(hm.SEGMENT_COLORS) == set(SEGMENT_LABELS)
    assert len(set(hm.SEGMENT_COLORS.values())) == len(SEGMENT_LABELS)


# --------------------------------------------------------------------------------------------- patching heatmap


def test_patching_heatmap_shape_ticks_segments_shared(rendered):
    ev, shared = rendered
    tokens, segs = ev.tokens(), ev.segments
    values = torch.arange(4 * len(ev), dtype=torch.float32).reshape(4, len(ev))
    fig = hm.patching_heatmap(values, tokens, segs, shared, title="resid_post", zlabel="log P(owl)")

    strip, main = heatmap_traces(fig)
    assert torch.equal(torch.tensor(main.z), values.double())
    assert list(main.y) == [0, 1, 2, 3] and list(main.x) == list(range(len(ev)))
    assert main.colorbar.title.text == "log P(owl)"
    # the strip's cells encode each token's segment
    order = list(hm.SEGMENT_COLORS)
    assert [order[int(z)] for z in strip.z[0]] == segs

    xaxis = fig.layout.xaxis2  # the heatmap's axis (row 2) carries the token ticks
    assert list(xaxis.tickvals) == list(range(len(ev)))
    for label, tok, seg, sh in zip(xaxis.ticktext, tokens, segs, shared):
        assert hm.SEGMENT_COLORS[seg] in label
        assert ("<b>" in label) == sh
    assert "&lt;|im_start|&gt;" in xaxis.ticktext[0] and "⏎" in xaxis.ticktext[2]
    assert list(fig.layout.yaxis2.ticktext) == ["L0", "L1", "L2", "L3"]

    stars = [t for t in fig.data if isinstance(t, go.Scatter) and t.x and t.x[0] is not None]
    assert len(stars) == 1 and list(stars[0].x) == [i for i, s in enumerate(shared) if s]
    legend = [t.name for t in fig.data if t.showlegend is not False and isinstance(t, go.Scatter)
              and t.x == (None,)]
    present = [hm.SEGMENT_NAMES[s] for s in hm.SEGMENT_COLORS if s in set(segs)]
    assert legend == present + [hm.SHARED_NAME + " (bold)"]
    assert hm.SEGMENT_NAMES[USER] in legend and "assistant" not in legend  # only segments the prompt has


def test_patching_heatmap_without_shared_and_diverging(rendered):
    ev, _ = rendered
    fig = hm.patching_heatmap(torch.zeros(2, len(ev)), ev.tokens(), ev.segments, zmid=0.0,
                              layer_labels=["first", "last"])
    main = heatmap_traces(fig)[1]
    assert main.zmid == 0.0 and main.colorscale[0][1] != hm.SEGMENT_COLORS[DEFAULT_SYSTEM]
    assert not any("<b>" in t for t in fig.layout.xaxis2.ticktext)
    assert all(t.name != hm.SHARED_NAME + " (bold)" for t in fig.data)
    assert list(fig.layout.yaxis2.ticktext) == ["first", "last"]


def test_patching_heatmap_rejects_mismatches(rendered):
    ev, shared = rendered
    tokens, segs = ev.tokens(), ev.segments
    n = len(ev)
    with pytest.raises(MechError, match=r"expected \[n_layers"):
        hm.patching_heatmap(torch.zeros(4, n - 1), tokens, segs)
    with pytest.raises(MechError, match="segment labels"):
        hm.patching_heatmap(torch.zeros(4, n), tokens, segs[:-1])
    with pytest.raises(MechError, match="unknown segment"):
        hm.patching_heatmap(torch.zeros(4, n), tokens, ["system"] * n)
    with pytest.raises(MechError, match="shared flags"):
        hm.patching_heatmap(torch.zeros(4, n), tokens, segs, shared[:3])
    with pytest.raises(MechError, match="layer labels"):
        hm.patching_heatmap(torch.zeros(4, n), tokens, segs, layer_labels=["a"])
    with pytest.raises(MechError, match="no tokens"):
        hm.token_strip([], [])


# --------------------------------------------------------------------------------------------- strip and masks


def test_token_strip(rendered):
    ev, shared = rendered
    fig = hm.token_strip(ev.tokens(), ev.segments, shared, title="prompt")
    (strip,) = heatmap_traces(fig)
    assert len(strip.z[0]) == len(ev) and strip.showscale is False
    assert len(fig.layout.xaxis.ticktext) == len(ev)


def test_mask_rows_dots_with_references_and_errors():
    names = ["default_system × all", "template × attn", "all"]
    fig = hm.mask_rows_heatmap([-8.8, -8.6, -8.5], names, title="DWG", zlabel="log P(owl)",
                               references={"base": -8.8, "student": -8.5}, errors=[0.01, 0.02, 0.0])
    dots = fig.data[0]
    assert list(dots.y) == names and list(dots.x) == [-8.8, -8.6, -8.5]
    assert list(dots.error_x.array) == [0.01, 0.02, 0.0]
    assert fig.layout.yaxis.autorange == "reversed"  # first mask on top
    assert sorted(s.x0 for s in fig.layout.shapes) == [-8.8, -8.5]
    assert [t.name for t in fig.data[1:]] == ["base = -8.8", "student = -8.5"]
    with pytest.raises(MechError, match="one half-width per mask"):
        hm.mask_rows_heatmap([1.0, 2.0], ["a", "b"], errors=[0.1])
    with pytest.raises(MechError, match="one row per mask"):
        hm.mask_rows_heatmap([1.0, 2.0], ["a"])


def test_mask_rows_grid():
    fig = hm.mask_rows_heatmap([[0.1, 0.9], [0.5, 0.4]], ["m1", "m2"], column_labels=["sufficiency", "necessity"])
    (heat,) = heatmap_traces(fig)
    assert list(heat.y) == ["m1", "m2"] and list(heat.x) == ["sufficiency", "necessity"]
    assert heat.texttemplate == "%{z:.3g}"
    with pytest.raises(MechError, match="column labels"):
        hm.mask_rows_heatmap([[0.1, 0.9]], ["m1"], column_labels=["only one"])


# --------------------------------------------------------------------------------------------- saving


def _png_pixels(path) -> tuple[int, int, set[tuple[int, int, int]]]:
    """(width, height, set of RGB colours) of an 8-bit RGB/RGBA non-interlaced PNG, decoded with zlib alone."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and colour in (2, 6) and interlace == 0
    bpp = 3 if colour == 2 else 4
    raw, stride = zlib.decompress(idat), width * bpp
    prev, colours = bytearray(stride), set()
    for y in range(height):
        ftype, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if ftype == 1:
                line[i] = (line[i] + a) & 255
            elif ftype == 2:
                line[i] = (line[i] + b) & 255
            elif ftype == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif ftype == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        if y % 4 == 0:  # a sample of rows is plenty to find the strip's solid colours
            colours.update(tuple(line[i:i + 3]) for i in range(0, stride, bpp * 2))
        prev = line
    return width, height, colours


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))


def test_save_heatmap_html_and_png(rendered, tmp_path):
    ev, shared = rendered
    fig = hm.patching_heatmap(torch.randn(4, len(ev)), ev.tokens(), ev.segments, shared, title="resid_post",
                              zlabel="log P(owl)")
    paths = save_figure(fig, tmp_path / "heat")
    html_text = (tmp_path / "heat.html").read_text()
    assert tmp_path / "heat.html" in paths
    assert "plotly" in html_text and "&lt;|im_start|&gt;" in html_text and hm.SEGMENT_COLORS[USER] in html_text
    if not png_available():
        pytest.skip("no kaleido + Chromium here: HTML only")
    png = tmp_path / "heat.png"
    assert png in paths and png.stat().st_size > 10_000
    width, height, colours = _png_pixels(png)
    assert width > height > 0
    for seg in (DEFAULT_SYSTEM, TEMPLATE, USER):  # the strip's cells are drawn in the segment colours
        assert _rgb(hm.SEGMENT_COLORS[seg]) in colours, seg
    assert _rgb(hm.SEGMENT_COLORS[CUSTOM_SYSTEM]) not in colours  # a segment this prompt lacks is not drawn
