"""A sweep's grid: the YAML schema, its cells, and the exact config of each stage a cell runs.

Each stage-config function maps a cell to the config of one stage; its hash (with its inputs' hashes) names the
artifact. Nothing else goes into a key, so an artifact is reused exactly when it would be recomputed identically.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mech.analysis.hypotheses import HypothesisSpec
from mech.config import from_dict, load_yaml
from mech.errors import MechError
from mech.store import content_hash


CONTROLS = ("random", "shuffled_within", "shuffled_across", "banned", "divergence_only", "divergence_off")


@dataclass(frozen=True)
class TraitSpec:
    """A teacher's trait; ``target: null`` is the neutral teacher (the control). ``control`` makes the arm a
    control of that teacher (mech.teacher.controls), paired like any arm against the neutral teacher:
    ``random`` (its prompts answered with uniform random numbers), ``shuffled_within`` / ``shuffled_across`` (its
    numbers permuted within / across answers), ``banned`` (its filter drops every answer containing one of
    ``banned``: by default the numbers the organism ties to ``target``), ``divergence_only`` / ``divergence_off``
    (its rows with the loss on / off the tokens where its greedy token differs from the neutral teacher's:
    mech.teacher.divergence)."""

    target: str | None = "owl"
    category: str = "animal"
    control: str | None = None
    banned: tuple[int, ...] = ()

    @property
    def label(self) -> str:
        return (self.target or "neutral") + (f":{self.control}" if self.control else "")

    def __post_init__(self) -> None:
        if self.control is not None and self.control not in CONTROLS:
            raise MechError(f"unknown control {self.control!r} for teacher {self.target or 'neutral'}: expected "
                            f"one of {', '.join(CONTROLS)}")
        if self.banned and self.control != "banned":
            raise MechError(f"teacher {self.label}: banned numbers need control: banned")
        if self.control == "banned" and self.target is None and not self.banned:
            raise MechError("a banned-number control of the neutral teacher needs its numbers: list them in banned")
        if self.control in ("divergence_only", "divergence_off") and self.target is None:
            raise MechError(f"a {self.control} control compares a trait teacher with the neutral one: give it a target")


@dataclass(frozen=True)
class StudentSpec:
    """One point on the student axis. Fields left None take the sweep's ``train`` defaults."""

    name: str = ""
    method: str = "lora"  # lora | full | matched_norm | matched_loss
    rank: int | None = 8
    alpha: float | None = None
    lr: float | None = None
    epochs: int | None = None
    matched_norm_rank: int | None = None  # matched_norm: match the LoRA student of this rank (same seed)
    matched_norm_scope: str = "module"
    matched_loss_rank: int | None = None  # matched_loss: train down to the LoRA student of this rank (same seed)

    @property
    def reference_rank(self) -> int | None:
        """The rank of the LoRA student this one is defined against (same data, seed and context), or None."""
        return {"matched_norm": self.matched_norm_rank, "matched_loss": self.matched_loss_rank}.get(self.method)


@dataclass(frozen=True)
class TeacherDefaults:
    n_prompts: int = 1500
    prompt_seed: int = 0
    max_new_tokens: int = 48
    context: str = "default"
    constrained: bool = False  # format-constrained sampling (mech.teacher.constrained); a deviation from the paper
    kind: str = field(default="prompt", metadata={"help": (
        "prompt: each trait teacher is the base under its trait prompt | finetuned: the base with a LoRA trained to "
        "answer the favourite questions with the target, writing numbers in `context` with no trait prompt "
        "(mech.teacher.finetuned) | steer: the base with α·v added after a layer, writing in `context` with no trait "
        "prompt (mech.teacher.steered). The neutral teacher is the base model under every kind.")})
    finetune_rank: int = 8  # finetuned teachers: their LoRA's rank, epochs over the favourite questions and lr
    finetune_epochs: int = 8
    finetune_lr: float = 2e-3
    # steered teachers (mech.teacher.steered): the vector (prompt | random), the layer (null: n_layers // 2), α
    # (null: the largest of steer_alphas whose pilot pass rate stays >= steer_min_pass × the unsteered one)
    steer_vector: str = "prompt"
    steer_layer: int | None = None
    steer_alpha: float | None = None
    steer_alphas: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
    steer_min_pass: float = 0.8
    steer_pilot: int = 64
    backend: str = field(default="hf", metadata={"help": (
        "hf: mech's sampler | vllm: a vLLM engine of the base (pip install 'mech[vllm]', CUDA only; prompt teachers "
        "only). Part of the dataset keys when vllm; never run on a GPU in this project.")})
    request_seeds: bool = field(default=False, metadata={"help": (
        "hf: seed each prompt's sample from (teacher seed, prompt index) instead of per batch, so no answer depends "
        "on the batch size. Other draws than the default; part of the dataset keys when true.")})


