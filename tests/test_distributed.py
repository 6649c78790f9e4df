"""Memory and scale for one big student: gradient accumulation (micro_batch_size), activation checkpointing, and
one student trained by several processes (torchrun / accelerate launch; mech.students.distributed).

Known answers: the loss of a batch is the mean over its labelled tokens, so a batch computed as token-weighted
micro-batches, or as token-weighted shares on two processes, has the whole batch's loss and gradient, and the
student equals the one trained a batch at a time up to float rounding. Rows of very different lengths make a
weighting by 1/(number of parts) measurably wrong. The tolerances below were measured (the report's numbers).
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

from mech.errors import MechError
from mech.students.config import LoraSpec, StudentConfig
from mech.students.encoding import collate, encode_rows
from mech.students.loop import completion_loss
from mech.students.store import load_student, read_student
from mech.students.train import train_model, train_student


def chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


# answers of 1 to 12 numbers: micro-batches and process shares carry very different token counts
ROWS = [chat(f"Continue: {i}, {i + 3}.", ", ".join(str(i + 3 * k) for k in range(2, 3 + (5 * i) % 12)))
        for i in range(12)]
# max |Δ weight| between a split and an unsplit student, by optimizer (measured: see each test). SGD's update is
# the gradient times the lr, so it shows the gradients agree to float rounding. AdamW's first steps are about
# lr × sign(gradient), which turns float rounding of a near-zero gradient element into a visible part of lr: the
# full-FT students differ there by up to 1e-4 of lr 1e-2's update of 2.5e-2 (LoRA's adapters, by 2e-7).
TOL_WEIGHT = {"sgd": 1e-6, "adamw": 3e-4}
TOL_LOSS = 1e-5  # max |Δ loss| of any step


def cfg(**kw) -> StudentConfig:
    base = dict(epochs=2, batch_size=6, lr=1e-2, warmup_steps=0, lora=LoraSpec(rank=2))
    return StudentConfig(**(base | kw))


# (method, optimizer) of the comparisons: SGD at lr 1 (the exact check) and AdamW as students are trained
CASES = {"lora-adamw": dict(method="lora"), "full-adamw": dict(method="full"),
         "full-sgd": dict(method="full", optimizer="sgd", lr=1.0)}


def close(a, b, c: StudentConfig) -> tuple[float, float]:
    """(max |Δ weight|, max |Δ loss|) of two trained students, asserted within the tolerances of ``c``."""
    return within(trainable(a.model), a.losses, trainable(b.model), b.losses, c)


def within(wa: dict, la: list[float], wb: dict, lb: list[float], c: StudentConfig) -> tuple[float, float]:
    dw, dl = max_diff(wa, wb), loss_diff(la, lb)
    print(f"measured max |Δ weight| {dw:.2g}, max |Δ loss| {dl:.2g} ({c.method}, {c.optimizer})")  # pytest -s
    assert dw < TOL_WEIGHT[c.optimizer] and dl < TOL_LOSS, (dw, dl)
    return dw, dl


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def adapters(model) -> dict[str, torch.Tensor]:
    """A LoRA student's adapter weights (a loaded student's are frozen, so not :func:`trainable`)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def loss_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b))


# --------------------------------------------------------------------------------------------- config and keys


def test_memory_knobs_stay_out_of_keys_at_their_defaults():
    c = cfg()
    assert "micro_batch_size" not in c.to_dict() and "gradient_checkpointing" not in c.to_dict()
    on = cfg(micro_batch_size=2, gradient_checkpointing=True).to_dict()
    assert on["micro_batch_size"] == 2 and on["gradient_checkpointing"] is True
    assert StudentConfig.from_dict(json.loads(json.dumps(on))) == cfg(micro_batch_size=2, gradient_checkpointing=True)


@pytest.mark.parametrize("mbs", [0, -1, 7])
def test_bad_micro_batch_size_is_one_line(mbs):
    with pytest.raises(MechError, match=r"micro_batch_size .* between 1 and batch_size \(6\)"):
        cfg(micro_batch_size=mbs)


