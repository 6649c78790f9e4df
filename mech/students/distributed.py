"""One student trained by several processes: ``torchrun`` / ``accelerate launch`` data parallelism.

The launcher sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; :func:`process_group` reads them,
joins the group (gloo on CPU, nccl on CUDA, each rank on ``cuda:LOCAL_RANK``) and yields a :class:`Dist`. Every
rank then loads the same base and rows and draws the same batch order; of each global batch it computes its own
rows, its loss weighted by its labelled tokens over the global batch's, so that :func:`sync` — the sum of the
gradients and of the loss over ranks — gives every rank the full batch's gradient and loss, and every rank takes
the same optimizer step.

Why an explicit all-reduce and not the ``DistributedDataParallel`` wrapper: a step is several micro-batches
(gradient accumulation) reduced once, which DDP needs ``no_sync`` for; DDP averages over ranks where the token
weighting needs a sum; the model keeps its own class and parameter names, so PEFT, saving and
:mod:`mech.models.surgery` see the same model as in one process; and DDP's hooks interact with activation
checkpointing (reentrant or unused-parameter modes). What it gives up is DDP's overlap of communication with the
backward: small for LoRA's adapters, and a 7B full finetuning needs sharding (FSDP) rather than DDP anyway.

FSDP (``Dist.fsdp``, ``mech train --fsdp``; full finetuning only): torch's FSDP2 ``fully_shard`` on every decoder
layer, then on the whole model, so each rank holds 1/world_size of the float32 master weights, their gradients
and the optimizer state, and a layer's full weights exist only while it computes. Its reduce-scatter sums the
gradients in the backward (divide factor 1: the token weights already make the sum the batch's gradient), so
:func:`sync` then sums the loss only. Its collectives run in every forward, so every rank runs the same number
of forwards in a step (:func:`mech.students.train._split` pads with zero-weight parts). Precision is mech's
``precision: auto``: float32 master weights, all-gathered in float32, computed under autocast to the base's dtype.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from mech.errors import MechError

BUCKET_ELEMENTS = 1 << 25  # gradients are reduced in flat buckets of at most this many elements (128 MB in fp32)
ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Dist:
    """This process's place in the group: its ``rank`` of ``world_size`` and the ``device`` it trains on."""

    rank: int
    world_size: int
    device: torch.device
    fsdp: bool = False  # shard the weights, gradients and optimizer state (FSDP2) instead of replicating them

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes the student and shows progress."""
        return self.rank == 0


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None and default is not None:
        return default
    try:
        value = int(raw or "")
    except ValueError:
        raise MechError(f"environment variable {name}={raw!r} is not an integer: launch with torchrun or "
                        "accelerate launch, which set it") from None
    if value < 0:
        raise MechError(f"environment variable {name}={value} is negative: launch with torchrun or accelerate launch")
    return value


def world_size() -> int:
    """The number of processes the launcher started (WORLD_SIZE; 1 when not launched)."""
    n = _env_int("WORLD_SIZE", 1)
    if n < 1:
        raise MechError(f"environment variable WORLD_SIZE={n}: expected >= 1")
    return n


def check_fsdp(fsdp: bool) -> None:
    """FSDP shards over processes: refused in a single one (mech train checks it before reading any data)."""
    if fsdp and world_size() == 1:
        raise MechError("--fsdp shards a student over processes, but this is one process: launch it with "
                        "torchrun --nproc-per-node N (or accelerate launch)")


@contextlib.contextmanager
def process_group(fsdp: bool = False) -> Iterator[Dist | None]:
    """Join the launcher's process group for the block (None when WORLD_SIZE is 1) and leave it after."""
    check_fsdp(fsdp)
    n = world_size()
    if n == 1:
        yield None
        return
    missing = [k for k in ENV if not os.environ.get(k)]
    if missing:
        raise MechError(f"WORLD_SIZE={n} but {', '.join(missing)} unset: launch with torchrun or accelerate launch")
    rank, local = _env_int("RANK"), _env_int("LOCAL_RANK")
    if rank >= n:
        raise MechError(f"RANK={rank} is not below WORLD_SIZE={n}: launch with torchrun or accelerate launch")
    if torch.cuda.is_available():
        if local >= torch.cuda.device_count():
            raise MechError(f"LOCAL_RANK={local} but only {torch.cuda.device_count()} GPUs are visible: start at most "
                            "one process per GPU (--nproc-per-node)")
        device, backend = torch.device("cuda", local), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    torch.distributed.init_process_group(backend, rank=rank, world_size=n, device_id=device if backend == "nccl" else None)
    try:
        yield Dist(rank, n, device, fsdp)
    finally:
        torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------------------------- collectives


def broadcast_params(params: Sequence[torch.nn.Parameter]) -> None:
    """Rank 0's values of ``params`` on every rank (they are equal already when every rank built the same
    student from the same seed; this makes it so whatever a device's kernels did)."""
    with torch.no_grad():
        for p in params:
            torch.distributed.broadcast(p.data, src=0)


def _all_reduce(tensors: list[torch.Tensor]) -> None:
    """Sum each tensor over ranks in place, one flat bucket of one dtype at a time (not one call per tensor)."""
    for dtype in sorted({t.dtype for t in tensors}, key=str):
        group = [t for t in tensors if t.dtype == dtype]
        start = 0
        while start < len(group):
            end, size = start, 0
            while end < len(group) and (end == start or size + group[end].numel() <= BUCKET_ELEMENTS):
                size += group[end].numel()
                end += 1
            bucket = group[start:end]
            flat = torch.cat([t.reshape(-1) for t in bucket])
            torch.distributed.all_reduce(flat)
            offset = 0
            for t in bucket:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()
            start = end


def shard(model, layers: Sequence[torch.nn.Module]) -> list[torch.nn.Parameter]:
    """FSDP2 over ``model``: each of ``layers`` (its decoder layers) a unit, the rest (embeddings, final norm,
    unembedding) the root's; gradients summed, not averaged. Returns the parameters to optimise, now sharded."""
    from torch.distributed.fsdp import fully_shard

    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    for unit in [*layers, model]:
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # a plain sum, which gloo has (not NCCL's PreMulSum)
    return [p for p in model.parameters() if p.requires_grad]


def full_state(model, dist: Dist) -> dict[str, torch.Tensor] | None:
    """A sharded model's full state dict, on rank 0's CPU (None on the others). Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if dist.is_main else None


def everywhere(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on every rank."""
    t = torch.tensor([int(flag)], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item())


def sync(params: Sequence[torch.nn.Parameter], loss: torch.Tensor | None, dist: Dist) -> torch.Tensor:
    """Sum the gradients of ``params`` (FSDP has summed them already) and this rank's token-weighted ``loss`` over
    ranks; returns the global loss. A rank without rows in this step (a short last batch) passes ``loss`` None
    and no gradients. A parameter no rank gave a gradient keeps none, as in one process (the optimizer then skips
    it)."""
    device = dist.device
    if dist.fsdp:
        total = torch.zeros((), device=device) if loss is None else loss.detach().float().clone()
        torch.distributed.all_reduce(total)
        return total
    with torch.no_grad():
        have = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
        torch.distributed.all_reduce(have, op=torch.distributed.ReduceOp.MAX)
        grads = []
        for p, any_grad in zip(params, have.tolist()):
            if any_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
            if any_grad:
                grads.append(p.grad)
        total = torch.zeros((), device=device) if loss is None else loss.detach().float().clone()
        _all_reduce(grads + [total])
    return total


def barrier() -> None:
    torch.distributed.barrier()