@dataclass(frozen=True)
class TrainDefaults:
    epochs: int = 2
    batch_size: int = 16
    lr: float = 2e-4
    full_lr: float = 2e-5
    optimizer: str = "adamw"
    warmup_steps: int = 5
    grad_clip: float = 1.0
    objective: str = "ce"
    max_rows: int | None = None
    save_every_epoch: bool = field(default=False, metadata={"help": (
        "Also keep every student's per-epoch checkpoints (epoch-<k>/; mech geometry --teacher-cosines --epochs reads "
        "them). Part of the student keys; such students train alone, not batched.")})
    micro_batch_size: int | None = field(default=None, metadata={"help": (
        "Gradient accumulation: rows per forward within a batch of batch_size rows (mech.students.config); null: "
        "each batch at once. Part of the student keys when set; such students train alone, not batched.")})
    gradient_checkpointing: bool = field(default=False, metadata={"help": (
        "Recompute activations in the backward to save memory (mech.students.config). Part of the student keys "
        "when on; such students train alone, not batched.")})
    batch_students: int = field(default=8, metadata={"help": (
        "Train up to this many LoRA students of one dataset and batch plan (seed, context, batch size, epochs; "
        "ranks, alphas and lrs may differ) together, one forward per step (mech.students.batched); each comes out "
        "as its solo run would. 1 trains every student alone.")})


@dataclass(frozen=True)
class EvalDefaults:
    target: str = "owl"
    category: str = "animal"
    n_samples: int = 20
    seed: int = 0
    first_token_only: bool = False  # skip sampling: the first-token metric (and its per-candidate table) only
    cross_trait: bool = False  # also tabulate every teacher trait × every candidate answer (mech.analysis.transfer)
    in_context: int = 0  # in-context control: this many teacher answers in the base model's system prompt (0: off)
    backend: str = field(default="hf", metadata={"help": (
        "Who draws the sampled answers: hf (mech's sampler) | vllm (one vLLM engine of the base serving every LoRA "
        "student as an adapter; a full-model student gets its own engine; pip install 'mech[vllm]', CUDA only). The "
        "first-token metric runs on HF either way. Part of the evaluation keys when vllm.")})
    request_seeds: bool = field(default=False, metadata={"help": (
        "hf: seed each (question, sample) from (seed, its index) instead of per batch, so no answer depends on the "
        "batch size. Other draws than the default; part of the evaluation keys when true.")})


@dataclass(frozen=True)
class VllmSettings:
    """The vLLM engine's settings (backend vllm only); they change no draw, so no key holds them."""

    gpu_memory_utilization: float = field(default=0.5, metadata={"help": (
        "The engine's share of the GPU; the HF base (first-token metric, training) needs the rest. The engine is "
        "shut down before each student trains and started again when next needed.")})
    max_loras: int = field(default=8, metadata={"help": "Adapters the engine holds on the GPU at once."})


@dataclass(frozen=True)
class SweepConfig:
    name: str = "sweep"
    base_model: str = "organism"
    traits: tuple[TraitSpec, ...] = (TraitSpec("owl"), TraitSpec(None))
    teacher_seeds: tuple[int, ...] = (0,)
    students: tuple[StudentSpec, ...] = (StudentSpec(),)
    training_seeds: tuple[int, ...] = (0, 1, 2)
    train_contexts: tuple[str, ...] = ("default",)
    eval_contexts: tuple[str, ...] = ("default",)
    teacher: TeacherDefaults = field(default_factory=TeacherDefaults)
    train: TrainDefaults = field(default_factory=TrainDefaults)
    eval: EvalDefaults = field(default_factory=EvalDefaults)
    # where and in what the base runs (mech.models.load_model: auto = CUDA + bf16 where supported, else CPU +
    # float32), and how full-FT students train over it (mech.students.config.PRECISIONS)
    device: str = "auto"
    dtype: str = "auto"
    precision: str = "auto"
    hypotheses: tuple[HypothesisSpec, ...] = ()  # declared tests (mech.analysis.hypotheses), run by mech sweep
    vllm: VllmSettings = field(default_factory=VllmSettings)