# --------------------------------------------------------------------------------------------- accumulation


@pytest.mark.parametrize("case", CASES)
def test_micro_batches_give_the_whole_batch_student(tok, base, case):
    """Known answer: token-weighted micro-batches are the batch (micro 1, 4 and 5 of 6: 4 and 5 leave a short last
    part). Measured max |Δ| over the three (2 epochs × 2 steps): LoRA AdamW weights 2.4e-7, losses 1.4e-6; full
    AdamW weights 9.1e-5, losses 4.8e-7; full SGD weights 1.2e-7."""
    whole = train_model(base, tok, ROWS, cfg(**CASES[case]))
    for mbs in (1, 4, 5):
        c = cfg(**CASES[case], micro_batch_size=mbs)
        close(train_model(base, tok, ROWS, c), whole, c)
    # what the weighting buys: the mean of the micro-batches' mean losses is off by far more than the tolerance
    examples, pad = encode_rows(tok, ROWS, "default"), tok.pad_token_id
    batch = [examples[i] for i in range(6)]
    with torch.no_grad():
        naive = sum(float(completion_loss(base, collate([e], pad))) for e in batch) / len(batch)
        exact = float(completion_loss(base, collate(batch, pad)))
    assert abs(naive - exact) > 100 * TOL_LOSS


def test_default_micro_batch_is_the_unsplit_loop(tok, base):
    """micro_batch_size equal to batch_size computes each batch whole: the same bits as leaving it unset."""
    a = train_model(base, tok, ROWS, cfg())
    b = train_model(base, tok, ROWS, cfg(micro_batch_size=6))
    assert a.losses == b.losses and max_diff(trainable(a.model), trainable(b.model)) == 0.0


# --------------------------------------------------------------------------------------------- checkpointing


@pytest.mark.parametrize("method", ["lora", "full"])
def test_gradient_checkpointing_trains_the_same_student(tok, base, method):
    """Measured: identical to the bit on this CPU (LoRA and full, AdamW); the test allows float rounding."""
    plain = train_model(base, tok, ROWS, cfg(method=method))
    ckpt = train_model(base, tok, ROWS, cfg(method=method, gradient_checkpointing=True))
    close(ckpt, plain, cfg())
    hf = ckpt.model.get_base_model() if method == "lora" else ckpt.model
    assert not any(getattr(m, "gradient_checkpointing", False) for m in hf.modules())  # handed back plain
    assert not hasattr(hf, "_require_grads_hook")


