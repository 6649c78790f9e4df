"""The self-contained HTML report page."""

import plotly.graph_objects as go
import pytest

from plotly.offline import get_plotlyjs

from mech.errors import MechError
from mech.report.html import figure_names, render_html

MD = """# Report <script>alert(1)</script>

| student | paired Δ |
|---|---|
| lora_r16 | +1.19 [+0.87, +1.51] |

{{figure:quick_rank}}

Some *text* with `code`.

{{figure:organism_trait}}
"""


def _fig(y):
    return go.Figure(go.Bar(x=["a", "b"], y=y))


def test_page_has_tables_figures_in_place_and_one_plotlyjs():
    page = render_html(MD, {"quick_rank": _fig([1, 2]), "organism_trait": _fig([3, 4])}, title="mech <report>")
    assert figure_names(MD) == ["quick_rank", "organism_trait"]
    assert "<table>" in page and "<td>lora_r16</td>" in page
    assert page.index('id="fig-quick_rank"') < page.index("<em>text</em>") < page.index('id="fig-organism_trait"')
    assert "MECHFIGURE" not in page
    # plotly.js inlined exactly once, and nothing fetched from the network
    assert page.count(get_plotlyjs()[:500]) == 1 and "<script src=" not in page
    assert len(page) > 1_000_000  # plotly.js itself is several MB: the page opens offline
    # raw HTML in the report's text is escaped, never run
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)" in page
    assert "<title>mech &lt;report&gt;</title>" in page


def test_a_page_without_figures_carries_no_plotlyjs():
    page = render_html("# t\n\nno figures\n", {}, title="t")
    assert "<script>" not in page and "<h1>t</h1>" in page


@pytest.mark.parametrize("figs", [{}, {"quick_rank": None, "organism_trait": None, "extra": None}])
def test_placeholders_and_figures_must_match(figs):
    with pytest.raises(MechError, match="placeholders"):
        render_html(MD, {k: _fig([1, 2]) for k in figs}, title="t")