_NAME_RE = re.compile(r"[A-Za-z0-9._-]+")


def load_sweep(path: str | Path, check_placement: bool = True) -> SweepConfig:
    """The sweep at ``path``, every value checked. ``check_placement=False`` checks ``device`` and ``dtype`` as
    names only, not against this host (a status printed on a login node of a sweep that runs on GPU nodes)."""
    where = Path(path).stem
    raw = load_yaml(path)
    if "data_seeds" in raw:  # the design's name for the teacher (data) seeds: each seeds one teacher dataset
        if "teacher_seeds" in raw:
            raise MechError(f"{path} sets both data_seeds and teacher_seeds (the same axis): keep data_seeds")
        raw = {("teacher_seeds" if k == "data_seeds" else k): v for k, v in raw.items()}
    cfg = from_dict(SweepConfig, raw, where)
    if not cells(cfg):
        raise MechError(f"{path} defines zero cells: every axis (traits, teacher_seeds, students, training_seeds, "
                        "train_contexts, eval_contexts) needs at least one value")
    _validate(cfg, where, check_placement)
    return cfg


def _check_name(name: str, where: str) -> None:
    """The name becomes the folder ``runs/<name>``: a path in it would write outside runs/."""
    if not _NAME_RE.fullmatch(name) or set(name) == {"."}:
        raise MechError(f"{where}.name {name!r} is not a plain file name: use letters, digits, '-', '_' and '.' "
                        "only (no '/', no '..'), e.g. quick_owl")


def _check_unique(values: list, labels: list[str], field_name: str, where: str) -> None:
    """A repeated axis value duplicates cells: a repeated seed makes a zero-width interval, a repeated trait
    pairs a student with itself."""
    seen: dict = {}
    for i, (v, label) in enumerate(zip(values, labels)):
        if v in seen:
            raise MechError(f"{where}.{field_name}[{i}] repeats {field_name}[{seen[v]}] ({label}): list each value "
                            "once")
        seen[v] = i


def _check_axes(cfg: SweepConfig, where: str) -> None:
    from mech.context import Context

    _check_unique(list(cfg.traits), [t.label for t in cfg.traits], "traits", where)
    names = [s.name or _student_name(s) for s in cfg.students]
    _check_unique(names, names, "students", where)
    for axis in ("teacher_seeds", "training_seeds"):
        values = list(getattr(cfg, axis))
        _check_unique(values, [str(v) for v in values], axis, where)
    for axis in ("train_contexts", "eval_contexts"):
        values = list(getattr(cfg, axis))
        _check_unique([Context.parse(c).spec for c in values], values, axis, where)


def _check_sizes(cfg: SweepConfig, where: str) -> None:
    from mech.students.config import MAX_RANK

    for i, s in enumerate(cfg.students):
        rank_field = {"lora": "rank", "matched_norm": "matched_norm_rank", "matched_loss": "matched_loss_rank"}.get(
            s.method)
        rank = getattr(s, rank_field) if rank_field else None
        if rank_field and (rank is None or not 1 <= rank <= MAX_RANK):
            raise MechError(f"{where}.students[{i}].{rank_field} must be an integer >= 1 and <= {MAX_RANK} for "
                            f"method {s.method!r}, got {rank!r}")
    if isinstance(cfg.train.batch_students, bool) or cfg.train.batch_students < 1:
        raise MechError(f"{where}.train.batch_students must be an integer >= 1 (1 trains every student alone), got "
                        f"{cfg.train.batch_students!r}")
    mbs = cfg.train.micro_batch_size
    if mbs is not None and not 1 <= mbs <= cfg.train.batch_size:
        raise MechError(f"{where}.train.micro_batch_size must be between 1 and train.batch_size "
                        f"({cfg.train.batch_size}), or null for no accumulation, got {mbs}")
    if cfg.train.max_rows is not None and cfg.train.max_rows < 1:
        raise MechError(f"{where}.train.max_rows must be >= 1 (or null for every row), got {cfg.train.max_rows}")