def test_gradient_checkpointing_does_run(tok, base, monkeypatch):
    """The recomputation happens: torch's checkpoint is called once per decoder layer and step."""
    import torch.utils.checkpoint as ckpt

    calls = []
    real = ckpt.checkpoint

    def spy(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real(*args, **kwargs)

    monkeypatch.setattr("transformers.modeling_utils.checkpoint", spy)
    train_model(base, tok, ROWS[:6], cfg(epochs=1, gradient_checkpointing=True))
    assert calls == [False] * 2  # 2 layers × 1 step, non-reentrant


def test_gradient_checkpointing_refused_where_the_model_cannot(tok, base, monkeypatch):
    monkeypatch.setattr(type(base), "supports_gradient_checkpointing", False)
    with pytest.raises(MechError, match="Qwen2ForCausalLM cannot checkpoint its activations.*set "
                                        "gradient_checkpointing to false"):
        train_model(base, tok, ROWS, cfg(gradient_checkpointing=True))


def test_master_weights_compute_with_the_current_weights(tok, make_tiny_lm):
    """A full student of a bf16 base trains float32 master weights under autocast (precision auto). Known answer:
    its losses track the same student of the float32 copy of that base, up to bf16 rounding (measured max |Δ loss|
    9.2e-4 over 4 SGD steps). Autocast's weight cache, left on, kept the first step's casts for all of training:
    losses 6.43 -> 6.17 instead of -> 4.12, off by 0.76."""
    b16 = make_tiny_lm("qwen2", seed=0).to(torch.bfloat16)
    b32 = make_tiny_lm("qwen2", seed=0).to(torch.bfloat16).float()  # the same weights, in float32
    c = cfg(**CASES["full-sgd"])
    master, fp32 = train_model(b16, tok, ROWS, c), train_model(b32, tok, ROWS, c)
    assert loss_diff(master.losses, fp32.losses) < 5e-3 and fp32.losses[-1] < fp32.losses[0] - 1.0


# --------------------------------------------------------------------------------------------- two processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, base, tok, rows: list, configs: dict, out: Path, errors,
            fsdp: bool) -> None:
    """One of ``world`` processes, launched as torchrun would (its env vars), training every config. Each writes
    its student's weights and losses; under FSDP rank 0 alone, after gathering the shards."""
    from mech.students.distributed import process_group
    from mech.students.train import _unsharded

    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    try:
        torch.set_num_threads(1)
        with process_group(fsdp=fsdp) as dist:
            assert dist is not None and dist.rank == rank
            for name, c in configs.items():
                trained = train_model(base, tok, rows, c, dist=dist)
                assert not fsdp or all(hasattr(p, "to_local") for p in trained.model.parameters())  # sharded
                model = _unsharded(trained.model, base, c, dist) if fsdp else trained.model
                if model is not None:
                    torch.save({"weights": trainable(model), "losses": trained.losses}, out / f"{name}-{rank}.pt")
            train_student(base, tok, rows, next(iter(configs.values())), out / "student", base_spec="tiny", dist=dist)
            if rank != 0:
                assert (out / "student" / "student.json").is_file()  # rank 0 wrote it before the barrier let us go
    except BaseException:  # noqa: BLE001 - the parent reports it
        errors.put(f"rank {rank}: {traceback.format_exc()}")


def launch(world: int, base, tok, rows: list, configs: dict, out: Path, fsdp: bool = False) -> None:
    ctx = multiprocessing.get_context("fork")  # the children share the parent's tiny model and tokenizer
    errors = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, base, tok, rows, configs, out, errors, fsdp)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    failed = [] if errors.empty() else [errors.get() for _ in range(world) if not errors.empty()]
    assert not failed and all(p.exitcode == 0 for p in procs), "\n".join(failed) or [p.exitcode for p in procs]


def test_two_processes_train_the_single_process_student(tok, base, tmp_path):
    """The issue's done-when: two CPU processes on gloo train LoRA and full-FT students (3 rows each of a global
    batch of 6; one with micro-batches of 2 on top, leaving each process a short last part); each equals the
    one-process student of the same global batch. Measured max |Δ weight| / |Δ loss|: LoRA AdamW 6.7e-7 / 9.5e-7,
    full AdamW 7.6e-5 / 4.8e-7, full SGD 4.5e-8 / 4.8e-7, full AdamW micro 2: 5.4e-5 / 4.8e-7, LoRA with
    activation checkpointing as LoRA. Every process ends with the same bits."""
    configs = {case: cfg(**kw) for case, kw in CASES.items()} | {
        "full-adamw-micro": cfg(method="full", micro_batch_size=2),
        "lora-adamw-checkpointing": cfg(gradient_checkpointing=True)}
    launch(2, base, tok, ROWS, configs, tmp_path)
    for name, c in configs.items():
        ranks = [torch.load(tmp_path / f"{name}-{r}.pt") for r in range(2)]
        assert max_diff(ranks[0]["weights"], ranks[1]["weights"]) == 0.0 and ranks[0]["losses"] == ranks[1]["losses"]
        solo = train_model(base, tok, ROWS, dataclasses.replace(c, micro_batch_size=None))
        within(ranks[0]["weights"], ranks[0]["losses"], trainable(solo.model), solo.losses, c)
    meta = read_student(tmp_path / "student")
    assert meta["world_size"] == 2 and meta["config"] == configs["lora-adamw"].to_dict()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.suffix) == ["student"]  # no temporary dir left
    ref = torch.load(tmp_path / "lora-adamw-0.pt")["weights"]
    assert max_diff(adapters(load_student(base, tmp_path / "student")), ref) == 0.0


