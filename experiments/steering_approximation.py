"""How well a steering vector stands in for each trait prompt, and whether that predicts transfer (issue 9 item 6).

Blank et al. 2026 report that trait prompts a steering vector approximates poorly are not subliminally learned.
For every trait of an organism build: the prompt teacher (the base under the trait prompt) answers ``--n``
number prompts (sampled, seeded); on its kept answers, v[ℓ] = the prompt's mean residual shift after layer ℓ
(mech.geometry.steering.teacher_vectors) and, per layer and α, the mean per-token KL(prompt teacher ‖ base in the
default context with α·v[ℓ] added) over the answer tokens (steering.prompt_approximation). A trait's
*approximation* is 1 − min KL / KL(α = 0): the share of the prompt's divergence on its own number answers that the
best single-layer steering vector removes (the same search over layers and α for every trait).

With ``--effects`` (cross_trait_specificity.csv of sweeps with ``eval.cross_trait``, e.g. `mech sweep
experiments/cross_trait_animals.yaml`), the declared test: Spearman ρ between approximation and each trait's own
paired Δ log P at the student (mean over replicates), one-sided (ρ > 0), α 0.05.

    python experiments/steering_approximation.py --model organism --effects RUN/cross_trait_specificity.csv \
        RUN2/cross_trait_specificity.csv --json out.json
"""

from __future__ import annotations

import argparse
import csv

from mech.errors import MechError, run_script


def approximation(curves: dict[int, list[dict]]) -> dict:
    """The best (layer, α) of per-layer KL curves (each with α = 0 first) and the share of KL(α = 0) it removes."""
    kl0 = next(r["kl"] for r in next(iter(curves.values())) if r["alpha"] == 0)
    layer, best = min(((l, r) for l, rows in curves.items() for r in rows), key=lambda x: x[1]["kl"])
    return {"kl_unsteered": kl0, "kl_best": best["kl"], "best_layer": layer, "best_alpha": best["alpha"],
            "approximation": 1 - best["kl"] / kl0 if kl0 > 0 else float("nan")}


def own_effects(paths: list[str]) -> dict[str, float]:
    """Each teacher's own paired Δ (``own_mean``: the mean over its replicates) from cross_trait_specificity.csv
    files (one student recipe each)."""
    out: dict[str, float] = {}
    for p in paths:
        with open(p) as f:
            rows = list(csv.DictReader(f))
        if not rows or "own_mean" not in rows[0] or len({r["student"] for r in rows}) != 1:
            raise MechError(f"{p} is not a cross_trait_specificity.csv of one student recipe (own_mean per teacher): "
                            "pass the file a cross-trait sweep writes")
        out |= {r["teacher"]: float(r["own_mean"]) for r in rows}
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="organism", help="an organism build: organism, organism-free or a directory")
    p.add_argument("--traits", nargs="+", help="default: every animal and tree of the recipe")
    p.add_argument("--n", type=int, default=64, help="number prompts the prompt teacher answers")
    p.add_argument("--seed", type=int, default=30011)
    p.add_argument("--alphas", nargs="+", type=float, default=[0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 4.0])
    p.add_argument("--effects", nargs="+", help="cross_trait_specificity.csv files to correlate with")
    p.add_argument("--json", help="write the rows and the test here")
    a = p.parse_args(argv)

    import json

    from scipy.stats import spearmanr

    from mech.evaluation.inference import pad_id
    from mech.geometry import steering
    from mech.models import load_model
    from mech.organism import read_meta
    from mech.organism.check import check_trait_list, recorded_corpus, sample_numbers
    from mech.organism.leak import trait_context
    from mech.teacher.filter import check_answer

    if 0.0 not in a.alphas:
        raise MechError("--alphas must include 0 (the unsteered divergence the approximation is relative to)")
    own = own_effects(a.effects) if a.effects else None  # read before minutes of work, not after
    loaded = load_model(a.model)
    if loaded.path is None:
        raise MechError(f"{a.model} is not a local organism build: pass organism, organism-free or a build directory")
    corpus = recorded_corpus(read_meta(loaded.path)["config"]["corpus"])
    traits = ([(t, "animal" if t in corpus.animals else "tree") for t in a.traits] if a.traits
              else check_trait_list(corpus, None, None))
    model, tok = loaded.model, loaded.tokenizer
    pad, alphas = pad_id(tok), sorted(set(a.alphas))
    rows_out = []
    for name, category in traits:
        ctx = trait_context(name, category)
        prompts, _, answers = sample_numbers(model, tok, ctx, a.n, a.seed)
        rows = [(q.text, ans) for q, ans in zip(prompts, answers) if check_answer(ans, 10, 999, frozenset()).ok]
        if not rows:
            raise MechError(f"the {name} prompt teacher kept none of {a.n} answers: raise --n")
        v = steering.teacher_vectors(model, tok, rows, ctx.spec, "default", pad)
        curves = {layer: steering.prompt_approximation(model, tok, rows, ctx.spec, "default", layer, v[layer], alphas,
                                                       pad) for layer in range(v.shape[0])}
        row = {"trait": name, "category": category, "rows": len(rows)} | approximation(curves)
        rows_out.append(row)
        print(f"{name:10s} kept {len(rows):3d}  KL unsteered {row['kl_unsteered']:.4f}  best {row['kl_best']:.4f} "
              f"(layer {row['best_layer']}, α {row['best_alpha']:g})  approximation {row['approximation']:.3f}",
              flush=True)
    result: dict = {"model": a.model, "n": a.n, "seed": a.seed, "alphas": alphas, "rows": rows_out}
    if own is not None:
        both = [r for r in rows_out if r["trait"] in own]
        x, y = [r["approximation"] for r in both], [own[r["trait"]] for r in both]
        test = spearmanr(x, y, alternative="greater")
        result["test"] = {"traits": len(both), "spearman_rho": float(test.statistic), "p_one_sided": float(test.pvalue)}
        for r in both:
            r["own_effect"] = own[r["trait"]]
        print(f"Spearman ρ(approximation, own paired Δ log P) over {len(both)} traits: {test.statistic:+.3f}, "
              f"one-sided p {test.pvalue:.3f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    run_script(main)