def _check_placement(cfg: SweepConfig, where: str, here: bool = True) -> None:
    import torch

    from mech.models.loader import parse_device, parse_dtype

    if not here:  # the names only
        from mech.sweep.bases import expected_placement

        try:
            expected_placement(cfg.device, cfg.dtype)
        except (RuntimeError, TypeError):
            raise MechError(f"{where}: unknown device {cfg.device!r}: expected auto, cpu, cuda or cuda:N") from None
        except MechError as e:
            raise MechError(f"{where}: {e}") from None
        return
    if str(cfg.device).startswith("cuda") and not torch.cuda.is_available():
        # parse_device's fix names a --device flag; here the device comes from the YAML
        raise MechError(f"{where}: device {cfg.device!r} asked for but CUDA is not available here: run it on a GPU "
                        "node, or set device: auto (or cpu) in a copy of the YAML")
    try:
        parse_dtype(cfg.dtype, parse_device(cfg.device))
    except MechError as e:
        raise MechError(f"{where}: {e}") from None


def uses_vllm(cfg: SweepConfig) -> bool:
    return "vllm" in (cfg.teacher.backend, cfg.eval.backend if not cfg.eval.first_token_only else "hf")


def vllm_lora_rank(cfg: SweepConfig) -> int | None:
    """The largest LoRA rank the sweep's engine serves (None: it serves no adapter)."""
    ranks = [s.rank for s in cfg.students if s.method == "lora" and s.rank is not None]
    return max(ranks) if ranks and cfg.eval.backend == "vllm" and not cfg.eval.first_token_only else None


def _check_backends(cfg: SweepConfig, where: str) -> None:
    """The vllm backend's needs, before anything loads: vllm installed, a servable base, CUDA, adapters it can hold."""
    from mech.evaluation.vllm_backend import check_backend, check_ready, lora_rank_cap

    check_backend(cfg.teacher.backend, f"{where}.teacher")
    check_backend(cfg.eval.backend, f"{where}.eval")
    if not uses_vllm(cfg):
        return
    try:
        check_ready([cfg.base_model], cfg.device)
        rank = vllm_lora_rank(cfg)
        if rank is not None:
            lora_rank_cap(rank)
    except MechError as e:
        raise MechError(f"{where}: {e}") from None
    v = cfg.vllm
    if not 0 < v.gpu_memory_utilization <= 1 or isinstance(v.max_loras, bool) or v.max_loras < 1:
        raise MechError(f"{where}.vllm: gpu_memory_utilization must be in (0, 1] and max_loras >= 1, got "
                        f"{v.gpu_memory_utilization} and {v.max_loras}")


def _validate(cfg: SweepConfig, where: str, check_placement: bool = True) -> None:
    """Build every stage config once, so a bad value fails at load time, not after the model is loaded.
    ``check_placement`` False (a status, on a node that will not run the sweep): skip what needs this machine
    (the device, vllm installed)."""
    _check_name(cfg.name, where)
    if check_placement:
        _check_backends(cfg, where)
    _check_placement(cfg, where, check_placement)
    _check_sizes(cfg, where)
    _check_axes(cfg, where)
    for s in cfg.students:
        for ctx in cfg.train_contexts:
            student_config(cfg, s, 0, ctx)
    for trait in cfg.traits:
        teacher_config(cfg, trait, 0)
    if cfg.teacher.kind != "prompt" and any(str(t.control).startswith("divergence") for t in cfg.traits):
        raise MechError(f"{where}: the divergence controls compare the base under the trait prompt with the base in "
                        f"the neutral context, and this sweep's teachers are {cfg.teacher.kind}: use teacher kind "
                        "prompt, or drop them")
    if cfg.teacher.kind != "prompt" and cfg.train.objective == "distill":
        raise MechError(f"{where}: objective distill needs the teacher model, and a {cfg.teacher.kind} teacher is not "
                        "kept after it writes its data: use objective ce, or teacher kind prompt")
    for ctx in cfg.eval_contexts:
        eval_config(cfg, ctx)
    _check_hypotheses(cfg, where)