def test_short_last_batch_leaves_a_process_without_rows(tok, base, tmp_path):
    """13 rows in batches of 6: the last batch has one row, so one process computes nothing in that step and
    contributes no gradient; the student is still the one-process student."""
    rows13, c = ROWS + [ROWS[0]], cfg(epochs=1)
    launch(2, base, tok, rows13, {"lora": c}, tmp_path)
    solo = train_model(base, tok, rows13, c)
    got = torch.load(tmp_path / "lora-0.pt")
    assert len(got["losses"]) == 3
    within(got["weights"], got["losses"], trainable(solo.model), solo.losses, c)


def test_fsdp_shards_a_full_student_and_trains_the_single_process_one(tok, base, tmp_path):
    """FSDP2 on two CPU processes (gloo): full finetuning with its weights, gradients and AdamW state sharded
    equals the one-process student; with micro-batches of 2 and 13 rows, the short last batch makes a process
    run a zero-weight part so both run the same forwards; activation checkpointing inside the FSDP units too. Rank
    0 gathers and writes the student. Measured max |Δ weight| / |Δ loss|: AdamW 7.5e-5 / 4.8e-7, SGD 1.2e-7 /
    9.5e-7, AdamW micro 2: 5.8e-5 / 4.8e-7, SGD with checkpointing: as SGD."""
    rows13 = ROWS + [ROWS[0]]
    configs = {"full-adamw": cfg(method="full"), "full-sgd": cfg(**CASES["full-sgd"]),
               "full-adamw-micro": cfg(method="full", micro_batch_size=2),
               "full-sgd-checkpointing": cfg(**CASES["full-sgd"], gradient_checkpointing=True)}
    launch(2, base, tok, rows13, configs, tmp_path, fsdp=True)
    assert not (tmp_path / "full-adamw-1.pt").exists()  # rank 1 holds shards only
    for name, c in configs.items():
        got = torch.load(tmp_path / f"{name}-0.pt")
        solo = train_model(base, tok, rows13, dataclasses.replace(c, micro_batch_size=None))
        within(got["weights"], got["losses"], trainable(solo.model), solo.losses, c)
    meta = read_student(tmp_path / "student")
    assert meta["world_size"] == 2 and meta["fsdp"] is True and meta["kind"] == "full"
    written = {n: p.detach() for n, p in load_student(base, tmp_path / "student").named_parameters()}
    assert max_diff(written, torch.load(tmp_path / "full-adamw-0.pt")["weights"]) == 0.0


def test_fsdp_keeps_float32_master_weights_over_a_bf16_base(tok, make_tiny_lm, tmp_path):
    """precision auto under FSDP: float32 master weights sharded, computed under bf16 autocast, gathered in
    float32; the one-process student to bf16 rounding (measured max |Δ weight| 1.0e-3, |Δ loss| 2.3e-3, SGD)."""
    b16 = make_tiny_lm("qwen2", seed=0).to(torch.bfloat16)
    c = cfg(**CASES["full-sgd"])
    launch(2, b16, tok, ROWS, {"full-sgd": c}, tmp_path, fsdp=True)
    got, solo = torch.load(tmp_path / "full-sgd-0.pt"), train_model(b16, tok, ROWS, c)
    assert {w.dtype for w in got["weights"].values()} == {torch.float32}
    assert max_diff(got["weights"], trainable(solo.model)) < 1e-2 and loss_diff(got["losses"], solo.losses) < 1e-2


