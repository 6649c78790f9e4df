"""One self-contained HTML page from a Markdown report and its plotly figures.

The page opens offline and can be mailed as one file: CSS and plotly.js are inlined (plotly.js once, however many
figures), and a figure appears where the Markdown holds a line ``{{figure:NAME}}``. Markdown is rendered by
markdown-it with raw HTML disabled, so text from a report (model names, prompts) is escaped, never interpreted.
"""

from __future__ import annotations

import html
import re
from typing import Mapping

import plotly.graph_objects as go
from markdown_it import MarkdownIt
from plotly.offline import get_plotlyjs

from mech.errors import MechError

_FIGURE_LINE = re.compile(r"^\{\{figure:([A-Za-z0-9_.\-]+)\}\}$", re.M)
_PLACEHOLDER = "MECHFIGURE{}MECHFIGURE"

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #1a1a1a; line-height: 1.45; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
tr:nth-child(even) td { background: #fafafa; }
code { background: #f4f4f4; padding: 0 0.2em; }
.figure { margin: 1.5em 0; }
"""


def _markdown() -> MarkdownIt:
    # "js-default" is CommonMark plus tables and strikethrough; html=False escapes any raw HTML in the text.
    return MarkdownIt("js-default", {"html": False})


def figure_names(markdown: str) -> list[str]:
    """The figures a Markdown text places, in order."""
    return _FIGURE_LINE.findall(markdown)


def render_html(markdown: str, figures: Mapping[str, go.Figure], title: str) -> str:
    """The page: ``markdown`` rendered, each ``{{figure:NAME}}`` line replaced by ``figures[NAME]``.

    A placed name without a figure, or a figure never placed, is an error: a report silently missing a figure (or
    carrying an orphan) is worse than none.
    """
    placed = figure_names(markdown)
    missing = [n for n in placed if n not in figures]
    unplaced = [n for n in figures if n not in placed]
    if missing or unplaced:
        raise MechError(f"report figures do not match their placeholders (placed without a figure: {missing}; "
                        f"given but never placed: {unplaced}): add a '{{{{figure:NAME}}}}' line per figure")
    body = _markdown().render(_FIGURE_LINE.sub(lambda m: "\n" + _PLACEHOLDER.format(m.group(1)) + "\n", markdown))
    for name in placed:
        div = figures[name].to_html(full_html=False, include_plotlyjs=False, div_id=f"fig-{name}")
        body = body.replace(f"<p>{_PLACEHOLDER.format(name)}</p>", f'<div class="figure">{div}</div>', 1)
    script = f"<script>{get_plotlyjs()}</script>" if placed else ""
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            f"<style>{_CSS}</style>\n{script}\n</head>\n<body>\n{body}</body>\n</html>\n")