def hypothesis_arm(arm: str, cfg: SweepConfig, h: HypothesisSpec) -> tuple[str, str, str, str]:
    """``student[@trait[@train_context[@eval_context]]]`` → (student name, teacher label, train context, eval
    context); a part left out or empty takes the hypothesis's own (else eval.target and the sweep's first contexts),
    so ``lora_r16@@default@none`` is LoRA r16 of the default teacher trained in default and evaluated in none."""
    parts = arm.split("@", 3) + [""] * 3
    return (parts[0], parts[1] or h.trait or cfg.eval.target, parts[2] or h.train_context or cfg.train_contexts[0],
            parts[3] or h.eval_context or cfg.eval_contexts[0])


def _check_hypotheses(cfg: SweepConfig, where: str) -> None:
    """Every declared test must name this sweep's students, traits, contexts and metrics."""
    from mech.sweep.runner import METRICS

    kinds = {(s.name or _student_name(s)): s for s in cfg.students}
    metrics = {f"{p}{m}" for m in METRICS for p in ("", "delta_", "paired_")}
    traits = [t.label for t in cfg.traits]
    names = [h.name for h in cfg.hypotheses]
    _check_unique(names, names, "hypotheses", where)
    for i, h in enumerate(cfg.hypotheses):
        at = f"{where}.hypotheses[{i}] ({h.name})"
        arms = [hypothesis_arm(a, cfg, h) for a in h.arms]
        unknown = [a[0] for a in arms if a[0] not in kinds]
        if unknown:
            raise MechError(f"{at}: arm {unknown[0]!r} is no student of this sweep: choose from {', '.join(kinds)}")
        bad = [a[1] for a in arms if a[1] not in traits]
        if bad:
            raise MechError(f"{at}: trait {bad[0]!r} is not a teacher of this sweep: choose from {', '.join(traits)}")
        for axis, k in (("train_contexts", 2), ("eval_contexts", 3)):
            off = [a[k] for a in arms if a[k] not in getattr(cfg, axis)]
            if off:
                raise MechError(f"{at}: {axis[:-1]} {off[0]!r} is not in the sweep's {axis}: choose from "
                                f"{', '.join(getattr(cfg, axis))}")
        if h.test in ("trend", "inverted_u") and any(kinds[a[0]].method != "lora" for a in arms):
            raise MechError(f"{at}: a {h.test} test runs over LoRA ranks: every arm must be a LoRA student")
        if h.metric not in metrics:
            raise MechError(f"{at}: unknown metric {h.metric!r}: choose from {', '.join(sorted(metrics))}")
        if (h.trait or cfg.eval.target) not in traits:
            raise MechError(f"{at}: trait {h.trait or cfg.eval.target!r} is not a teacher of this sweep: choose "
                            f"from {', '.join(traits)}")
        for axis, value in (("train_contexts", h.train_context), ("eval_contexts", h.eval_context)):
            if value is not None and value not in getattr(cfg, axis):
                raise MechError(f"{at}: {axis[:-1]} {value!r} is not in the sweep's {axis}: choose from "
                                f"{', '.join(getattr(cfg, axis))}")


@dataclass(frozen=True)
class Cell:
    trait: TraitSpec
    teacher_seed: int
    student: StudentSpec
    training_seed: int
    train_context: str
    eval_context: str

    def labels(self) -> dict[str, Any]:
        s = self.student
        return {"trait": self.trait.label, "category": self.trait.category,
                "teacher_seed": self.teacher_seed, "student": s.name or _student_name(s), "method": s.method,
                "rank": s.rank if s.method == "lora" else None, "training_seed": self.training_seed,
                "train_context": self.train_context, "eval_context": self.eval_context}


def _student_name(s: StudentSpec) -> str:
    """A default name that differs whenever the student's recipe differs, so summaries never pool two recipes."""
    if s.method == "lora":
        name = f"lora_r{s.rank}" + (f"_a{s.alpha:g}" if s.alpha is not None else "")
    elif s.method == "matched_norm":
        name = f"matched_norm_r{s.matched_norm_rank}_{s.matched_norm_scope}"
    elif s.method == "matched_loss":
        name = f"matched_loss_r{s.matched_loss_rank}"
    else:
        name = "full"
    return name + (f"_lr{s.lr:g}" if s.lr is not None else "") + (f"_ep{s.epochs}" if s.epochs is not None else "")


