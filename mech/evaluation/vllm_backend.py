"""The optional vLLM generation backend (``pip install 'mech[vllm]'``, GPU machines only).

The HF backend (``mech.evaluation.inference.sample``) is the default everywhere. ``backend: vllm`` sends teacher
sampling and the sampled part of trait evaluation to a vLLM engine instead; the first-token metric, training and
every intervention stay on the HF model. Its draws differ from HF's, so the backend is part of the dataset and
evaluation keys (left out of them when ``hf``, so existing keys never change).

- **One engine per model** (:class:`VllmEngine`): the base, with every LoRA student served as an adapter on it
  (multi-LoRA: a ``LoRARequest`` per student dir, each with its own int id). A full-model student is another model
  and gets its own engine.
- **The same contexts.** Prompts go in as token ids (``TokensPrompt``): exactly the ids the HF path renders. Answers
  come back as token ids and are decoded by mech's ``decode_answer`` with mech's stop ids.
- **Seeds per request.** Request ``i`` of a call is seeded by :func:`request_seed` ``(tag, seed, i)``, so an answer
  does not depend on which requests share its batch (vLLM gives the ``k``-th of ``n`` samples of a request the seed
  ``seed + k``). vLLM's kernels are not batch-invariant by default: logits can differ in the last bits with the batch,
  which a seed cannot fix (``VLLM_BATCH_INVARIANT=1`` asks vLLM for batch-invariant kernels where it has them).
- **The constrained teacher** runs as vLLM structured outputs with ``mech.teacher.constrained.number_regex``, the
  same language as its number grammar.

Not run on a GPU in this project: every test drives a fake ``vllm`` module (tests/test_vllm_backend.py).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from mech.errors import MechError
from mech.evaluation import inference

HF, VLLM = "hf", "vllm"
BACKENDS = (HF, VLLM)
MISSING = "vllm is not installed: pip install 'mech[vllm]' (GPU machines only)"
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM's LoRAConfig accepts
GPU_MEMORY = 0.5  # the engine's share of the GPU; the HF base (first-token metric, training) shares the card


def check_backend(backend: str, where: str) -> None:
    if backend not in BACKENDS:
        raise MechError(f"{where} backend {backend!r} is unknown: expected one of {', '.join(BACKENDS)}")


def require_vllm() -> Any:
    """The vllm module, or the one-line MechError that says how to install it."""
    try:
        import vllm
    except ImportError:
        raise MechError(MISSING) from None
    return vllm


def model_source(spec: str) -> str:
    """What ``vllm.LLM(model=...)`` is given for a mech model spec: a local dir's path or a hub id. A GGUF spec
    (smollm2-135m, a Q4_1 file) is refused: vLLM serves no LoRA on a GGUF model, and its dequantised weights are
    not the file's."""
    from mech.models.loader import resolve_spec

    resolved = resolve_spec(spec)
    if resolved.gguf_file:
        raise MechError(f"the vllm backend cannot serve {resolved.name} (a GGUF file; vLLM serves no LoRA adapters on "
                        "GGUF weights): use --backend hf, or an HF safetensors copy of the model")
    return str(resolved.path) if resolved.path is not None else resolved.name


def check_ready(specs: Sequence[str], device: str | None = "auto") -> None:
    """Everything the vllm backend needs that can be checked before a model loads: vllm importable, each model
    servable, and a CUDA device (vLLM's engine runs on GPUs)."""
    require_vllm()
    for spec in specs:
        model_source(spec)
    import torch

    if str(device) == "cpu" or not torch.cuda.is_available():
        raise MechError(f"the vllm backend runs on CUDA GPUs only (device {device!r}, CUDA available: "
                        f"{torch.cuda.is_available()}): use backend hf here")


