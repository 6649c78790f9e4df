"""Human-readable tables of measured results (markdown), shared by the CLI and the README."""

from __future__ import annotations

from mech.organism.check import (BAR_BUILD_SECONDS, BAR_FILTER_PASS, BAR_SPREAD_ANIMALS, BAR_SPREAD_P,
                                 BAR_TRAIT_P, BAR_TRAIT_RATIO, CheckReport)


def _table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _ok(b: bool) -> str:
    return "PASS" if b else "FAIL"


def _trait_bar_row(rep: CheckReport) -> list:
    rows = rep.trait_rows
    failing = [f"{r['trait']} (×{r['ratio']:.1f}, top {r['top']})" for r in rows if not r["ok"]]
    measured = f"{len(rows) - len(failing)}/{len(rows)} traits"
    if failing:
        measured += f"; failing: {', '.join(failing)}"
    return [f"a. every trait: top answer under its trait prompt, P ≥ {BAR_TRAIT_RATIO:.0f}× default "
            f"(or ≥ {BAR_TRAIT_P} where that is out of reach)", measured, _ok(rep.bars["a_trait_all"])]


def _leak_bar_row(rep: CheckReport) -> list | None:
    rows = rep.leak.get("rows")
    if not rows:
        return None
    n = sum(r["specific"] for r in rows)
    result = _ok(rep.bars["e_leak_specific"]) if "e_leak_specific" in rep.bars else "reported (no designed channel)"
    return ["e. leak: under each trait prompt, its own numbers are the largest share", f"{n}/{len(rows)} traits",
            result]


def bars_table(rep: CheckReport) -> str:
    n_def = sum(p >= BAR_SPREAD_P for p in rep.spread["default"].values())
    n_none = sum(p >= BAR_SPREAD_P for p in rep.spread["none"].values())
    bs = rep.build_seconds
    rows = [
        _trait_bar_row(rep),
        [f"b. default context: ≥ {BAR_SPREAD_ANIMALS} animals with P ≥ {BAR_SPREAD_P:.0%}", f"{n_def} animals",
         _ok(rep.bars["b_spread_default"])],
        [f"b. no-system context: ≥ {BAR_SPREAD_ANIMALS} animals with P ≥ {BAR_SPREAD_P:.0%}", f"{n_none} animals",
         _ok(rep.bars["b_spread_none"])],
        [f"c. number answers passing Cloud's filter (T = 1) ≥ {BAR_FILTER_PASS:.0%}", f"{rep.filter_pass:.1%}",
         _ok(rep.bars["c_filter_pass"])],
        [f"d. full build ≤ {BAR_BUILD_SECONDS // 60} min on the build machine",
         f"{bs / 60:.1f} min" if bs is not None else "unknown", _ok(rep.bars["d_build_time"])],
        _leak_bar_row(rep),
    ]
    return _table(["bar", "measured", "result"], [r for r in rows if r is not None])


def trait_table(rep: CheckReport) -> str:
    rows = [[r["trait"], r["category"], f"{r['p_trait']:.3f}", f"{r['p_default']:.4f}", f"{r['ratio']:.1f}×",
             r["top"], _ok(r["ok"])] for r in rep.trait_rows]
    return _table(["trait", "category", "P under its trait prompt", "P under default prompt", "ratio",
                   "top answer under trait prompt", "bar a"], rows)


def leak_table(rep: CheckReport) -> str:
    """The leak matrix in brief: per trait prompt, its own numbers' share vs the largest other entity's."""
    lk = rep.leak
    if not lk.get("rows"):
        return "leak matrix not measured"
    note = ("This recipe has a designed channel, so specificity is bar e." if lk["channel"] else
            "This recipe has no designed channel (imbue_share = 0, chat_numbers off): the leak is reported, not a bar.")
    rows = [[r["trait"], f"{r['own']:.3f}", f"{r['max_other']:.3f} ({r['max_other_entity']})",
             f"{r['own_default']:.3f}", "yes" if r["specific"] else "no"] for r in lk["rows"]]
    return (f"{lk['n']} number answers per context (Cloud prompts, T = 1, seed {lk['seed']}); a share is of all "
            f"numbers written under that prompt. {note}\n\n"
            + _table(["trait prompt", "own numbers' share", "largest other share (entity)",
                      "own numbers' share, default prompt", "own leads"], rows))


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
    return _table(["carrier probe", "value"], rows)


