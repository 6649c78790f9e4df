"""The optional vLLM backend, driven by a fake ``vllm`` package (vllm itself needs a GPU and is not installed here).

Two fakes stand in for ``vllm.LLM``: ``RecordingLLM`` answers from a rule and records what it was given (prompt ids,
sampling params, LoRA requests); ``HFLLM`` really samples, one request at a time with mech's HF sampler seeded by
the request's seed (+ k for the k-th of n), applying LoRA requests with PEFT and structured-output regexes by
partial matching, so a teacher dataset and a sweep can run end to end through the vllm path.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import sys
import types
from pathlib import Path

import pytest
import regex
import torch
import yaml

from mech.cli import main
from mech.context import Context, render
from mech.errors import MechError
from mech.evaluation import vllm_backend as vb
from mech.evaluation.inference import decode_answer, stop_ids
from mech.evaluation.scoring import mentions
from mech.evaluation.trait import TraitEvalConfig, evaluate_trait
from mech.resources import questions
from mech.sweep.config import SweepConfig, TraitSpec, eval_config, load_sweep, stage_key, teacher_config
from mech.teacher.constrained import allowed_text, complete, number_regex, separators
from mech.teacher.generate import TeacherConfig, generate

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------ the fake vllm


@dataclasses.dataclass
class SamplingParams:  # the fields mech sets, with vLLM's names and defaults
    n: int = 1
    temperature: float = 1.0
    max_tokens: int | None = 16
    seed: int | None = None
    stop_token_ids: list | None = None
    detokenize: bool = True
    structured_outputs: object = None


@dataclasses.dataclass
class StructuredOutputsParams:
    regex: str | None = None


@dataclasses.dataclass(frozen=True)
class LoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str


@dataclasses.dataclass
class CompletionOutput:
    index: int
    token_ids: list
    finish_reason: str | None
    text: str = ""


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list
    outputs: list


class RecordingLLM:
    """Answers request r's k-th sample with tokens drawn from random.Random(seed + k) over ``WORDS`` (``NUMBER``
    under a structured output), then a stop token; returned in reverse index order (mech must sort by index)."""

    instances: list["RecordingLLM"] = []
    WORDS: list[int] = []
    STOP = NUMBER = 0

    def __init__(self, model: str, **kwargs):
        self.model, self.kwargs, self.calls = model, kwargs, []
        RecordingLLM.instances.append(self)

    def generate(self, prompts, sampling_params, *, lora_request=None, use_tqdm=True):
        self.calls.append({"prompts": [list(p["prompt_token_ids"]) for p in prompts], "params": list(sampling_params),
                           "lora": lora_request})
        outs = []
        for r, (p, sp) in enumerate(zip(prompts, sampling_params)):
            comps = []
            for k in range(sp.n):
                rng = random.Random(sp.seed + k)
                ids = [rng.choice(self.WORDS) for _ in range(rng.randint(1, sp.max_tokens - 1))]
                if sp.structured_outputs is not None:  # a number, as the grammar wants
                    ids = [self.NUMBER]
                comps.append(CompletionOutput(k, ids + [self.STOP, self.WORDS[0]], "stop"))  # nothing after a stop counts
            outs.append(RequestOutput(str(r), list(p["prompt_token_ids"]), comps[::-1]))
        return outs


class RegexMask:
    """A structured-output regex as a logits processor: a token is allowed when the text so far plus its text can
    still match (``regex``'s partial matching); a stop token once the text matches in full."""

    def __init__(self, pattern: str, tokenizer, stops):
        self.rx = regex.compile(pattern)
        size = len(tokenizer)
        self.texts = tokenizer.batch_decode([[i] for i in range(size)], skip_special_tokens=False,
                                            clean_up_tokenization_spaces=False)
        self.cand = [i for i, t in enumerate(self.texts) if allowed_text(t)]  # the regex's alphabet, no other
        self.stops, self.cache = sorted(stops), {}

    def allowed(self, text: str) -> list[int]:
        if text not in self.cache:
            ok = [t for t in self.cand if self.rx.fullmatch(text + self.texts[t], partial=True)]
            self.cache[text] = ok + (self.stops if self.rx.fullmatch(text) else [])
        return self.cache[text]

    def __call__(self, logits, tokens):
        keep = torch.zeros(logits.shape, dtype=torch.bool)
        for r, row in enumerate(tokens):
            keep[r, self.allowed("".join(self.texts[t] for t in row if t not in self.stops))] = True
        return logits.masked_fill(~keep, float("-inf"))


class HFLLM(RecordingLLM):
    """Samples for real: each request alone through mech's HF sampler, seeded by its own seed (+ k)."""

    def __init__(self, model: str, **kwargs):
        from mech.models import load_model

        super().__init__(model, **kwargs)
        self.loaded = load_model(model, device="cpu")
        self.students: dict[str, object] = {}

    def _model(self, lora):
        from mech.students.store import load_student

        if lora is None:
            return self.loaded.model
        assert self.kwargs.get("enable_lora"), "a LoRA request on an engine built without enable_lora"
        if lora.lora_path not in self.students:
            self.students[lora.lora_path] = load_student(self.loaded.model, lora.lora_path)
        return self.students[lora.lora_path]

    def generate(self, prompts, sampling_params, *, lora_request=None, use_tqdm=True):
        from mech.evaluation.inference import sample

        self.calls.append({"prompts": [list(p["prompt_token_ids"]) for p in prompts], "params": list(sampling_params),
                           "lora": lora_request})
        model, tok = self._model(lora_request), self.loaded.tokenizer
        outs = []
        for r, (p, sp) in enumerate(zip(prompts, sampling_params)):
            stops = set(sp.stop_token_ids)
            so = sp.structured_outputs
            process = RegexMask(so.regex, tok, stops) if so is not None else None
            comps = []
            for k in range(sp.n):
                ids = sample(model, [list(p["prompt_token_ids"])], seed=sp.seed + k, max_new_tokens=sp.max_tokens,
                             eos_id=tok.eos_token_id, pad_id=tok.pad_token_id or 0, temperature=sp.temperature,
                             process=process)[0]
                cut = next((i for i, t in enumerate(ids) if t in stops), None)
                comps.append(CompletionOutput(k, ids if cut is None else ids[:cut + 1],
                                              "length" if cut is None else "stop"))
            outs.append(RequestOutput(str(r), list(p["prompt_token_ids"]), comps))
        return outs


def install_fake(monkeypatch, llm_cls, cuda: bool = False) -> None:
    """A ``vllm`` package with LLM, SamplingParams, inputs.TokensPrompt, lora.request.LoRARequest and
    sampling_params.StructuredOutputsParams, as mech imports them; ``cuda``: torch says CUDA is there (for the
    backend's checks only: nothing may load then)."""
    pkg = types.ModuleType("vllm")
    pkg.LLM, pkg.SamplingParams = llm_cls, SamplingParams
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = lambda **kw: dict(kw)  # a TypedDict in vLLM
    lora, request = types.ModuleType("vllm.lora"), types.ModuleType("vllm.lora.request")
    request.LoRARequest = LoRARequest
    sp = types.ModuleType("vllm.sampling_params")
    sp.StructuredOutputsParams, sp.SamplingParams = StructuredOutputsParams, SamplingParams
    for name, mod in {"vllm": pkg, "vllm.inputs": inputs, "vllm.lora": lora, "vllm.lora.request": request,
                      "vllm.sampling_params": sp}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    if cuda:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(RecordingLLM, "instances", [])


@pytest.fixture
def organism():
    from mech.models import load_model

    return load_model("organism", device="cpu")


@pytest.fixture
def recording(monkeypatch, organism):
    install_fake(monkeypatch, RecordingLLM)
    tok = organism.tokenizer
    RecordingLLM.WORDS = [tok.convert_tokens_to_ids(t) for t in tok.tokenize(" owl cat dog 12 7")]
    RecordingLLM.STOP = tok.eos_token_id
    (RecordingLLM.NUMBER,) = tok.encode("7", add_special_tokens=False)
    return organism


def served_base(organism, lora_rank=None):
    return vb.Served(vb.engine_for("organism", organism.dtype, lora_rank=lora_rank))


# ------------------------------------------------------------------------------------------------ keys


def test_default_backend_leaves_every_key_and_dict_as_before():
    """Hashes computed on main before backends existed: the defaults give the same dataset and evaluation keys."""
    cfg = SweepConfig()
    assert stage_key("eval", "base-x", eval_config(cfg, "default").to_dict()) == "739bd8b03d0edfa4"
    assert stage_key("dataset", "fp", teacher_config(cfg, TraitSpec("owl"), 0).to_dict()) == "eeafd6416d3050f7"
    assert stage_key("dataset", "fp", teacher_config(cfg, TraitSpec(None), 3).to_dict()) == "9adcfb26fe5e6f62"
    legacy = TeacherConfig(target="owl", constrained=True, batch_size=8)
    assert stage_key("dataset", "fp", legacy.to_dict()) == "23830f880096fd57"
    assert "backend" not in TeacherConfig().to_dict() and "backend" not in TraitEvalConfig().to_dict()


def test_vllm_is_in_the_keys_and_batch_size_is_not():
    hf, vl = TeacherConfig(target="owl"), TeacherConfig(target="owl", backend="vllm")
    assert vl.to_dict()["backend"] == "vllm" and "batch_size" not in vl.to_dict()
    assert stage_key("dataset", "fp", vl.to_dict()) != stage_key("dataset", "fp", hf.to_dict())
    # a vLLM request's seed is its index: the batch size changes no answer and no key
    assert TeacherConfig(target="owl", backend="vllm", batch_size=7).to_dict() == vl.to_dict()
    assert TraitEvalConfig(backend="vllm").to_dict() != TraitEvalConfig().to_dict()
    # first-token-only evaluations draw nothing, so a sweep keys them as hf whatever eval.backend says
    cfg = SweepConfig(eval=dataclasses.replace(SweepConfig().eval, backend="vllm", first_token_only=True))
    assert eval_config(cfg, "default").backend == "hf"
    # the random-numbers control asks no model
    cfg = SweepConfig(teacher=dataclasses.replace(SweepConfig().teacher, backend="vllm"))
    assert teacher_config(cfg, TraitSpec("owl", control="random"), 0).backend == "hf"
    assert teacher_config(cfg, TraitSpec("owl"), 0).backend == "vllm"


# ------------------------------------------------------------------------------------------------ refusals


def test_missing_vllm_is_one_line_exit_2_and_nothing_written(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    out = tmp_path / "ds"
    assert main(["teacher", "--neutral", "--n-prompts", "2", "--backend", "vllm", "--out", str(out)]) == 2
    assert main(["eval", "organism", "--target", "owl", "--backend", "vllm", "--json", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"mech: error: {vb.MISSING}"] * 2
    assert vb.MISSING == "vllm is not installed: pip install 'mech[vllm]' (GPU machines only)"
    assert list(tmp_path.iterdir()) == []


def test_sweep_with_vllm_and_no_vllm_fails_at_load(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", None)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"eval": {"backend": "vllm"}}))
    with pytest.raises(MechError, match="vllm is not installed"):
        load_sweep(path)
    path.write_text(yaml.safe_dump({"eval": {"backend": "vllm", "first_token_only": True}}))
    load_sweep(path)  # draws nothing through vllm: no engine needed


def test_refusals(monkeypatch, tmp_path):
    install_fake(monkeypatch, RecordingLLM, cuda=True)
    with pytest.raises(MechError, match="GGUF"):
        vb.model_source("smollm2-135m")
    with pytest.raises(MechError, match="unknown"):
        TraitEvalConfig(backend="tpu")
    for kind in ("finetuned", "steer"):
        with pytest.raises(MechError, match=f"a {kind} teacher .* use backend hf"):
            TeacherConfig(target="owl", kind=kind, backend="vllm")
    with pytest.raises(MechError, match="CUDA"):
        vb.check_ready(["organism"], "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MechError, match="CUDA"):
        vb.check_ready(["organism"])
    assert [vb.lora_rank_cap(r) for r in (1, 2, 8, 9, 300, 512)] == [1, 8, 8, 16, 320, 512]
    with pytest.raises(MechError, match="512"):
        vb.lora_rank_cap(1024)


def test_vllm_eval_needs_its_engine_and_hf_refuses_one(recording):
    with pytest.raises(MechError, match="pass served"):
        evaluate_trait(recording.model, recording.tokenizer, TraitEvalConfig(n_samples=1, backend="vllm"))
    with pytest.raises(MechError, match="does not sample with it"):
        evaluate_trait(recording.model, recording.tokenizer, TraitEvalConfig(n_samples=1), served=served_base(recording))


# ------------------------------------------------------------------------------------------------ what the engine is given


def test_eval_sends_the_hf_rendered_ids_and_the_configs_params(recording):
    tok = recording.tokenizer
    cfg = TraitEvalConfig(target="owl", n_samples=5, seed=3, temperature=0.7, max_new_tokens=6, backend="vllm")
    served = served_base(recording)
    res = evaluate_trait(recording.model, tok, cfg, served=served)
    (llm,) = RecordingLLM.instances
    assert llm.model == str(Path(vb.model_source("organism"))) and llm.kwargs["dtype"] == "float32"
    assert "enable_lora" not in llm.kwargs
    (call,) = llm.calls
    qs = questions("animal")
    assert call["prompts"] == [render(tok, Context.parse("default"), q).input_ids for q in qs]
    assert call["lora"] is None
    for q, sp in enumerate(call["params"]):
        assert (sp.n, sp.temperature, sp.max_tokens) == (5, 0.7, 6)
        assert sp.seed == vb.request_seed("eval", 3, q) and sp.stop_token_ids == sorted(stop_ids(tok))
        assert sp.structured_outputs is None and sp.detokenize is False
    # the answers are the fake's tokens up to the stop, decoded by decode_answer, in sample order, scored as HF's
    want = []
    for q, sp in enumerate(call["params"]):
        row = []
        for k in range(5):
            rng = random.Random(sp.seed + k)
            row.append(decode_answer(tok, [rng.choice(RecordingLLM.WORDS) for _ in range(rng.randint(1, 5))]))
        want.append(row)
    assert res.answers == want and res.n_answers == 5 * len(qs)
    assert res.rate == sum(mentions(a, "owl") for r in want for a in r) / res.n_answers
    assert res.config["backend"] == "vllm"


def test_a_requests_seed_is_its_index_whatever_the_batch(recording, monkeypatch, tmp_path):
    from mech.teacher import generate as gen

    served = served_base(recording)
    cfg = TeacherConfig(target="owl", n_prompts=10, max_new_tokens=8, sample_seed=4, backend="vllm")
    generate(recording.model, recording.tokenizer, cfg, tmp_path / "one", served=served)
    monkeypatch.setattr(gen, "VLLM_CHUNK", 3)
    generate(recording.model, recording.tokenizer, cfg, tmp_path / "four", served=served)
    (llm,) = RecordingLLM.instances
    assert [len(c["prompts"]) for c in llm.calls] == [10, 3, 3, 3, 1]
    seeds = [[sp.seed for sp in c["params"]] for c in llm.calls]
    assert seeds[0] == list(itertools.chain(*seeds[1:])) == [vb.request_seed("teacher", 4, i) for i in range(10)]
    assert all(sp.n == 1 and sp.max_tokens == 8 for c in llm.calls for sp in c["params"])
    assert (tmp_path / "one" / "raw.jsonl").read_bytes() == (tmp_path / "four" / "raw.jsonl").read_bytes()


def test_the_constrained_teacher_sends_the_grammar_as_a_regex(recording, tmp_path):
    cfg = TeacherConfig(target="owl", n_prompts=2, answer_count=4, max_value=250, constrained=True, backend="vllm")
    generate(recording.model, recording.tokenizer, cfg, tmp_path / "ds", served=served_base(recording))
    (call,) = RecordingLLM.instances[0].calls
    assert {sp.structured_outputs.regex for sp in call["params"]} == {number_regex(4, 250)}


def test_adapters_are_lora_requests_on_one_engine_with_stable_ids(recording, tmp_path):
    dirs = []
    for name, r in (("a", 4), ("b", 16)):
        d = tmp_path / name
        d.mkdir()
        (d / "adapter_config.json").write_text(f'{{"r": {r}}}')
        dirs.append(d)
    engine = vb.engine_for("organism", torch.bfloat16, lora_rank=16, max_loras=3)
    ids = [vb.Served(engine, d).sample([[1, 2]], tag="eval", seed=0, n=2, temperature=1.0, max_tokens=4, stops={2})
           for d in dirs + dirs[:1]]
    (llm,) = RecordingLLM.instances
    assert (llm.kwargs["enable_lora"], llm.kwargs["max_lora_rank"], llm.kwargs["max_loras"]) == (True, 16, 3)
    assert llm.kwargs["dtype"] == "bfloat16"
    assert [c["lora"] for c in llm.calls] == [LoRARequest(str(d.resolve()), i, str(d.resolve()))
                                             for d, i in ((dirs[0], 1), (dirs[1], 2), (dirs[0], 1))]
    assert ids[0] == ids[2] and len(ids[0]) == 2
    big = tmp_path / "big"
    big.mkdir()
    (big / "adapter_config.json").write_text('{"r": 64}')
    with pytest.raises(MechError, match="max_lora_rank"):
        vb.Served(engine, big).sample([[1]], tag="eval", seed=0, n=1, temperature=1.0, max_tokens=2, stops={2})


# ------------------------------------------------------------------------------------------------ the grammar


def test_number_regex_is_the_number_grammar():
    """Full matches of the regex are exactly the answers the grammar lets a teacher finish, on answers built to pass
    and on one-character edits of them."""
    seps = separators()
    assert len(seps) == len(set(seps)) == 198
    rnd = random.Random(0)
    for count, top in ((10, 999), (3, 250), (2, 7), (4, 100)):
        rx = regex.compile(number_regex(count, top))
        checked = 0
        for _ in range(400):
            sep = rnd.choice(seps)
            nums = [str(rnd.randint(0, int(top * 1.3) + 1)).zfill(rnd.choice((1, 1, 2))) for _ in
                    range(rnd.randint(1, count + 1))]
            text = sep.join(nums)
            variants = [text, text + sep, text + rnd.choice(seps), text[:-1]]
            pos = rnd.randrange(len(text))
            variants.append(text[:pos] + rnd.choice("0123456789 ,;\n\t\rx") + text[pos + 1:])
            for v in variants:
                assert bool(rx.fullmatch(v)) == complete(v, count, top), (v, count, top)
                checked += complete(v, count, top)
        assert checked > 100  # many positives, not only rejections


# ------------------------------------------------------------------------------------------------ end to end


def test_a_teacher_dataset_through_the_vllm_path(monkeypatch, organism, tmp_path):
    """The fake that samples for real: a constrained teacher keeps every answer, as the HF grammar does."""
    from mech.teacher.dataset import load_dataset

    install_fake(monkeypatch, HFLLM)
    cfg = TeacherConfig(target="owl", n_prompts=6, max_new_tokens=40, constrained=True, backend="vllm")
    served = served_base(organism)
    ds = load_dataset(generate(organism.model, organism.tokenizer, cfg, tmp_path / "ds", served=served))
    assert len(ds.rows) == 6 and ds.meta["config"]["backend"] == "vllm"
    again = load_dataset(generate(organism.model, organism.tokenizer, cfg, tmp_path / "again", served=served))
    assert again.rows == ds.rows


def test_a_sweep_through_the_vllm_path(monkeypatch, tmp_path):
    """Teacher and evaluation through the (real-sampling) fake: one engine serves the base and every LoRA student
    after training; first-token metrics stay the HF model's."""
    from mech.report.sweep import run_sweep
    from mech.teacher.dataset import load_dataset
    from mech.teacher.filter import check_answer

    install_fake(monkeypatch, HFLLM)
    data = {"name": "v", "base_model": "organism", "traits": [{"target": "owl"}, {"target": None}],
            "students": [{"method": "lora", "rank": 1}], "training_seeds": [0],
            "teacher": {"n_prompts": 16, "max_new_tokens": 40, "backend": "vllm"},
            "train": {"epochs": 1, "batch_size": 8, "lr": 0.002}, "eval": {"n_samples": 2, "backend": "vllm"},
            "device": "cpu"}
    monkeypatch.setattr(vb, "check_ready", lambda specs, device="auto": None)  # the YAML's cpu is the fake's
    path = tmp_path / "v.yaml"
    path.write_text(yaml.safe_dump(data))
    res = run_sweep(load_sweep(path), tmp_path / "out", cache=tmp_path / "cache")
    assert res["computed"] == {"datasets": 2, "students": 2, "evals": 3}
    for ds_dir in (tmp_path / "cache" / "datasets").iterdir():
        ds = load_dataset(ds_dir)
        assert ds.meta["config"]["backend"] == "vllm" and ds.rows
        assert all(check_answer(r["messages"][-1]["content"]).ok for r in ds.rows)
    calls = [c for e in RecordingLLM.instances for c in e.calls]
    teacher = [c for c in calls if c["params"][0].n == 1]
    assert [(len(c["prompts"]), c["lora"]) for c in teacher] == [(16, None)] * 2
    evals = [c for c in calls if c["params"][0].n == 2]
    students = {str(p.resolve()) for p in (tmp_path / "cache" / "students").iterdir()}
    assert [c["lora"] is None for c in evals] == [True, False, False]
    assert {c["lora"].lora_path for c in evals[1:]} == students and len(students) == 2
    # one engine of the base at a time, LoRA-enabled for the students; shut down before each training
    assert len(RecordingLLM.instances) == 3
    assert all(e.model == vb.model_source("organism") and e.kwargs["max_lora_rank"] == 1
               for e in RecordingLLM.instances)