def lora_rank_cap(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds an adapter of ``rank``."""
    for cap in LORA_RANKS:
        if rank <= cap:
            return cap
    raise MechError(f"LoRA rank {rank} is above vLLM's largest max_lora_rank ({LORA_RANKS[-1]}): evaluate these "
                    "students with backend hf")


def adapter_rank(adapter_dir: str | Path) -> int:
    """The rank ``r`` in a PEFT adapter dir's adapter_config.json."""
    from mech.models.loader import read_adapter_config

    r = read_adapter_config(adapter_dir).get("r")
    if not isinstance(r, int) or r < 1:
        raise MechError(f"{adapter_dir}/adapter_config.json has no rank r: pass a PEFT LoRA adapter dir")
    return r


def request_seed(tag: str, seed: int, index: int) -> int:
    """mech's one per-request seed (:func:`mech.evaluation.inference.request_seed`), tagged by the call's kind."""
    return inference.request_seed(seed, index, tag=f"vllm-{tag}")


# ------------------------------------------------------------------------------------------------ the engine


@dataclass
class VllmEngine:
    """One ``vllm.LLM`` serving ``model`` (a path or hub id), created on first use. ``max_lora_rank`` None: no LoRA."""

    model: str
    dtype: str = "bfloat16"
    seed: int = 0
    max_lora_rank: int | None = None
    max_loras: int = 8
    gpu_memory_utilization: float = GPU_MEMORY
    trust_remote_code: bool = False
    _llm: Any = field(default=None, repr=False)
    _adapters: dict[str, int] = field(default_factory=dict, repr=False)

    @property
    def llm(self) -> Any:
        if self._llm is None:
            vllm = require_vllm()
            lora = ({"enable_lora": True, "max_lora_rank": lora_rank_cap(self.max_lora_rank),
                     "max_loras": self.max_loras} if self.max_lora_rank is not None else {})
            self._llm = vllm.LLM(model=self.model, dtype=self.dtype, seed=self.seed,
                                 gpu_memory_utilization=self.gpu_memory_utilization,
                                 trust_remote_code=self.trust_remote_code, **lora)
        return self._llm

    def lora_request(self, adapter_dir: str | Path) -> Any:
        """The ``LoRARequest`` of a student adapter dir: its name is the dir, its int id the dir's number in this
        engine (1, 2, … in the order first asked; the same dir always gets the same id)."""
        if self.max_lora_rank is None:
            raise MechError(f"the vllm engine of {self.model} was built without LoRA: it cannot serve {adapter_dir}")
        rank = adapter_rank(adapter_dir)
        if rank > lora_rank_cap(self.max_lora_rank):
            raise MechError(f"adapter {adapter_dir} has rank {rank}, above this engine's max_lora_rank "
                            f"{lora_rank_cap(self.max_lora_rank)}")
        from vllm.lora.request import LoRARequest

        path = str(Path(adapter_dir).resolve())
        lora_id = self._adapters.setdefault(path, len(self._adapters) + 1)
        return LoRARequest(lora_name=path, lora_int_id=lora_id, lora_path=path)

    def generate(self, prompts: Sequence[Sequence[int]], seeds: Sequence[int], *, n: int, temperature: float,
                 max_tokens: int, stops: set[int], adapter: str | Path | None = None, regex: str | None = None
                 ) -> list[list[tuple[list[int], bool]]]:
        """Per prompt, its ``n`` samples in order: (token ids, ended at a stop token)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if len(seeds) != len(prompts):
            raise MechError(f"{len(prompts)} prompts but {len(seeds)} seeds: give each request its seed")
        structured = {}
        if regex is not None:
            from vllm.sampling_params import StructuredOutputsParams

            structured = {"structured_outputs": StructuredOutputsParams(regex=regex)}
        # SamplingParams' defaults are plain softmax, as mech's HF sampler: top_p 1, top_k off, no penalties
        params = [SamplingParams(n=n, temperature=temperature, max_tokens=max_tokens, seed=s,
                                 stop_token_ids=sorted(stops), detokenize=False, **structured) for s in seeds]
        lora = None if adapter is None else self.lora_request(adapter)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompts], params,
                                 lora_request=lora, use_tqdm=False)
        if len(outs) != len(prompts):
            raise MechError(f"vllm returned {len(outs)} outputs for {len(prompts)} prompts")
        result = []
        for out in outs:
            samples = sorted(out.outputs, key=lambda c: c.index)
            result.append([(list(c.token_ids), c.finish_reason == "stop" or any(t in stops for t in c.token_ids))
                           for c in samples])
        return result

    def close(self) -> None:
        """Shut the engine down and give its GPU memory back (a later use starts it again)."""
        if self._llm is None:
            return
        llm, self._llm = self._llm, None
        shutdown = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if shutdown is not None and hasattr(shutdown, "shutdown"):
            shutdown.shutdown()
        del llm
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@dataclass(frozen=True)
class Served:
    """A model as a vLLM engine serves it: the engine's own model (``adapter`` None) or a LoRA student on it."""

    engine: VllmEngine
    adapter: str | Path | None = None

    def sample(self, prompts: Sequence[Sequence[int]], *, tag: str, seed: int, n: int, temperature: float,
               max_tokens: int, stops: set[int], regex: str | None = None, first_index: int = 0
               ) -> list[tuple[list[int], bool]]:
        """``n`` samples per prompt, prompt-major, as (token ids, finished); prompt ``j`` is request
        ``first_index + j`` of the call (its seed: :func:`request_seed`), so splitting a call changes nothing."""
        seeds = [request_seed(tag, seed, first_index + j) for j in range(len(prompts))]
        per_prompt = self.engine.generate(prompts, seeds, n=n, temperature=temperature, max_tokens=max_tokens,
                                          stops=stops, adapter=self.adapter, regex=regex)
        return [s for samples in per_prompt for s in samples]


def engine_for(spec: str, dtype: Any, *, lora_rank: int | None = None, max_loras: int = 8, seed: int = 0,
               gpu_memory_utilization: float = GPU_MEMORY, trust_remote_code: bool = False) -> VllmEngine:
    """The engine of a mech model spec (or a full student's dir) in the HF model's dtype (a torch dtype or its name)."""
    return VllmEngine(model_source(spec), dtype=str(dtype).removeprefix("torch."), seed=seed, max_lora_rank=lora_rank,
                      max_loras=max_loras, gpu_memory_utilization=gpu_memory_utilization,
                      trust_remote_code=trust_remote_code)

