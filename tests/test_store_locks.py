"""Shared-cache primitives (mech.store): writer-tagged temporary paths, leftover cleanup that spares live
writers, and build_once's per-artifact lock (at most one process computes an artifact; a killed holder
releases it). Pure file-system tests with small helper subprocesses: a few seconds."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from mech.store import atomic_dir, build_once, clear_leftovers, writer_alive

REPO = Path(__file__).resolve().parents[1]
HOST = socket.gethostname()


def python(code: str, *args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env=env, cwd=REPO, **kw)


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    p = python("pass")
    p.wait()
    return p.pid


def test_atomic_dir_names_its_writer(tmp_path):
    final = tmp_path / "artifact"
    with atomic_dir(final) as tmp:
        assert tmp.name.startswith(f".artifact.tmp-{os.getpid()}-{HOST}-")
        assert writer_alive(tmp, final)
    assert final.is_dir() and not tmp.exists()


def test_leftover_cleanup_leaves_a_live_writer_alone(tmp_path):
    final = tmp_path / "0123456789abcdef"
    live = python("import time; time.sleep(60)")
    try:
        names = {
            "live": f".{final.name}.tmp-{live.pid}-{HOST}-a1b2",  # another process, still writing
            "self": f".{final.name}.tmp-{os.getpid()}-{HOST}-c3d4",
            "other_host": f".{final.name}.tmp-{dead_pid()}-elsewhere.example-org-e5f6",  # cannot be checked
            "dead": f".{final.name}.tmp-{dead_pid()}-{HOST}-g7h8",
            "untagged": f".{final.name}.tmp-killed",  # older naming: no writer to ask about
            "dead_file": f".{final.name}.tmp-{dead_pid()}-{HOST}-i9j0",
            "other_artifact": f".fedcba9876543210.tmp-{dead_pid()}-{HOST}-k1l2",
        }
        for key, name in names.items():
            if key == "dead_file":
                (tmp_path / name).write_text("{")
            else:
                (tmp_path / name).mkdir()
                (tmp_path / name / "adapter_model.safetensors").write_bytes(b"half")
        removed = clear_leftovers(final)
        assert {p.name for p in removed} == {names["dead"], names["untagged"], names["dead_file"]}
        assert {p.name for p in tmp_path.iterdir()} == {names[k] for k in ("live", "self", "other_host",
                                                                           "other_artifact")}
        assert (tmp_path / names["live"] / "adapter_model.safetensors").read_bytes() == b"half"
    finally:
        live.kill()
        live.wait()


# A process that builds ``final`` through build_once: compute takes a while (so the others arrive while it
# runs), logs itself, then writes the artifact atomically; prints whether this process computed.
BUILDER = """
import os, sys, time
from pathlib import Path
from mech.store import atomic_dir, build_once
final, log, go = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
time.sleep(max(0.0, go - time.time()))
def compute():
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\\n")
    with atomic_dir(final) as tmp:
        time.sleep(0.5)
        (tmp / "done.json").write_text("{}")
print(build_once(final / "done.json", final, final.parent / "locks" / "a.lock", compute))
"""


def test_build_once_computes_an_artifact_in_one_process_only(tmp_path):
    final, log = tmp_path / "artifact", tmp_path / "computed.log"
    go = time.time() + 2.0  # all start together, after every interpreter has started
    procs = [python(BUILDER, final, log, go, stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(outs) == ["False", "False", "True"]
    assert len(log.read_text().splitlines()) == 1
    assert (final / "done.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# Holds the artifact's lock with a half-written temporary dir, until killed.
HOLDER = """
import sys, time
from pathlib import Path
from mech.store import atomic_dir, file_lock
final = Path(sys.argv[1])
with file_lock(final.parent / "locks" / "a.lock"), atomic_dir(final) as tmp:
    (tmp / "half").write_text("")
    print("holding", flush=True)
    time.sleep(60)
"""


def test_a_killed_holder_releases_the_lock_and_its_leftovers_are_cleared(tmp_path):
    final = tmp_path / "artifact"
    holder = python(HOLDER, final, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "holding"
    [tmp] = [p for p in tmp_path.iterdir() if p.name.startswith(".artifact.tmp-")]
    assert not clear_leftovers(final) and tmp.is_dir()  # its writer is alive: spared
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert not writer_alive(tmp, final)

    def compute():
        assert not tmp.exists()  # cleared before computing
        with atomic_dir(final) as t:
            (t / "done.json").write_text("{}")

    assert build_once(final / "done.json", final, tmp_path / "locks" / "a.lock", compute)
    assert not build_once(final / "done.json", final, tmp_path / "locks" / "a.lock", compute)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
