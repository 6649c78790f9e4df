"""LoRA ranks as a fraction of each projection's width: the widths come from the model's own projections, and a
rank at or beyond a width is full rank there (the organism's 64-wide key/value projections at rank 64)."""

from __future__ import annotations

import dataclasses

from mech.models import load_model
from mech.models.surgery import projection_widths
from mech.report.sweep import rank_width_markdown
from mech.sweep import load_sweep
from mech.sweep.runner import rank_width_rows


def test_widths_of_a_tiny_gqa_model(make_tiny_lm):
    model = make_tiny_lm("qwen2", seed=0)
    c = model.config
    kv = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    want = {"q": c.hidden_size, "k": min(c.hidden_size, kv), "v": min(c.hidden_size, kv), "o": c.hidden_size,
            "gate": min(c.hidden_size, c.intermediate_size), "up": min(c.hidden_size, c.intermediate_size),
            "down": min(c.hidden_size, c.intermediate_size)}
    assert projection_widths(model) == want


def test_rank_fractions_on_the_organism_quick_sweep():
    model = load_model("organism").model
    cfg = load_sweep("experiments/quick.yaml")
    rows = rank_width_rows(cfg, model)
    by = {(r["rank"], r["kind"]): r for r in rows}
    assert sorted({r["rank"] for r in rows}) == [1, 4, 16, 64]  # full finetuning has no rank row
    assert by[(64, "k")]["width"] == 64 and by[(64, "k")]["fraction"] == 1.0  # full rank on the key projection
    assert by[(16, "q")]["fraction"] == 16 / 128 and by[(1, "down")]["fraction"] == 1 / 128
    md = rank_width_markdown(rows)
    assert "| rank | q (128) | k (64) |" in md and "| 64 | 0.5 | 1 | 1 |" in md
    wide = dataclasses.replace(cfg, students=tuple(s for s in cfg.students if s.method == "full"))
    assert rank_width_rows(wide, model) == []
