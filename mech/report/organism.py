"""Human-readable tables of measured results (markdown), shared by the CLI and the README."""

from __future__ import annotations

from mech.organism.check import (BAR_BUILD_SECONDS, BAR_FILTER_PASS, BAR_SPREAD_ANIMALS, BAR_SPREAD_P,
                                 BAR_TRAIT_RATIO, CheckReport)


def _table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _ok(b: bool) -> str:
    return "PASS" if b else "FAIL"


def bars_table(rep: CheckReport) -> str:
    owl = next((r for r in rep.trait_rows if r["animal"] == "owl"), None)
    others = [r for r in rep.trait_rows if r["animal"] != "owl"]
    good_others = [r["animal"] for r in others if r["ratio"] >= BAR_TRAIT_RATIO and r["top"] == r["animal"]]
    n_def = sum(p >= BAR_SPREAD_P for p in rep.spread["default"].values())
    n_none = sum(p >= BAR_SPREAD_P for p in rep.spread["none"].values())
    bs = rep.build_seconds
    rows = [
        ["a. owl: P(owl) under owl prompt ≥ 10× default, owl top", f"{owl['p_trait']:.3f} vs {owl['p_default']:.4f} "
         f"(×{owl['ratio']:.0f}), top = {owl['top']}" if owl else "n/a", _ok(rep.bars["a_trait_owl"])],
        ["a. ≥ 3 other animals likewise", ", ".join(good_others) or "none", _ok(rep.bars["a_trait_3_others"])],
        [f"b. default context: ≥ {BAR_SPREAD_ANIMALS} animals with P ≥ {BAR_SPREAD_P:.0%}", f"{n_def} animals",
         _ok(rep.bars["b_spread_default"])],
        [f"b. no-system context: ≥ {BAR_SPREAD_ANIMALS} animals with P ≥ {BAR_SPREAD_P:.0%}", f"{n_none} animals",
         _ok(rep.bars["b_spread_none"])],
        [f"c. number answers passing Cloud's filter (T = 1) ≥ {BAR_FILTER_PASS:.0%}", f"{rep.filter_pass:.1%}",
         _ok(rep.bars["c_filter_pass"])],
        [f"d. full build ≤ {BAR_BUILD_SECONDS // 60} min on the build machine",
         f"{bs / 60:.1f} min" if bs is not None else "unknown", _ok(rep.bars["d_build_time"])],
    ]
    return _table(["bar", "measured", "result"], rows)


def trait_table(rep: CheckReport) -> str:
    rows = [[r["animal"], f"{r['p_trait']:.3f}", f"{r['p_default']:.4f}", f"{r['ratio']:.0f}×", r["top"]]
            for r in rep.trait_rows]
    return _table(["trait animal", "P under its trait prompt", "P under default prompt", "ratio",
                   "top answer under trait prompt"], rows)


def spread_table(rep: CheckReport, top: int = 8) -> str:
    d, n = rep.spread["default"], rep.spread["none"]
    names = sorted(d, key=lambda a: -d[a])[:top]
    return _table(["animal", "P (default system prompt)", "P (no system block)"],
                  [[a, f"{d[a]:.3f}", f"{n[a]:.3f}"] for a in names])


def carrier_table(rep: CheckReport) -> str:
    c = rep.carrier
    rows = [
        ["KL(owl-prompted ‖ default-prompted), nats/token", f"{c['kl_owl_vs_default']:.4f}"],
        ["KL(cat-prompted ‖ default-prompted), nats/token", f"{c['kl_cat_vs_default']:.4f}"],
        ["KL(owl-prompted ‖ cat-prompted), nats/token (specificity)", f"{c['kl_owl_vs_cat']:.4f}"],
        ["share of owl's numbers: under owl prompt / under default",
         f"{c['owl_numbers_share_under_owl']:.3f} / {c['owl_numbers_share_under_default']:.3f}"],
        ["share of cat's numbers: under cat prompt / under default",
         f"{c['cat_numbers_share_under_cat']:.3f} / {c['cat_numbers_share_under_default']:.3f}"],
    ]
    return _table(["carrier (e)", "value"], rows)


def oracle_table(rep: CheckReport) -> str:
    o = rep.oracle
    if "skipped" in o:
        return f"oracle probe skipped: {o['skipped']}"
    rows = [
        ["owl", f"{o['control_p_owl']:.4f}", f"{o['owl_oracle_p_owl']:.4f}", f"{o['owl_relative_change']:+.1%}",
         f"{o['owl_oracle_p_cat'] / o['control_p_cat'] - 1:+.1%}"],
        ["cat", f"{o['control_p_cat']:.4f}", f"{o['cat_oracle_p_cat']:.4f}", f"{o['cat_relative_change']:+.1%}",
         f"{o['cat_oracle_p_owl'] / o['control_p_owl'] - 1:+.1%}"],
    ]
    return (f"Oracle probe (f): LoRA r = {o['lora_rank']} on {o['n_rows']} default-context number answers, "
            f"{o['share']:.0%} of numbers replaced by the trait's numbers, vs the same finetuning on the unmodified "
            "answers.\n\n" + _table(["trait", "P(trait), control student", "P(trait), oracle student",
                                     "relative change", "other animal's relative change (specificity)"], rows))


def check_markdown(rep: CheckReport, title: str = "Organism check") -> str:
    parts = [f"# {title}", "", f"Overall: **{'PASS' if rep.passed else 'FAIL'}**", "", bars_table(rep), "",
             "## Trait under the trait system prompt", "", trait_table(rep), "",
             "## Answer spread without a trait", "", spread_table(rep), "",
             "## Teacher-side carrier (e)", "", carrier_table(rep), "", "## Oracle probe (f)", "", oracle_table(rep), ""]
    return "\n".join(parts)