def test_more_processes_than_rows_per_batch_is_one_line(tok, base):
    from mech.students.distributed import Dist

    with pytest.raises(MechError, match="batch_size 2 is smaller than the 4 processes"):
        train_model(base, tok, ROWS, cfg(batch_size=2), dist=Dist(0, 4, torch.device("cpu")))
    with pytest.raises(MechError, match="LoRA dropout under torchrun"):
        train_model(base, tok, ROWS, cfg(lora=LoraSpec(rank=2, dropout=0.1)), dist=Dist(0, 2, torch.device("cpu")))
    fsdp = Dist(0, 2, torch.device("cpu"), fsdp=True)
    with pytest.raises(MechError, match="FSDP shards full finetuning; a LoRA student's adapters are small"):
        train_model(base, tok, ROWS, cfg(), dist=fsdp)
    with pytest.raises(MechError, match="save_every_epoch is not built under FSDP"):
        train_model(base, tok, ROWS, cfg(method="full", save_every_epoch=True), dist=fsdp)


# --------------------------------------------------------------------------------------------- the CLI


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    return env


def test_sweeps_and_other_commands_refuse_torchrun(tmp_path, monkeypatch, capsys):
    from mech.cli import main

    for k, v in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)
    for argv, fault in ((["sweep", "none.yaml"], "run its cells in parallel with `mech sweep --shard"),
                        (["reproduce", "--out", "r"], "run its cells in parallel with `mech sweep --shard"),
                        (["eval", "organism", "--target", "owl"], "only `mech train` runs under torchrun")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("mech: error: ") and fault in err and len(err.splitlines()) == 1
    assert not any(tmp_path.iterdir())
    monkeypatch.setenv("WORLD_SIZE", "3")  # more processes than rows per batch: refused before any loading
    assert main(["train", "data", "--out", "s", "--batch-size", "2"]) == 2
    assert "batch size 2 is smaller than the 3 processes" in capsys.readouterr().err
    assert main(["train", "data", "--out", "s", "--fsdp"]) == 2
    assert "--fsdp shards full finetuning" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main(["train", "data", "--out", "s", "--fsdp", "--method", "full"]) == 2
    assert "but this is one process: launch it with torchrun" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "two")
    assert main(["train", "data", "--out", "s"]) == 2
    assert "WORLD_SIZE='two' is not an integer" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("method, extra", [("lora", ["--micro-batch-size", "1"]),
                                           ("full", ["--fsdp", "--gradient-checkpointing"])])
def test_torchrun_mech_train_equals_one_process(tiny_qwen_dir, write_number_dataset, tmp_path, method, extra):
    """`torchrun --nproc-per-node 2 -m mech.cli train` (gloo, CPU): one student dir, written by rank 0, one summary
    line, and the one-process `mech train` student to float rounding (measured max |Δ weight|: LoRA with micro-batches
    2.1e-7, full FSDP with checkpointing 1.4e-6, both AdamW; |Δ loss| 4.8e-7)."""
    data = write_number_dataset(tmp_path / "data", n=20)
    common = [str(data), "--model", str(tiny_qwen_dir), "--batch-size", "4", "--epochs", "1", "--lr", "1e-2",
              "--method", method]
    solo = subprocess.run([sys.executable, "-m", "mech.cli", "train", *common, "--out", str(tmp_path / "solo")],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert solo.returncode == 0, solo.stderr
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          f"--master-port={free_port()}", "-m", "mech.cli", "train", *common, *extra,
                          "--out", str(tmp_path / "ddp")], env=_env(), capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr
    assert ddp.stdout.count("student ") == 1 and ddp.stderr.count("Loading weights:   0%") == 1  # rank 1 is silent
    from mech.models import load_model

    base = load_model(str(tiny_qwen_dir), device="cpu")
    pick = adapters if method == "lora" else (lambda m: {n: p.detach() for n, p in m.named_parameters()})
    a, b = (pick(load_student(base.model, tmp_path / n)) for n in ("solo", "ddp"))
    assert a
    ma, mb = read_student(tmp_path / "solo"), read_student(tmp_path / "ddp")
    within(a, ma["losses"], b, mb["losses"], StudentConfig(method=method))
    assert mb["world_size"] == 2 and "world_size" not in ma