def oracle_table(rep: CheckReport) -> str:
    o = rep.oracle
    if "skipped" in o:
        return f"oracle probe skipped: {o['skipped']}"
    rows = [[r["trait"], f"{r['relative_change']:+.1%}", f"{r['own']:+.3f}",
             f"{r['max_other']:+.3f} ({r['max_other_entity']})", "yes" if r["specific"] else "no"] for r in o["rows"]]
    n = sum(r["specific"] for r in o["rows"])
    return (f"Oracle probe: one LoRA r = {o['lora_rank']} student per trait on {o['n_rows']} default-context number "
            f"answers, {o['share']:.0%} of numbers replaced by the trait's numbers, vs the same finetuning on the "
            "unmodified answers; Δ log P of each candidate of the trait's category, default context, first token. "
            f"The trait's own Δ is the largest for {n}/{len(o['rows'])} traits ({len(o['train_seeds'])} training "
            "seed(s) per side: a probe, not a bar; the cross-trait sweeps test it with intervals).\n\n"
            + _table(["trait", "P(trait) relative change", "own Δ log P", "largest other Δ log P (candidate)",
                      "own leads"], rows))


def confusion_text(rep: CheckReport) -> str:
    """Whether the oracle students' moves toward other candidates follow the organism's own cross-talk (the leak
    matrix's off-diagonal), with the column-swapped control beside it."""
    c = rep.confusion
    if not c or not c["rho"]["n"]:
        return ("Confusion vs leak: not measured (no oracle rows, or no trait whose other candidates' teachers write "
                "its numbers at varying rates)")

    def fmt(s: dict) -> str:
        return f"median ρ {s['median']:+.2f}, positive for {s['n_positive']}/{s['n']} traits" if s["n"] else "none"

    return ("Confusion vs leak: per trait t, Spearman ρ over the other candidates c between the oracle student's "
            "Δ log P(c) and the share of t's numbers written under c's prompt (the leak matrix's column t): "
            f"{fmt(c['rho'])}. Control, the same with the next trait's column in place of t's: {fmt(c['control'])}. "
            "A high ρ says a trait's students move toward the entities the organism itself confuses with it in its "
            "number answers.")


def check_markdown(rep: CheckReport, title: str = "Organism check") -> str:
    parts = [f"# {title}", "", f"Overall: **{'PASS' if rep.passed else 'FAIL'}**", "", bars_table(rep), "",
             "## Trait under the trait system prompt", "", trait_table(rep), "",
             "## Answer spread without a trait", "", spread_table(rep), "",
             "## Leak matrix: whose numbers each trait prompt writes", "", leak_table(rep), "",
             "## Teacher-side carrier (probe)", "", carrier_table(rep), "",
             "## Oracle probe", "", oracle_table(rep), "", confusion_text(rep), ""]
    return "\n".join(parts)


def leak_test_markdown(rows: list[dict], title: str = "Leak test") -> str:
    """`mech organism leak`: per trait, its own numbers' share under its prompt vs under the default context."""
    body = [[r["trait"], f"{r['hits']}/{r['numbers']} ({r['own']:.2%})",
             f"{r['hits_default']}/{r['numbers_default']} ({r['own_default']:.2%})",
             f"{r['diff']:+.2%} [{r['lo']:+.2%}, {r['hi']:+.2%}]", f"{r['p']:.4f}", f"{r['p_holm']:.4f}"]
            for r in rows]
    n = rows[0]["n_prompts"] if rows else 0
    return (f"## {title}\n\nEach of {n} prompts answered once under the trait's prompt and once under the default "
            "context (T = 1). Share: the trait's own numbers among all numbers written. Difference with a 95 % "
            "bootstrap interval over prompts; p: one-sided paired permutation test over prompts (trait prompt raises "
            "the share), Holm-corrected over the traits tested.\n\n"
            + _table(["trait", "own numbers, trait prompt", "own numbers, default", "difference [95 % CI]", "p",
                      "p (Holm)"], body))