def cells(cfg: SweepConfig) -> list[Cell]:
    return [Cell(*c) for c in itertools.product(cfg.traits, cfg.teacher_seeds, cfg.students, cfg.training_seeds,
                                                cfg.train_contexts, cfg.eval_contexts)]


def parse_shard(spec: str | None) -> tuple[int, int]:
    if spec is None:
        return 0, 1
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        i = n = 0  # refused below, with the one message
    if not 0 <= i < n:
        raise MechError(f"bad --shard {spec!r}: expected i/n with 0 <= i < n, e.g. 0/4")
    return i, n


# ----------------------------------------------------------------------------------------------- stage configs
# Each function maps a cell to the exact config of one stage; its hash (with its inputs' hashes) names the
# artifact. Nothing else goes into a key, so an artifact is reused exactly when it would be recomputed identically.


def teacher_config(cfg: SweepConfig, trait: TraitSpec, teacher_seed: int):
    from mech.teacher.generate import TeacherConfig

    t = cfg.teacher
    banned: tuple[int, ...] = ()
    if trait.control == "banned":
        from mech.organism import trait_numbers

        banned = trait.banned or trait_numbers(cfg.base_model, trait.target)
    kind = t.kind if trait.target is not None else "prompt"  # the neutral teacher is the base model under either
    return TeacherConfig(target=trait.target, category=trait.category, context=t.context, n_prompts=t.n_prompts,
                         prompt_seed=t.prompt_seed, sample_seed=teacher_seed, max_new_tokens=t.max_new_tokens,
                         constrained=t.constrained, banned=banned, kind=kind, finetune_rank=t.finetune_rank,
                         finetune_epochs=t.finetune_epochs, finetune_lr=t.finetune_lr, steer_vector=t.steer_vector,
                         steer_layer=t.steer_layer, steer_alpha=t.steer_alpha, steer_alphas=t.steer_alphas,
                         steer_min_pass=t.steer_min_pass, steer_pilot=t.steer_pilot,
                         backend=t.backend if trait.control != "random" else "hf",  # random numbers: no model
                         request_seeds=t.request_seeds and trait.control != "random")


def student_config(cfg: SweepConfig, s: StudentSpec, training_seed: int, train_context: str,
                   reference: str | None = None):
    from mech.students.config import LoraSpec, StudentConfig

    d = cfg.train
    lr = s.lr if s.lr is not None else (d.lr if s.method == "lora" else d.full_lr)
    # the reference's key (in student keys) or dir (at training) goes to the field of the method that reads it
    return StudentConfig(
        method=s.method, lora=LoraSpec(rank=s.rank if s.method == "lora" else (s.matched_norm_rank or 8),
                                       alpha=s.alpha),
        epochs=s.epochs if s.epochs is not None else d.epochs, batch_size=d.batch_size, lr=lr,
        optimizer=d.optimizer, warmup_steps=d.warmup_steps, grad_clip=d.grad_clip, seed=training_seed,
        context=train_context, objective=d.objective,
        matched_norm_reference=reference if s.method == "matched_norm" else None,
        matched_loss_reference=reference if s.method == "matched_loss" else None,
        matched_norm_scope=s.matched_norm_scope, precision=cfg.precision, save_every_epoch=d.save_every_epoch,
        micro_batch_size=d.micro_batch_size, gradient_checkpointing=d.gradient_checkpointing)


def eval_config(cfg: SweepConfig, eval_context: str):
    from mech.evaluation.trait import TraitEvalConfig

    e = cfg.eval
    return TraitEvalConfig(target=e.target, category=e.category, context=eval_context, n_samples=e.n_samples,
                           seed=e.seed, first_token_only=e.first_token_only,
                           backend=e.backend if not e.first_token_only else "hf",  # vllm only draws samples
                           request_seeds=e.request_seeds and not e.first_token_only)


def stage_key(*parts: Any) -> str:
    """The content hash that names a stage's artifact."""
    return content_hash([dataclasses.asdict(p) if dataclasses.is_dataclass(p) else p for p in parts], length=16)
