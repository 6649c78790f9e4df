"""The `mech` command line: parse, call the library, print. No logic the Python API lacks."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import signal
import sys
import threading
from pathlib import Path

from mech.errors import MechError
from mech.paths import SHIPPED_WEIGHTS

EXIT_BAR_FAILED = 1
# `mech organism leak`'s default seed: not the check's leak-matrix seed (mech.organism.check.CHECK_SEED + 3), so
# the test's sample is fresh (tests/test_organism.py checks they differ)
LEAK_TEST_SEED = 20_011


def _bar(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True, mininterval=1.0)


def _stage_bar(desc: str):
    """One bar re-used across stages: a stage reports (description, done, total); a new description resets it."""
    bar = _bar(0, desc)

    def stage(name: str, done: int, total: int) -> None:
        if bar.desc != name[:60]:
            bar.reset(total=total or None)
            bar.set_description_str(name[:60])
        if total:
            bar.update(done - bar.n)

    return bar, stage


def _stage_progress(stages: tuple[str, ...], desc: str):
    bar = _bar(len(stages), desc)

    def tell(stage: str) -> None:
        if bar.n or stage != stages[0]:
            bar.update(1)
        bar.set_postfix_str(stage)

    return bar, tell


def _check_out(out: str | os.PathLike, flag: str, new: bool = False, file: bool = False) -> None:
    """Refuse an output path that cannot be written before any work is done, not after minutes of it: a
    file where a directory goes (or, ``file``, the reverse), a path under a file, an unwritable folder, or
    (``new``) anything that already exists."""
    p = Path(out)
    if p.exists() and p.is_dir() == file:
        raise MechError(f"{flag} {out} is a {'directory' if file else 'file'}: pass a "
                        f"{'file' if file else 'directory'} path")
    if new and p.exists():
        raise MechError(f"{flag} {out} already exists: delete it or choose another {flag}")
    existing = next((q for q in (p.parent if file else p, *p.parents) if q.exists()), Path("."))
    if not existing.is_dir():
        raise MechError(f"{flag} {out} lies under {existing}, which is a file: choose another {flag}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise MechError(f"{flag} {out} is not writable (no write permission on {existing}): choose another {flag}")


def _load_config(path: str | None, recipe_name: str = "organism"):
    """The named recipe, with the YAML overrides at ``path`` (if any) applied on top of it."""
    from mech.organism.config import OrganismConfig, recipe

    base = recipe(recipe_name)
    if path is None:
        return base
    from mech.config import load_dataclass_yaml

    return load_dataclass_yaml(OrganismConfig, path, base=base)


def cmd_organism_build(a) -> int:
    from mech import organism

    cfg = _load_config(a.config, a.recipe)
    if a.seed is not None:
        import dataclasses

        cfg = dataclasses.replace(cfg, seed=a.seed)
    out = organism.shipped_dir(a.recipe) if a.ship else a.out
    if out is not None:
        organism.check_build_out(Path(out))  # before the bar, so a refusal stays the one stderr line
    bar = _bar(cfg.train.steps, f"{a.recipe} {cfg.hash} pretraining")

    def progress(step, total, metrics):
        bar.update(step - bar.n)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", refresh=False)

    try:
        path = organism.build_cached(cfg, out, force=a.force or a.ship, progress=progress)
    finally:
        bar.close()
    meta = organism.read_meta(path)
    print(f"{a.recipe} {meta['config_hash']} at {path} ({meta['n_parameters']:,} parameters, "
          f"built in {meta['build_seconds'] / 60:.1f} min, weights sha256 {meta['weights_sha256']})")
    if not a.ship:
        print(shipped_comparison(a.recipe, meta))
    return 0


def shipped_comparison(recipe: str, meta: dict) -> str:
    """One line: whether a build has the bytes of the shipped build of the same recipe."""
    from mech import organism

    try:
        shipped = organism.read_meta(organism.shipped_dir(recipe))
    except (MechError, OSError, ValueError):
        return f"no shipped {recipe} build to compare with"
    if shipped.get("config_hash") != meta["config_hash"]:
        return f"the shipped {recipe} is another recipe ({shipped.get('config_hash')}): bytes not compared"
    if shipped.get("weights_sha256") == meta["weights_sha256"]:
        return f"same bytes as the shipped {recipe}"
    where = ", ".join(f"{k} {' '.join(v) if isinstance(v := shipped[k], list) else v}"
                      for k in ("torch_version", "cpu_capability", "machine", "cpu_model", "cpu_flags") if k in shipped)
    where = where or "no record of its machine"
    return (f"other bytes than the shipped {recipe} (sha256 {shipped.get('weights_sha256')}, built with {where}): "
            "same recipe, another environment or code (README, The organisms)")


def _check(a):
    from mech import organism
    from mech.organism.check import STAGES

    bar, tell = _stage_progress(STAGES, "organism check")
    rep = organism.check_organism(a.model, progress=tell, n_samples=a.n_samples, oracle_rows=a.oracle_rows,
                                  n_leak=a.n_leak)
    bar.update(bar.total - bar.n)
    bar.close()
    return rep


def cmd_organism_check(a) -> int:
    from mech.report.organism import check_markdown
    from mech.store import atomic_write_json

    rep = _check(a)
    print(check_markdown(rep, title=f"Organism check: {a.model}"))
    if a.json:
        atomic_write_json(a.json, rep.to_dict())
    return 0 if rep.passed else EXIT_BAR_FAILED


def cmd_organism_leak(a) -> int:
    from mech.models import load_model
    from mech.organism import read_meta
    from mech.organism.check import build_numbers, check_trait_list, recorded_corpus
    from mech.organism.leak import leak_test
    from mech.report.organism import leak_test_markdown
    from mech.store import atomic_write_json

    if a.n < 2 or a.resamples < 1:
        raise MechError(f"--n must be >= 2 and --resamples >= 1 (got {a.n}, {a.resamples}): pass e.g. --n 1000")
    if a.json:
        _check_out(a.json, "--json")
    loaded = load_model(a.model)
    if loaded.path is None:
        raise MechError(f"{a.model} is not a local organism build: pass organism, organism-free or a build directory")
    meta = read_meta(loaded.path)
    corpus = recorded_corpus(meta["config"]["corpus"])
    if a.traits:
        unknown = [t for t in a.traits if t not in corpus.animals and t not in corpus.trees]
        if unknown:
            raise MechError(f"--traits {' '.join(unknown)}: not a trait of this organism; choose among "
                            f"{', '.join([*corpus.animals, *corpus.trees])}")
        traits = [(t, "animal" if t in corpus.animals else "tree") for t in a.traits]
    else:
        traits = check_trait_list(corpus, None, None)
    numbers = build_numbers(meta)
    rows = leak_test(loaded.model, loaded.tokenizer, traits, numbers, a.n, a.seed, n_resamples=a.resamples)
    print(leak_test_markdown(rows, title=f"Leak test: {a.model} ({a.n} prompts, seed {a.seed})"))
    if a.json:
        atomic_write_json(a.json, {"model": a.model, "n": a.n, "seed": a.seed, "resamples": a.resamples,
                                   "weights_sha256": meta.get("weights_sha256"), "rows": rows})
    return 0


def cmd_organism_info(a) -> int:
    from mech import organism

    print(json.dumps(organism.organism_info(a.model), indent=1, sort_keys=True))
    return 0


# what `mech reproduce --scale` runs (the first sweep's students are localised)
SCALES = {
    "quick": ("experiments/quick.yaml",),
    "full": ("experiments/quick.yaml", "experiments/context_grid.yaml", "experiments/context_grid4.yaml",
             "experiments/full_ft_controls.yaml",
             "experiments/full_ft_matched_loss.yaml", "experiments/lr_grid.yaml", "experiments/rank_sweep.yaml",
             "experiments/controls.yaml"),
    # The paper's sizes on a real model (GPU only). The rank sweep comes first: it is the paper's central claim
    # (C1) and has the paper's own student (LoRA r8 α8), which is what gets localised; it is LoRA only, so the
    # localisation does not wait on full finetuning, which comes last as the costliest in memory (README).
    "paper": ("experiments/paper/rank_sweep.yaml", "experiments/paper/context_grid.yaml",
              "experiments/paper/full_ft.yaml"),
}
# mech reproduce without --model / --students; --scale paper: its YAMLs' base_model and the paper's LoRA r8 α8
DEFAULT_MODELS = ("organism", "organism-free")
DEFAULT_STUDENTS = ("lora_r16", "full")
PAPER_STUDENTS = ("lora_r8",)


def cmd_figures(a) -> int:
    from mech.report.figures import collect_figures

    _check_out(a.out, "--out")
    got = collect_figures(a.report, a.out)
    print(f"{len(got)} figures from {a.report} in {a.out}: " + ", ".join(p.name for p in got))
    return 0


def cmd_reproduce(a) -> int:
    """The main job on each model: the organism check (organism builds), the sweeps, and the localisation battery
    on the first sweep's students; one report (report.md and report.html) that opens with the paper's claims ×
    the models."""
    from mech.report.reproduce import summary_line, write_reproduce
    from mech.reproduce import load_sweeps, run_reproduce
    from mech.sweep.runner import student_cells

    if Path(a.out).exists() and not Path(a.out).is_dir():  # before minutes of work, not after
        raise MechError(f"--out {a.out} is a file: pass a directory for the report")
    if a.null_sets < 0:
        raise MechError(f"--null-sets must be >= 0, got {a.null_sets}: pass e.g. 39, or 0 to skip the null")
    if a.model and len(set(a.model)) != len(a.model):
        raise MechError(f"--model lists a model twice ({' '.join(a.model)}): list each once")
    paper = not a.sweep and a.scale == "paper"
    a.sweep = a.sweep or list(SCALES[a.scale])
    first, *_ = load_sweeps(a.sweep)  # every input checked before the first model loads
    a.model = a.model or ([first.base_model] if paper else list(DEFAULT_MODELS))
    a.students = a.students or list(PAPER_STUDENTS if paper else DEFAULT_STUDENTS)
    student_cells(first, a.students, a.sweep[0])  # a student the first sweep lacks fails now, not after the sweep
    from mech.interventions.battery import LocaliseConfig

    LocaliseConfig(category=first.eval.category, n_questions=a.n_questions,  # bad values fail before any model
                   sampled=a.sampled, sampled_positions=tuple(a.sampled_positions))
    for model in a.model:
        _with_model(first, model)  # a bad spec, or a hub id not downloaded, fails here, not after the first run
    reps = []
    for model in a.model:
        if a.rebuild:
            from mech.organism.config import RECIPES

            # a shipped spec rebuilds its own recipe; any other model rebuilds the default organism, as before
            recipe_name = model if model in RECIPES else "organism"
            cmd_organism_build(argparse.Namespace(config=None, seed=None, out=None, ship=True, force=False,
                                                  recipe=recipe_name))
        bar, stage = _stage_bar(f"reproduce {model}")
        try:  # close the bar before main() prints an error, so the error stays the last stderr line
            reps.append(run_reproduce(model, a.sweep[0], a.students, cache=a.cache, n_samples=a.n_samples,
                                      oracle_rows=a.oracle_rows, more_sweeps=a.sweep[1:], null_sets=a.null_sets,
                                      n_questions=a.n_questions, stage=stage, sampled=a.sampled,
                                      sampled_positions=tuple(a.sampled_positions),
                                      check_progress=lambda s: stage(f"organism check: {s}", 0, 0)))
        finally:
            bar.close()
    md = write_reproduce(reps, a.out)
    print(md)
    print(summary_line(reps))
    print(f"report: {Path(a.out) / 'report.md'} and {Path(a.out) / 'report.html'}")
    return 0 if all(r.check is None or r.check.passed for r in reps) else EXIT_BAR_FAILED


def _with_model(cfg, model: str | None):
    """The sweep with ``--model`` in place of its YAML's base_model; the spec is checked before anything loads, and a
    hub id (either one) must be downloaded while the hub is offline (mech.models.check_hub_cached)."""
    import dataclasses

    from mech.models import check_hub_cached, resolve_spec

    if model is None:
        try:
            resolve_spec(cfg.base_model)
        except MechError:
            return cfg  # any other fault in the YAML's base_model is the model load's to report, as before
        check_hub_cached(cfg.base_model)  # a no-op for anything but a hub id
        return cfg
    check_hub_cached(model)  # resolves the spec first: a bad one fails with resolve_spec's message
    return dataclasses.replace(cfg, base_model=model)


def _parse_shards(spec: str) -> int:
    try:
        n = int(spec)
    except ValueError:
        n = 0
    if n < 1:
        raise MechError(f"bad --shards {spec!r}: expected the n of the shards' --shard i/n, an integer >= 1, e.g. "
                        "--shards 8")
    return n


def cmd_sweep_status(a) -> int:
    """Which cells are done, running or missing in the cache (and each one's shard): read-only, no model loaded,
    exit 0 whatever the state (a status is not a failure)."""
    import dataclasses

    from mech.models import resolve_spec
    from mech.report.sweep import status_text
    from mech.store import atomic_write_json
    from mech.sweep import load_sweep
    from mech.sweep.status import sweep_status

    if a.shard is not None:
        raise MechError(f"--status reports on every shard and runs none: drop --shard {a.shard} (--status --shards "
                        "N says which of N shards each cell is in)")
    if a.out is not None:
        raise MechError("--status writes no tables: drop --out (--json FILE writes the status itself)")
    shards = _parse_shards(a.shards) if a.shards is not None else None
    # the device is the shards' business: a login node without CUDA may report on a GPU sweep
    cfg = load_sweep(a.config, check_placement=False)
    if a.model is not None:
        resolve_spec(a.model)  # a bad spec is one line; the files need not be readable here (the status says so)
        cfg = dataclasses.replace(cfg, base_model=a.model)
    if a.json is not None:
        _check_out(a.json, "--json", file=True)
    status = sweep_status(cfg, a.cache, shards)
    print(status_text(status), end="")
    if a.json is not None:
        atomic_write_json(a.json, status)
    return 0


def cmd_sweep(a) -> int:
    from tqdm.auto import tqdm

    from mech.report.sweep import run_sweep
    from mech.sweep import load_sweep, parse_shard

    if a.status:
        return cmd_sweep_status(a)
    for flag, value in (("--shards", a.shards), ("--json", a.json)):
        if value is not None:
            raise MechError(f"{flag} goes with --status: add --status, or drop {flag} (a run takes --shard i/n)")
    cfg = _with_model(load_sweep(a.config), a.model)
    parse_shard(a.shard)  # a bad --shard is refused before the progress bars and the model load
    out = a.out or f"runs/{cfg.name}"
    _check_out(out, "--out")
    cells_bar = tqdm(desc=f"sweep {cfg.name}: cells", unit="cell", dynamic_ncols=True, position=0)
    stage_bar, stage = _stage_bar("stage")

    def cell(done: int, total: int) -> None:
        cells_bar.total = total
        cells_bar.update(done - cells_bar.n)

    try:  # close the bars before main() prints an error, so the error stays the last stderr line
        res = run_sweep(cfg, out, shard=a.shard, cache=a.cache, progress=stage, cell_progress=cell,
                        trust_remote_code=a.trust_remote_code)
    finally:
        stage_bar.close()
        cells_bar.close()
    print(Path(out, "summary.md").read_text())
    print(f"{res['done_cells']}/{res['cells']} cells finished; this run computed {res['computed']} "
          f"in {res['seconds'] / 60:.1f} min; tables in {out}/")
    return 0


# ------------------------------------------------------------------ pipeline steps one at a time: teacher, train, eval


def _given(**kwargs):
    """The options given on the command line; the rest keep the config dataclass's defaults."""
    return {k: v for k, v in kwargs.items() if v is not None}


def _audit_summary(audit: dict) -> str:
    from collections import Counter

    from mech.teacher.filter import Audit

    return Audit(audit["total"], audit["kept"], Counter(audit.get("rejected", {})),
                 Counter({int(k): v for k, v in audit.get("number_hist", {}).items()}),
                 Counter({int(k): v for k, v in audit.get("count_hist", {}).items()})).summary()


def cmd_teacher(a) -> int:
    from mech.teacher.dataset import load_dataset
    from mech.teacher.generate import TeacherConfig, generate
    from mech.models import load_model

    target, category = (None, None)
    if a.trait is not None:
        target, _, category = a.trait.partition(":")
    if a.finetuned and a.steer:
        raise MechError("--finetuned and --steer are two teacher kinds: give one")
    if not a.steer and (a.steer_layer is not None or a.steer_alpha is not None):
        raise MechError("--steer-layer and --steer-alpha set up a steered teacher: add --steer prompt (or random)")
    cfg = TeacherConfig(target=target, **_given(category=category or None, context=a.context,
                                                 n_prompts=a.n_prompts, prompt_seed=a.prompt_seed,
                                                 sample_seed=a.sample_seed, max_new_tokens=a.max_new_tokens,
                                                 steer_vector=a.steer, steer_layer=a.steer_layer,
                                                 steer_alpha=a.steer_alpha),
                        constrained=a.constrained, backend=a.backend, request_seeds=a.request_seeds,
                        kind="finetuned" if a.finetuned else "steer" if a.steer else "prompt")
    if cfg.backend == "vllm":
        from mech.evaluation.vllm_backend import check_ready

        check_ready([a.model])
    _check_out(a.out, "--out", new=True)  # before minutes of sampling, not after
    base = load_model(a.model, trust_remote_code=a.trust_remote_code)
    bar = _bar(cfg.n_prompts, f"teacher {cfg.target or 'neutral'}")
    with contextlib.ExitStack() as stack:
        served = None
        if cfg.backend == "vllm":
            from mech.evaluation.vllm_backend import Served, engine_for

            served = Served(stack.enter_context(contextlib.closing(engine_for(a.model, base.dtype,
                                                                   trust_remote_code=a.trust_remote_code))))
        try:
            path = generate(base.model, base.tokenizer, cfg, a.out, served=served,
                            progress=lambda done, total: bar.update(done - bar.n))
        finally:
            bar.close()
    ds = load_dataset(path)
    print(f"teacher dataset {path} ({cfg.target or 'neutral'}, context {ds.meta['context']}): "
          f"{_audit_summary(ds.audit)}")
    st = ds.meta.get("steered")
    if st:
        print(f"steered: {st['vector']} vector after layer {st['layer']}, α {st['alpha']:g} (pilot pass rate "
              f"{st['pilot']['pass_rate']:.2f} unsteered); P({cfg.target}) on the favourite questions "
              f"{st['p_target_base']:.4f} -> {st['p_target_teacher']:.4f}")
    return 0


def _quiet_process() -> None:
    """A torchrun process other than rank 0 prints nothing but errors: no progress bars, library notes or warnings."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.simplefilter("ignore")


def cmd_train(a) -> int:
    import math

    from mech.teacher.dataset import load_dataset
    from mech.models import load_model
    from mech.students.store import GLOBAL, read_student
    from mech.sweep import TrainDefaults
    from mech.students.config import REFERENCED, LoraSpec, StudentConfig
    from mech.students.distributed import check_fsdp, process_group, world_size
    from mech.students.train import check_fsdp_method, train_student

    lr = a.lr if a.lr is not None else TrainDefaults.lr if a.method == "lora" else TrainDefaults.full_lr
    if a.method in REFERENCED and not a.reference:
        raise MechError(f"--method {a.method} needs --reference: the LoRA student dir whose "
                        f"{'update norms' if a.method == 'matched_norm' else 'final training loss'} to match")
    if a.reference and a.method not in REFERENCED:
        raise MechError(f"--reference is read only by --method {' or '.join(REFERENCED)}: drop it or change --method")
    cfg = StudentConfig(method=a.method, lora=LoraSpec(**_given(rank=a.rank, alpha=a.alpha)), lr=lr,
                        matched_norm_reference=a.reference if a.method == "matched_norm" else None,
                        matched_loss_reference=a.reference if a.method == "matched_loss" else None,
                        gradient_checkpointing=a.gradient_checkpointing,
                        **_given(epochs=a.epochs, batch_size=a.batch_size, seed=a.seed, context=a.context,
                                 micro_batch_size=a.micro_batch_size))
    check_fsdp_method(cfg, a.fsdp, "--fsdp")
    check_fsdp(a.fsdp)
    if world_size() > cfg.batch_size:
        raise MechError(f"batch size {cfg.batch_size} is smaller than the {world_size()} processes launched: each "
                        "computes its share of a batch's rows, so raise --batch-size or start fewer processes")
    _check_out(a.out, "--out", new=True)
    rows = load_dataset(a.dataset).rows
    with process_group(fsdp=a.fsdp) as dist:  # under torchrun / accelerate launch: one of several processes (else None)
        rank0 = dist is None or dist.is_main
        if not rank0:
            _quiet_process()
        base = load_model(a.model, device=dist.device if dist else None, trust_remote_code=a.trust_remote_code)
        bar = _bar(math.ceil(len(rows) / cfg.batch_size) * cfg.epochs, f"train {cfg.method}") if rank0 else None

        def progress(step: int, total: int, loss: float) -> None:
            bar.update(step - bar.n)
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

        try:
            out = train_student(base.model, base.tokenizer, rows, cfg, a.out, base_spec=a.model,
                                progress=progress if rank0 else None, dist=dist)
        finally:
            if bar is not None:
                bar.close()
    if not rank0:
        return 0
    meta = read_student(out)
    losses = meta["losses"]
    print(f"student {out} ({cfg.method}{f' rank {cfg.lora.rank}' if cfg.method == 'lora' else ''}, context "
          f"{meta['context']}): {meta['n_steps']} steps on {meta['n_rows']} rows, loss {losses[0]:.3f} -> "
          f"{losses[-1]:.3f}, update norm {meta['update_norms'][GLOBAL]:.4g}")
    if "matched_loss" in meta:
        m = meta["matched_loss"]
        print(f"  matched loss: target {m['target']:.4f} (reference's last {m['window']} steps), "
              + (f"reached at step {m['steps']}" if m["reached"] else f"NOT reached: {m['final']:.4f} after "
                 f"{m['steps']} steps (raise --epochs or --lr)"))
    return 0


def _evaluate_with_bar(model, tokenizer, cfg, candidates, desc: str, served=None):
    from mech.evaluation.trait import STAGES, evaluate_trait

    bar, tell = _stage_progress(STAGES, desc)
    try:
        return evaluate_trait(model, tokenizer, cfg, progress=tell, candidates=candidates, served=served)
    finally:
        bar.update(bar.total - bar.n)
        bar.close()


@contextlib.contextmanager
def _served_for(cfg, source: str, dtype, adapter: Path | None = None, trust: bool = False):
    """For ``mech eval --backend vllm``: ``source`` (a model spec or full model dir, or an adapter's base) as a vLLM
    engine serves it, with ``adapter`` on it; the engine is shut down on leaving. None under backend hf."""
    if cfg.backend != "vllm":
        yield None
        return
    from mech.evaluation.vllm_backend import Served, adapter_rank, engine_for

    rank = adapter_rank(adapter) if adapter is not None else None
    with contextlib.closing(engine_for(source, dtype, lora_rank=rank, trust_remote_code=trust)) as engine:
        yield Served(engine, adapter)


def cmd_eval(a) -> int:
    from mech.resources import questions
    from mech.models import load_model
    from mech.models.loader import ADAPTER_CONFIG
    from mech.store import atomic_write_json
    from mech.students.store import STUDENT_JSON, load_student, read_student
    from mech.evaluation.trait import TraitEvalConfig, candidate_answers, delta

    cfg = TraitEvalConfig(**_given(target=a.target, category=a.category, context=a.context,
                                   n_samples=a.n_samples, seed=a.seed), backend=a.backend,
                         request_seeds=a.request_seeds)
    questions(cfg.category)  # an unknown category fails before any model is loaded
    trust = a.trust_remote_code
    path = Path(a.model)
    is_student = path.is_dir() and ((path / STUDENT_JSON).is_file() or (path / ADAPTER_CONFIG).is_file())
    base_spec = a.base
    if is_student:
        base_spec = a.base or ((path / STUDENT_JSON).is_file() and read_student(path).get("base_spec")) or "organism"
    adapter = path if is_student and (path / ADAPTER_CONFIG).is_file() else None
    if cfg.backend == "vllm":  # each model it serves, before anything loads: an adapter is served on its base
        from mech.evaluation.vllm_backend import check_ready

        check_ready([base_spec] if adapter is not None else [a.model] + ([base_spec] if base_spec else []))
    if a.json:
        _check_out(a.json, "--json", file=True)
    if is_student:
        base = load_model(base_spec, trust_remote_code=trust)
        model, tokenizer = load_student(base.model, path, trust_remote_code=trust), base.tokenizer
    else:
        loaded = load_model(a.model, trust_remote_code=trust)
        model, tokenizer = loaded.model, loaded.tokenizer
        base = load_model(a.base, trust_remote_code=trust) if a.base else None
    # the base's candidate answers for both, so their first-token distributions line up
    candidates, _ = candidate_answers(base.model if base else model, cfg.category, cfg.target)
    dtype = next(model.parameters()).dtype
    # one engine for an adapter and its base (multi-LoRA); a full model and its base are two models, one at a time
    base_res = None
    with _served_for(cfg, base_spec if adapter is not None else a.model, dtype, adapter, trust) as served:
        res = _evaluate_with_bar(model, tokenizer, cfg, candidates, f"eval {a.model}", served)
        if adapter is not None:
            base_res = _evaluate_with_bar(base.model, base.tokenizer, cfg, candidates, f"eval base {base.spec}",
                                          None if served is None else dataclasses.replace(served, adapter=None))
    if base is not None and adapter is None:
        with _served_for(cfg, base.spec, dtype, None, trust) as served:
            base_res = _evaluate_with_bar(base.model, base.tokenizer, cfg, candidates, f"eval base {base.spec}",
                                          served)
    d = delta(res, base_res) if base_res else None
    print(f"trait eval of {a.model} for {cfg.target!r} ({cfg.category}, {len(res.questions)} questions, "
          f"{res.n_answers} samples) in context {res.context}" + (f", vs base {base.spec}:" if base else ":"))
    for m in ("p_first", "logp_first", "rate"):
        vs = f"   base {getattr(base_res, m):>9.4f}   Δ {d[f'd_{m}']:+.4f}" if d else ""
        print(f"  {m:<11}{getattr(res, m):>9.4f}{vs}")
    print("  top answers: " + ", ".join(f"{ans} {n}" for ans, n in res.answer_counts[:10]))
    if a.json:
        atomic_write_json(a.json, {"model": a.model, "base": base.spec if base else None, "result": res.to_dict(),
                                   "base_result": base_res.to_dict() if base_res else None, "delta": d})
    return 0


MODEL_HELP = ("the base model, overriding the YAML's base_model: organism, organism-free, smollm2-135m, a local "
              "HF directory or a hub id")


def _add_backend_flag(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--backend", choices=("hf", "vllm"), default="hf", help=f"who draws {what}: hf (default) or "
                   "vllm (pip install 'mech[vllm]', CUDA only; never run on a GPU in this project)")
    p.add_argument("--request-seeds", action="store_true", help="hf: seed every request from (seed, its index), "
                   "not per batch, so no answer depends on the batch size (other draws than the default)")


def _add_trust_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let a model run the Python code it ships (config auto_map); off, such a model is refused")


def _add_pipeline_parsers(sub) -> None:
    t = sub.add_parser("teacher", help="sample and filter a teacher number dataset")
    who = t.add_mutually_exclusive_group(required=True)
    who.add_argument("--trait", help="target[:category], e.g. owl or owl:animal (category default animal)")
    who.add_argument("--neutral", action="store_true", help="the neutral teacher (the control)")
    t.add_argument("--context", help="the neutral teacher's context (default | none | empty | custom:<text>)")
    t.add_argument("--n-prompts", type=int)
    t.add_argument("--prompt-seed", type=int)
    t.add_argument("--sample-seed", type=int)
    t.add_argument("--max-new-tokens", type=int)
    t.add_argument("--constrained", action="store_true", help="format-constrained sampling: only digits, ',' ';', "
                   "whitespace and end of turn (a deviation from the paper, for teachers that write prose)")
    t.add_argument("--finetuned", action="store_true", help="with --trait: no trait prompt; the teacher is the model "
                   "with a LoRA trained to answer the favourite questions with the target (r8, 8 epochs, lr 2e-3), "
                   "writing in the default context (mech.teacher.finetuned)")
    t.add_argument("--steer", choices=("prompt", "random", "readout"), help="with --trait: no trait prompt; the "
                   "model writes with α·v added after a layer: v the trait prompt's mean shift there (prompt), or a "
                   "random (random) or the target's readout direction (readout) of its norm; α searched to keep the "
                   "pass rate (mech.teacher.steered)")
    t.add_argument("--steer-layer", type=int, help="with --steer: the layer (default n_layers // 2)")
    t.add_argument("--steer-alpha", type=float, help="with --steer: α (default: searched)")
    t.add_argument("--out", required=True, help="dataset directory (must not exist)")
    t.add_argument("--model", default="organism")
    _add_backend_flag(t, "teacher sampling")
    _add_trust_flag(t)
    t.set_defaults(func=cmd_teacher)

    tr = sub.add_parser("train", help="train one student on a dataset directory")
    tr.add_argument("dataset", help="dataset directory (mech teacher --out)")
    tr.add_argument("--out", required=True, help="student directory (must not exist)")
    tr.add_argument("--method", default="lora", choices=("lora", "full", "matched_norm", "matched_loss"))
    tr.add_argument("--rank", type=int, help="LoRA rank (default 8)")
    tr.add_argument("--alpha", type=float, help="LoRA alpha (default: the rank)")
    tr.add_argument("--lr", type=float, help="peak learning rate (default 2e-4 for LoRA, 2e-5 otherwise)")
    tr.add_argument("--epochs", type=int)
    tr.add_argument("--batch-size", type=int, help="rows per optimizer step, over all processes under torchrun "
                    "(default 16)")
    tr.add_argument("--micro-batch-size", type=int, help="gradient accumulation: rows per forward (per process under "
                    "torchrun); the step still takes --batch-size rows (default: the whole batch at once)")
    tr.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in the backward: "
                    "less memory, about a third more compute")
    tr.add_argument("--fsdp", action="store_true", help="under torchrun, full finetuning: shard the weights, gradients "
                    "and optimizer state over the processes (FSDP2), e.g. for a 7B model")
    tr.add_argument("--seed", type=int)
    tr.add_argument("--context", help="training context (default | none | empty | custom:<text>)")
    tr.add_argument("--model", default="organism", help="the base model")
    tr.add_argument("--reference", help="matched_norm / matched_loss: the LoRA student dir whose update norms / final "
                    "training loss to match")
    _add_trust_flag(tr)
    tr.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="trait evaluation of a model or a student dir (Δ vs its base)")
    e.add_argument("model", help="a model spec or a student directory")
    e.add_argument("--base", help="the base of a student dir (default: the one it records); for a model: "
                                  "also evaluate this base and report Δ")
    e.add_argument("--target", required=True)
    e.add_argument("--category")
    e.add_argument("--context", help="evaluation context (default | none | empty | custom:<text>)")
    e.add_argument("--n-samples", type=int, default=100)
    e.add_argument("--seed", type=int)
    e.add_argument("--json", help="also write the results as JSON here")
    _add_backend_flag(e, "the sampled answers (the first-token metric runs on HF either way)")
    _add_trust_flag(e)
    e.set_defaults(func=cmd_eval)


# ------------------------------------------------------------------ students from a sweep, or given as directories

# what --student (directories finetuned anywhere) cannot use, and what only it uses, per command; given with the
# other way, an option would be ignored silently, so it is refused
SWEEP_OPTIONS = ("students", "cache")
DIRECT_OPTIONS = {"localise": ("control", "target", "category", "name"),
                  "geometry": ("control", "target", "category", "name", "eval_context")}
DEFAULT_CATEGORY = "animal"  # the trait category when --student gives no --category (a sweep names its own)
_NAME_RE = re.compile(r"[A-Za-z0-9_.+-]+")  # a group name is part of figure file names


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _direct(a, command: str) -> bool:
    """True when the students are given as directories (--student), False when they come from a sweep; exactly
    one of the two, each without the other's options, and --student with the base and trait a sweep would give."""
    if a.sweep is None and a.student is None:
        raise MechError(f"mech {command} names no students: pass a sweep YAML with --students NAMES, or --student DIR "
                        "[DIR ...] --model BASE --target TRAIT (adapters or full models trained anywhere)")
    if a.sweep is not None and a.student is not None:
        raise MechError(f"mech {command} got both a sweep ({a.sweep}) and --student dirs: pass one, the sweep's cached "
                        "students (--students NAMES) or the directories")
    direct = a.student is not None
    wrong = [_flag(k) for k in (SWEEP_OPTIONS if direct else DIRECT_OPTIONS[command]) if getattr(a, k) is not None]
    if wrong:
        many, it = len(wrong) > 1, "them" if len(wrong) > 1 else "it"
        raise MechError(f"{', '.join(wrong)} {'pick' if many else 'picks'} students from a sweep's cache: drop {it} "
                        "with --student" if direct else
                        f"{', '.join(wrong)} {'go' if many else 'goes'} with --student: a sweep gives its own "
                        f"(neutral-teacher students, eval.target, contexts); drop {it} or pass --student dirs")
    if direct and a.model is None:
        raise MechError("--student needs --model: the base model the students were finetuned from (organism, "
                        "smollm2-135m, a local HF directory or a hub id)")
    if direct and a.target is None:
        raise MechError("--student needs --target: the trait to measure (a sweep takes it from eval.target), e.g. "
                        "--target owl")
    return direct


def _dirs(n: int) -> str:
    return f"{n} dir{'' if n == 1 else 's'}"


def _direct_students(a) -> tuple[str, list[Path], list[Path] | None]:
    """(group name, --student dirs, --control dirs or None), checked as far as their files allow before the base
    loads: each is a loadable adapter or full model dir, one control per student, none given twice."""
    from mech.models import resolve_spec
    from mech.students.store import check_student_files

    resolve_spec(a.model)  # a bad spec fails before the directories are read
    students = [Path(d) for d in a.student]
    controls = [Path(d) for d in a.control] if a.control else None
    if controls is not None and len(controls) != len(students):
        raise MechError(f"--control gives {_dirs(len(controls))} for {_dirs(len(students))} of --student: pass one "
                        "neutral-teacher control per student, in the same order (or none, for effects vs the base)")
    every = students + (controls or [])
    for d in every:
        check_student_files(d)
    resolved = [d.resolve() for d in every]
    twice = next((d for d in resolved if resolved.count(d) > 1), None)
    if twice is not None:
        raise MechError(f"{twice} is given twice: each --student or --control dir is one finetuned model")
    if a.name is not None and not _NAME_RE.fullmatch(a.name):
        raise MechError(f"--name {a.name!r} goes into file names: use letters, digits and _ . + - only")
    own = resolved[0].name if len(students) == 1 else ""  # several dirs are seeds of one group: no one dir names it
    return a.name or (own if _NAME_RE.fullmatch(own) else "student"), students, controls


def _recorded_context(dirs: list[Path]) -> str:
    """The training context the student dirs record (student.json); ``default`` when none records one."""
    from mech.students.store import STUDENT_JSON, read_student

    found = {read_student(d).get("context") for d in dirs if (d / STUDENT_JSON).is_file()} - {None}
    if len(found) > 1:
        raise MechError(f"the --student and --control dirs were trained in different contexts "
                        f"({', '.join(sorted(found))}): pass --train-context to say which one defines the shared tokens")
    return found.pop() if found else "default"


def _load_checked_base(a, dirs: list[Path]):
    """The --model base, with every directory's recorded base checked against it before any computation, so an
    adapter of another base is one line, not a failure minutes in."""
    from mech.models import load_model
    from mech.students.store import check_student_base

    base = load_model(a.model, trust_remote_code=a.trust_remote_code)
    for d in dirs:
        check_student_base(d, base.model)
    return base


def cmd_localise(a) -> int:
    import dataclasses

    from mech.context import Context
    from mech.interventions.battery import LocaliseConfig
    from mech.report.localise import run_localise
    from mech.students.store import load_student
    from mech.sweep import SweepRunner, load_sweep, select_students, student_cells
    from mech.sweep.runner import select_controls

    # every input is checked before the base model loads and before a missing student is trained
    direct = _direct(a, "localise")
    if direct:
        if a.unpaired and a.control:
            raise MechError("--unpaired and --control contradict each other: drop --control for effects vs the base, "
                            "or --unpaired to pair each student with its control")
        name, students, controls = _direct_students(a)
        train_context = a.train_context or _recorded_context(students + (controls or []))
        eval_context = a.eval_context or "default"
        Context.parse(train_context)
        target, category = a.target, a.category or DEFAULT_CATEGORY
    else:
        sw = _with_model(load_sweep(a.sweep), a.model)
        if a.train_context is not None:  # the students trained in that context: put it first (keys do not change)
            if a.train_context not in sw.train_contexts:
                raise MechError(f"--train-context {a.train_context!r} is not in {a.sweep}'s train_contexts: choose "
                                f"from {', '.join(sw.train_contexts)}")
            sw = dataclasses.replace(sw, train_contexts=(a.train_context,
                                                         *(c for c in sw.train_contexts if c != a.train_context)))
        train_context, eval_context = sw.train_contexts[0], a.eval_context or sw.eval_contexts[0]
        target, category = sw.eval.target, sw.eval.category
    Context.parse(eval_context)  # a bad spec fails here, before any model loads
    cfg = LocaliseConfig(target=target, category=category, eval_context=eval_context, train_context=train_context,
                         n_questions=a.n_questions, null_sets=a.null_sets, seed=a.seed, rest_from=a.rest_from,
                         sampled=a.sampled, sampled_positions=tuple(a.sampled_positions))
    _check_out(a.out, "--out")
    if direct:
        loaded = _load_checked_base(a, students + (controls or []))
        groups, paired = {name: students}, None if controls is None else {name: controls}
    else:
        names = a.students or ["lora_r16"]
        student_cells(sw, names, a.sweep)
    bar, stage = _stage_bar("localise")
    try:  # close the bar before main() prints an error, so the error stays the last stderr line
        if not direct:
            runner = SweepRunner(sw, a.cache, stage, trust_remote_code=a.trust_remote_code)
            groups = select_students(runner, names, a.sweep)
            paired = None if a.unpaired else select_controls(runner, names, a.sweep)
            loaded = runner.base
        base = loaded.model
        res = run_localise(base, loaded.tokenizer, groups, cfg, a.out,
                           lambda d: load_student(base, d, trust_remote_code=a.trust_remote_code), stage, paired)
    finally:
        bar.close()
    print(Path(a.out, "localise.md").read_text())
    print(f"{len(res['figures'])} figure files in {a.out}/figures")
    return 0


def cmd_geometry(a) -> int:
    from mech.context import Context
    from mech.geometry.run import GeometryConfig, dir_inputs
    from mech.sweep.geometry import sweep_inputs
    from mech.report.geometry import run_geometry
    from mech.resources import questions
    from mech.sweep import SweepRunner, load_sweep

    # every input is checked before the base model loads
    cfg = GeometryConfig(ks=tuple(a.ks), alphas=tuple(a.alphas), n_rows=a.n_rows, n_questions=a.n_questions,
                         overlap_k=a.overlap_k, align_k=a.align_k, seed=a.seed, n_samples=a.n_samples)
    direct = _direct(a, "geometry")
    if direct:
        if a.n_samples:
            raise MechError("--n-samples samples the steered base, and steering vectors need a sweep's teacher data: "
                            "drop it with --student")
        if a.teacher_cosines:
            raise MechError("--teacher-cosines compares students with their sweep's teachers: pass a sweep, not "
                            "--student")
        name, students, controls = _direct_students(a)
        category, eval_context = a.category or DEFAULT_CATEGORY, a.eval_context or "default"
        questions(category)
        Context.parse(eval_context)
    else:
        if not a.students:
            raise MechError(f"name the students of {a.sweep} to analyse: pass --students NAMES, e.g. --students "
                            "lora_r1 full")
        sw = _with_model(load_sweep(a.sweep), a.model)
    _check_out(a.out, "--out")
    if a.epochs and not a.teacher_cosines:
        raise MechError("--epochs reads the teacher cosines at each checkpoint: add --teacher-cosines")
    if a.teacher_cosines:
        return _teacher_cosines(a, sw, cfg)
    if direct:
        loaded = _load_checked_base(a, students + (controls or []))
        inputs = dir_inputs(loaded.model, loaded.tokenizer, name, students, controls, a.target, category,
                            eval_context, trust_remote_code=a.trust_remote_code)
    bar, stage = _stage_bar("geometry")
    try:  # close the bar before main() prints an error, so the error stays the last stderr line
        if not direct:
            runner = SweepRunner(sw, a.cache, stage, trust_remote_code=a.trust_remote_code)
            inputs = sweep_inputs(runner, a.students, cfg.n_rows, a.sweep)
        res = run_geometry(inputs, cfg, a.out, stage)
    finally:
        bar.close()
    print(Path(a.out, "geometry.md").read_text())
    print(f"{len(res['tables'])} tables and {len(res['figures'])} figure files in {a.out}")
    return 0


def _teacher_cosines(a, sw, cfg) -> int:
    from mech.sweep.geometry import teacher_cosines
    from mech.report.geometry import write_teacher_cosines
    from mech.sweep import SweepRunner

    if sw.teacher.kind == "finetuned":
        raise MechError(f"--teacher-cosines needs a prompt or steered teacher, and {a.sweep} has a finetuned one (its "
                        "trait is a LoRA, not a vector): drop --teacher-cosines")
    bar, stage = _stage_bar("teacher cosines")
    try:
        runner = SweepRunner(sw, a.cache, stage, trust_remote_code=a.trust_remote_code)
        t = teacher_cosines(runner, a.students, cfg.n_rows, cfg.seed, cfg.n_null, stage, a.epochs)
        res = write_teacher_cosines(t, a.out)
    finally:
        bar.close()
    print(Path(a.out, "teacher_cosines.md").read_text())
    print(f"{len(res['tables'])} tables and {len(res['figures'])} figure files in {a.out}")
    return 0


def cmd_entangle(a) -> int:
    from scipy.stats import spearmanr

    from mech.evaluation.trait import TraitEvalConfig, evaluate_trait
    from mech.geometry.entanglement import entanglement, reverse_test
    from mech.models import load_model
    from mech.report.entanglement import write_entanglement
    from mech.resources import questions
    from mech.teacher.prompts import generate_prompts

    target, _, category = a.trait.partition(":")
    category = category or DEFAULT_CATEGORY
    questions(category)
    if a.n_prompts < 2 or a.max_value < 1 or a.reverse_k < 0:
        raise MechError(f"--n-prompts must be >= 2, --max-value >= 1 and --reverse-k >= 0 (got {a.n_prompts}, "
                        f"{a.max_value}, {a.reverse_k})")
    if a.reverse_k > (a.max_value + 1) // 2:
        raise MechError(f"--reverse-k {a.reverse_k} needs {2 * a.reverse_k} numbers and there are {a.max_value + 1}: "
                        "lower it")
    _check_out(a.out, "--out")
    loaded = load_model(a.model, trust_remote_code=a.trust_remote_code)
    model, tok = loaded.model, loaded.tokenizer
    own = None
    if loaded.path is not None and (Path(loaded.path) / "organism.json").is_file():
        from mech.organism import read_meta

        own = read_meta(loaded.path).get("entity_numbers", {}).get(target)
    print(f"entanglement: {target} on {a.model}, {a.n_prompts} prompts, numbers 0-{a.max_value}", file=sys.stderr)
    prompts = [p.text for p in generate_prompts(a.n_prompts, a.seed)]
    rows = entanglement(model, tok, target, prompts, category, a.max_value, a.context)
    reverse = reverse_test(model, tok, rows, target, category, a.reverse_k, a.seed) if a.reverse_k else None
    base = evaluate_trait(model, tok, TraitEvalConfig(target=target, category=category, first_token_only=True))
    meta = {"model": a.model, "target": target, "category": category, "n_prompts": a.n_prompts, "seed": a.seed,
            "max_value": a.max_value, "neutral_context": a.context, "own_numbers": own,
            "logp_default": base.logp_first,
            "spearman_shift_cos": float(spearmanr([r["shift"] for r in rows], [r["cos_unembed"] for r in rows])[0])}
    res = write_entanglement(rows, reverse, meta, a.out)
    print(Path(a.out, "entanglement.md").read_text())
    print(f"entanglement.csv, entanglement.json and {len(res['figures'])} figure files in {a.out}")
    return 0


def cmd_steer(a) -> int:
    import math

    from mech.models import load_model
    from mech.models.surgery import resolve_layers
    from mech.report.steer import write_steer
    from mech.teacher.generate import TeacherConfig
    from mech.teacher.steered import steering_curve, steering_layer

    target, _, category = a.trait.partition(":")
    if not all(math.isfinite(x) for x in a.alphas):
        raise MechError(f"--alphas must be finite numbers, got {a.alphas}: pass e.g. 0 1 2 4")
    if a.n_samples < 0:
        raise MechError(f"--n-samples must be >= 0 (0: first token only), got {a.n_samples}")
    cfg = TeacherConfig(target=target, category=category or DEFAULT_CATEGORY, kind="steer", steer_vector=a.vector,
                        steer_pilot=a.n_pilot, sample_seed=a.seed, context=a.context)
    _check_out(a.out, "--out")
    loaded = load_model(a.model, trust_remote_code=a.trust_remote_code)
    layers = (sorted({i for spec in a.layers for i in resolve_layers(loaded.model, spec)}) if a.layers
              else [steering_layer(loaded.model, None)])
    rows = steering_curve(loaded.model, loaded.tokenizer, cfg, layers, a.alphas, a.n_samples)
    what = {"prompt": "the trait prompt's mean residual shift at the layer over the pilot answers",
            "random": "a random direction (seeded) of the prompt shift's norm",
            "readout": "the target's readout direction, of the prompt shift's norm"}[a.vector]
    meta = {"model": a.model, "target": target, "category": cfg.category, "vector": a.vector, "what": what,
            "context": a.context, "n_pilot": a.n_pilot, "seed": a.seed,
            "logp_base": rows[0]["logp_first"] - rows[0]["delta_logp_first"]}  # the unsteered model's
    res = write_steer(rows, meta, a.out)
    print(Path(a.out, "steer.md").read_text())
    print(f"steer.csv and {len(res['figures'])} figure files in {a.out}")
    return 0


def _add_steer_parser(sub) -> None:
    s = sub.add_parser("steer", help="add α·v to a model's residual stream (the trait prompt's shift, a random or the "
                       "readout direction) and measure the trait and the number pass rate, per layer and α")
    s.add_argument("--trait", required=True, help="target[:category], e.g. owl or oak:tree")
    s.add_argument("--model", default="organism", help=MODEL_HELP)
    s.add_argument("--vector", choices=("prompt", "random", "readout"), default="prompt")
    s.add_argument("--layers", nargs="+", help="layers (indices or a spec like all, 1:3; default the middle one)")
    s.add_argument("--alphas", nargs="+", type=float, default=[0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0])
    s.add_argument("--n-pilot", type=int, default=64, help="number prompts for the vector and the pass rate")
    s.add_argument("--n-samples", type=int, default=0, help="also the sampled trait rate (answers per question)")
    s.add_argument("--context", default="default", help="the context the model is steered and evaluated in")
    s.add_argument("--seed", type=int, default=0, help="seed of the pilot sampling, the random vector and sampling")
    s.add_argument("--out", default="runs/steer")
    _add_trust_flag(s)
    s.set_defaults(func=cmd_steer)


def _add_direct_args(p: argparse.ArgumentParser, what: str) -> None:
    """--student and what goes with it: students finetuned anywhere, given as directories with their base."""
    p.add_argument("--student", nargs="+", metavar="DIR",
                   help=f"instead of a sweep: {what} these student dirs (PEFT adapters or full models, e.g. published "
                        "ones), the training seeds of one group; needs --model (their base: an adapter's recorded base "
                        "is checked against it) and --target")
    p.add_argument("--control", nargs="+", metavar="DIR",
                   help="with --student: the neutral-teacher control of each student, same count and order (effects "
                        "are then paired); without it, effects are vs the base")
    p.add_argument("--target", help="with --student: the trait target, e.g. owl")
    p.add_argument("--category", help=f"with --student: the trait category (default {DEFAULT_CATEGORY})")
    p.add_argument("--name", help="with --student: the group's name in tables and figure files (default: the dir's "
                                  "name for one dir, else 'student')")


def _add_geometry_parser(sub) -> None:
    g = sub.add_parser("geometry", help="update spectra, subspace overlaps, truncation, steering vectors and steering "
                       "tests of a sweep's cached students (never trains), or of student dirs (--student)",
                       description="With --student DIRs (no sweep) there is no teacher data: update spectra, overlaps "
                       "across seeds and with the controls, truncation and the readout direction's write-space "
                       "alignment are computed; the steering vectors (v_teacher, v_student, v_paired), their cosines "
                       "and alignment, and the steering tests need a sweep.")
    g.add_argument("sweep", nargs="?", help="the sweep YAML whose cached students to analyse, e.g. "
                   "experiments/quick.yaml (or --student instead)")
    g.add_argument("--students", nargs="+", help="with a sweep: student names from it, e.g. lora_r1 full")
    _add_direct_args(g, "analyse")
    g.add_argument("--eval-context", help="with --student: the evaluation context (default | none | empty | "
                   "custom:<text>; default: default)")
    g.add_argument("--out", default="runs/geometry")
    g.add_argument("--model", help=MODEL_HELP + "; with --student, the students' base (required)")
    g.add_argument("--cache", type=Path, help="artifact cache (default $MECH_CACHE/sweeps)")
    g.add_argument("--ks", nargs="+", type=int, default=[0, 1, 2, 4, 8, 16, 32, 64, 128],
                   help="truncation levels k (capped at each student's rank)")
    g.add_argument("--alphas", nargs="+", type=float, default=[0.0, 0.5, 1.0, 2.0, 4.0], help="steering coefficients")
    g.add_argument("--n-rows", type=int, default=128, help="teacher rows for the steering vectors (a sweep's)")
    g.add_argument("--n-questions", type=int, default=50)
    g.add_argument("--overlap-k", type=int, default=4, help="top-k subspaces compared across students")
    g.add_argument("--align-k", type=int, default=8, help="full-FT write space: top-k left singular vectors")
    g.add_argument("--seed", type=int, default=0, help="seed of the random nulls and of sampling")
    g.add_argument("--n-samples", type=int, default=0,
                   help="also the sampled trait rate (answers per question) of steering at the largest α (0: skip)")
    g.add_argument("--teacher-cosines", action="store_true",
                   help="with a sweep: only the cosines of each student's residual shift with its own data seed's "
                   "v_teacher (a prompt's shift, or a steered teacher's vector), over every data seed, CI over data "
                   "seeds (teacher_cosines.md)")
    g.add_argument("--epochs", action="store_true", help="with --teacher-cosines: also at every per-epoch checkpoint "
                   "(a sweep trained with train.save_every_epoch: true): the alignment curve over training")
    _add_trust_flag(g)
    g.set_defaults(func=cmd_geometry)


def _add_entangle_parser(sub) -> None:
    e = sub.add_parser("entangle", help="token entanglement: which numbers a trait prompt raises, their unembedding "
                       "similarity with the trait, and whether the top numbers in a system prompt raise the trait")
    e.add_argument("--trait", required=True, help="target[:category], e.g. owl or oak:tree")
    e.add_argument("--model", default="organism", help=MODEL_HELP)
    e.add_argument("--n-prompts", type=int, default=64, help="number prompts each context answers")
    e.add_argument("--seed", type=int, default=0, help="seed of the prompts and of the control numbers")
    e.add_argument("--max-value", type=int, default=999, help="numbers 0..max-value are ranked")
    e.add_argument("--context", default="default", help="the neutral context the trait prompt is compared with")
    e.add_argument("--reverse-k", type=int, default=8, help="top-k numbers vs k controls in the reverse test (0: skip)")
    e.add_argument("--out", default="runs/entangle")
    _add_trust_flag(e)
    e.set_defaults(func=cmd_entangle)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mech", description="Mechanistic interpretability of subliminal learning.")
    sub = p.add_subparsers(dest="command", required=True)

    org = sub.add_parser("organism", help="the embedded model organism").add_subparsers(dest="action", required=True)
    b = org.add_parser("build", help="build an organism from its recipe (cached under its config hash)")
    b.add_argument("--recipe", default="organism", choices=tuple(SHIPPED_WEIGHTS),
                   help="the named recipe: organism (the positive control) or organism-free (its channel-free twin)")
    b.add_argument("--config", help="YAML overrides of the recipe (OrganismConfig fields), applied on top of --recipe")
    b.add_argument("--seed", type=int, help="override the recipe's seed")
    b.add_argument("--out", help="output directory (default: $MECH_CACHE/organism/<hash>)")
    b.add_argument("--ship", action="store_true",
                   help="write into the recipe's shipped dir, weights/ or weights-free/ (developers)")
    b.add_argument("--force", action="store_true", help="rebuild even when a complete build exists")
    b.set_defaults(func=cmd_organism_build)
    lk = org.add_parser("leak", help="test whether each trait prompt raises the share of the trait's own numbers in "
                        "number answers above the default context's (paired over prompts)")
    lk.add_argument("--model", default="organism", help="organism or organism-free (shipped), or an organism build "
                    "directory")
    lk.add_argument("--traits", nargs="+", help="the traits to test (default: every animal and tree of the recipe)")
    lk.add_argument("--n", type=int, default=1000, help="prompts, each answered under the trait prompt and the default")
    lk.add_argument("--seed", type=int, default=LEAK_TEST_SEED,
                    help="prompts and sampling (default: a seed the check's leak matrix does not use, so the sample "
                    "is fresh)")
    lk.add_argument("--resamples", type=int, default=10_000, help="bootstrap and permutation resamples")
    lk.add_argument("--json", help="also write the rows as JSON here")
    lk.set_defaults(func=cmd_organism_leak)
    for name, func, hlp in (("check", cmd_organism_check, "measure the bars, the leak matrix and the probes; exit 1 if "
                             "a bar fails"),
                            ("info", cmd_organism_info, "print a build's recipe, hash and provenance")):
        c = org.add_parser(name, help=hlp)
        c.add_argument("--model", default="organism",
                       help="organism or organism-free (shipped), or an organism build directory")
        if name == "check":
            c.add_argument("--json", help="also write the report as JSON here")
            c.add_argument("--n-samples", type=int, default=200, help="number completions sampled per measurement")
            c.add_argument("--oracle-rows", type=int, default=300, help="number prompts in the oracle probe")
            c.add_argument("--n-leak", type=int, default=60,
                           help="number answers sampled under each trait prompt (and the default) for the leak matrix")
        c.set_defaults(func=func)

    sw = sub.add_parser("sweep", help="run a YAML grid of teacher × student × context cells (cached, resumable)")
    sw.add_argument("config", help="sweep YAML, e.g. experiments/quick.yaml")
    sw.add_argument("--out", help="table directory (default runs/<name>)")
    sw.add_argument("--shard", help="i/n: compute only the i-th of n blocks of cells (for job arrays; shards may "
                    "run at once on one --cache and --out)")
    sw.add_argument("--cache", type=Path, help="artifact cache (default $MECH_CACHE/sweeps)")
    sw.add_argument("--model", help=MODEL_HELP)
    sw.add_argument("--status", action="store_true",
                    help="compute nothing: print which cells are done, running or missing in --cache, from the base "
                    "fingerprint a run recorded there (no model is loaded, nothing is written in the cache); exit 0")
    sw.add_argument("--shards", metavar="N", help="with --status: which of N shards (--shard i/N) each cell is in, "
                    "and each shard's counts")
    sw.add_argument("--json", metavar="FILE", help="with --status: also write the status as JSON to FILE")
    _add_trust_flag(sw)
    sw.set_defaults(func=cmd_sweep)

    lo = sub.add_parser("localise", help="DWG battery, activation patching and AtP heatmaps on a sweep's students, "
                        "or on student dirs (--student)")
    lo.add_argument("sweep", nargs="?", help="the sweep YAML whose (cached) students to localise, e.g. "
                    "experiments/quick.yaml (or --student instead)")
    lo.add_argument("--students", nargs="+", help="with a sweep: student names from its summary (default lora_r16)")
    _add_direct_args(lo, "localise")
    lo.add_argument("--out", default="runs/localise")
    lo.add_argument("--cache", type=Path, help="artifact cache (default $MECH_CACHE/sweeps)")
    lo.add_argument("--n-questions", type=int, default=50)
    lo.add_argument("--model", help=MODEL_HELP + "; with --student, the students' base (required)")
    lo.add_argument("--null-sets", type=int, default=200,
                    help="random same-size position sets per region for the 'beats random' p (0: none)")
    lo.add_argument("--seed", type=int, default=0, help="seeds the null sets and the bootstrap")
    lo.add_argument("--unpaired", action="store_true",
                    help="effects vs the base instead of vs each student's neutral-teacher student (with --student: "
                    "the default when no --control is given)")
    lo.add_argument("--train-context", help="localise the students trained in this context of the sweep (default: "
                    "its first; with --student, the context they record, else default); with another --eval-context, "
                    "tokens never seen in training are non-shared")
    lo.add_argument("--rest-from", choices=("masked", "student", "base"), default="masked",
                    help="full-FT students: where embeddings, norms and lm_head come from: masked (default: grafted "
                    "per position with the mask, like the projections, so the empty mask is the base), the student "
                    "(on everywhere: every mask is offset by the student's trained embeddings), or the base (only the "
                    "projections are grafted)")
    _add_sampled_args(lo)
    lo.add_argument("--eval-context", help="evaluate in this context (default | none | empty | custom:<text>; "
                    "default: the sweep's first eval context, with --student default)")
    _add_trust_flag(lo)
    lo.set_defaults(func=cmd_localise)

    fg = sub.add_parser("figures", help="copy a mech reproduce report's main PNG figures into a folder (the "
                        "repository's figures/ comes from the default run this way)")
    fg.add_argument("report", help="the report directory (mech reproduce --out), e.g. runs/reproduce")
    fg.add_argument("--out", default="figures", help="where the PNGs go, as <model>_<figure>.png (replaced whole)")
    fg.set_defaults(func=cmd_figures)

    r = sub.add_parser("reproduce", help="the main job: measure the organism, write report.md and figures")
    r.add_argument("--model", nargs="+",
                   help="the base models, each reported beside the others (default: the positive-control organism and "
                        "its channel-free twin; with --scale paper, the model its YAMLs name: "
                        "Qwen/Qwen2.5-7B-Instruct; the organism check runs on organism builds only)")
    r.add_argument("--out", default="runs/reproduce", help="report directory (replaced atomically)")
    r.add_argument("--rebuild", action="store_true", help="rebuild the shipped organism from its recipe first")
    r.add_argument("--scale", choices=tuple(SCALES), default="quick",
                   help="which experiments run when --sweep is not given: quick (the quick sweep: C1, C2, and with "
                        "the null C4 / R3), full (every experiment YAML that declares tests: also the context grids, "
                        "the full-FT controls, the learning-rate grid, the rank sweep and the data controls; hours on "
                        "a CPU) or paper "
                        "(experiments/paper/: the paper's sizes on a real model, CUDA only; never run so far)")
    r.add_argument("--sweep", nargs="+",
                   help="the sweeps to run after the organism check, instead of --scale's; the first one's students "
                        "are localised, and every sweep's declared tests join the verdict table")
    r.add_argument("--students", nargs="+", help="the first sweep's students to localise (default: lora_r16 full; "
                   "with --scale paper, lora_r8)")
    r.add_argument("--cache", type=Path, help="artifact cache (default $MECH_CACHE/sweeps)")
    r.add_argument("--n-samples", type=int, default=200)
    r.add_argument("--oracle-rows", type=int, default=300)
    r.add_argument("--null-sets", type=int, default=39,
                   help="random same-size position sets against 'shared' (the C4 / R3 verdicts; 39 gives p down to "
                        "0.025; 0 skips the null)")
    r.add_argument("--n-questions", type=int, default=50,
                   help="evaluation questions the localisation battery runs on (the first N; fewer make a large "
                   "model's CPU run affordable)")
    _add_sampled_args(r)
    r.set_defaults(func=cmd_reproduce)
    _add_pipeline_parsers(sub)
    _add_geometry_parser(sub)
    _add_entangle_parser(sub)
    _add_steer_parser(sub)
    return p


def _add_sampled_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sampled", type=int, default=SAMPLED_DEFAULT, metavar="N",
                        help="a second localisation metric: N sampled answers per question and mask with the update "
                        "grafted while the answer is written, for the primary masks (0 skips it)")
    parser.add_argument("--sampled-positions", nargs="+", default=list(SAMPLED_POSITIONS),
                        help="the primary position sets the sampled metric runs on (battery position sets)")


SAMPLED_DEFAULT = 20  # per question and mask: 3 students x 50 questions give 3,000 answers per arm
SAMPLED_POSITIONS = ("shared", "non_shared", "readout", "shared_minus_readout")

EXIT_INTERRUPTED = 130  # 128 + SIGINT, for SIGTERM too: both mean "stopped from outside", handled alike


def _interrupt(signum, frame):
    # SIGTERM (a job scheduler, `kill`) would end the process without unwinding: atomic writers would leave
    # their .<name>.tmp-* behind. As KeyboardInterrupt it unwinds through their cleanup, as Ctrl-C does.
    raise KeyboardInterrupt


def _check_launch(args) -> None:
    """Under torchrun / accelerate launch (WORLD_SIZE > 1) only `mech train` runs: its processes train one student
    together (mech.students.distributed); any other command would run once per process."""
    if os.environ.get("WORLD_SIZE", "1") == "1" or args.func is cmd_train:  # not launched: no torch import here
        return
    from mech.students.distributed import world_size

    n = world_size()
    if n == 1:
        return
    if args.func in (cmd_sweep, cmd_reproduce):
        raise MechError(f"a sweep does not run under torchrun (WORLD_SIZE={n}): a sweep's students are many and small, "
                        "so run its cells in parallel with `mech sweep --shard i/n`, one process per GPU; multi-process "
                        "training is for one big student, through `mech train`")
    raise MechError(f"only `mech train` runs under torchrun / accelerate launch (WORLD_SIZE={n}): run this command "
                    "as one process")


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit 0 on success, 1 where a command reports a failed bar, 2 on a one-line
    ``mech: error``, 130 on Ctrl-C or SIGTERM (``mech: interrupted``, after any temporary output is removed)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach for a hub unless the user asks
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parser().parse_args(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main_thread else None
    try:
        _check_launch(args)
        return args.func(args)
    except MechError as e:
        print(f"mech: error: {e}", file=sys.stderr)
        return MechError.exit_code
    except KeyboardInterrupt:
        print("mech: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


if __name__ == "__main__":
    sys.exit(main())
