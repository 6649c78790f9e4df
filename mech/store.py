"""Artifact store primitives: content hashes and atomic writes.

Nothing is written in place: every artifact is built under a temporary sibling path and renamed into
place when complete, so a run killed at any moment leaves either the old entry or none, never a
half-written one that a later call would take for complete.

A temporary sibling is named ``.<name>.tmp-<pid>-<host>-<random>``: the writer's identity is in the name, so
cleaning up after killed runs can tell a dead writer's leftovers from a live writer's work in progress.
``build_once`` serialises the computation of one artifact across processes with a per-artifact file lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the byte form that content hashes are taken of."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def content_hash(obj: Any, length: int = 12) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]


def file_sha256(path: str | os.PathLike, length: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


def _tmp_prefix(final: Path) -> str:
    return f".{final.name}.tmp-{os.getpid()}-{socket.gethostname()}-"


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``final`` only if the block completes."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(final), dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700; an artifact is meant to be shared like any directory
    try:
        yield tmp
        if final.exists():
            if not overwrite:
                raise FileExistsError(final)
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")


def append_jsonl(path: str | os.PathLike, obj: Any) -> None:
    """Append ``obj`` as one JSON line; one O_APPEND write, so lines from concurrent processes never interleave."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(obj, sort_keys=True, default=str) + "\n").encode())
    finally:
        os.close(fd)


def read_json_object(path: str | os.PathLike, fix: str) -> dict:
    """A JSON object from ``path``; an unreadable file or a non-object raises MechError ending with ``fix``."""
    from mech.errors import MechError

    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MechError(f"{path} is unreadable ({type(e).__name__}): {fix}") from None
    if not isinstance(obj, dict):
        raise MechError(f"{path} is not a JSON object: {fix}")
    return obj


def is_json_object(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a readable JSON object (a truncated write or a stray edit does not)."""
    try:
        return isinstance(json.loads(Path(path).read_text(encoding="utf-8")), dict)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False


def discard(path: str | os.PathLike) -> None:
    """Remove an artifact (file or directory). A directory is renamed to a temporary sibling first, so it
    vanishes at once; a run killed mid-removal leaves a leftover that :func:`clear_leftovers` takes."""
    path = Path(path)
    if path.is_dir():
        aside = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path), dir=path.parent))
        os.replace(path, aside)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------ building shared artifacts


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def writer_alive(tmp: Path, final: Path) -> bool:
    """Whether the process that named temporary sibling ``tmp`` of ``final`` may still be writing it.

    A writer on another host cannot be checked from here, so it counts as alive (as does a dead writer whose
    pid was reused: its leftover waits for a later cleanup); a name without a writer (an older naming, or a
    hand-made file) counts as dead."""
    m = re.fullmatch(r"(\d+)-(.+)-[^-]*", tmp.name[len(f".{final.name}.tmp-"):])
    if m is None:
        return False
    if m.group(2) != socket.gethostname():
        return True
    return _pid_alive(int(m.group(1)))


def clear_leftovers(final: str | os.PathLike) -> list[Path]:
    """Remove the temporary siblings of ``final`` left by writers that are gone (killed runs); returns them.
    A live writer's temporary path is never touched, so this is safe while other processes work."""
    final = Path(final)
    removed = []
    for p in final.parent.glob(f".{final.name}.tmp-*"):
        if writer_alive(p, final):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the block; the kernel releases it when
    the holder exits, even on SIGKILL. Lock files are never deleted: unlinking a lock file that another
    process has open and is waiting on would let a third process lock a fresh file and run concurrently."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def lock_held(path: str | os.PathLike) -> bool:
    """Whether a process holds ``path``'s :func:`file_lock` right now. Tried with a non-blocking shared ``flock``,
    released at once, on the file opened read-only: a missing lock file is not created, and a holder is never
    delayed by more than that instant. A filesystem whose ``flock`` fails tells nothing: False."""
    try:
        f = open(path, "rb")
    except OSError:
        return False
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def build_once(marker: str | os.PathLike, final: str | os.PathLike, lock: str | os.PathLike,
               compute: Callable[[], Any]) -> bool:
    """Make the artifact ``final`` complete (``marker`` exists once it is) with at most one process computing it.

    Without the marker, take ``lock``, look again (the previous holder may just have finished it), clear a dead
    writer's leftovers and ``compute()``, which writes ``final`` atomically. Returns whether this call computed."""
    return bool(build_many([(marker, final, lock)], lambda todo: compute()))


def build_many(artifacts: Sequence[tuple[str | os.PathLike, str | os.PathLike, str | os.PathLike]],
               compute: Callable[[list[int]], Any]) -> list[int]:
    """:func:`build_once` for artifacts computed together (e.g. students trained in one batch): each is
    ``(marker, final, lock)``; ``compute(todo)`` writes the artifacts at indices ``todo`` (each atomically).

    The locks of the missing ones are taken in sorted order, so processes building overlapping sets wait on each
    other instead of deadlocking, and held until ``compute`` returns. Returns ``todo`` (empty: nothing computed)."""
    missing = [i for i, (marker, _, _) in enumerate(artifacts) if not Path(marker).exists()]
    if not missing:
        return []
    with contextlib.ExitStack() as held:
        for lock in sorted({str(artifacts[i][2]) for i in missing}):
            held.enter_context(file_lock(lock))
        todo = [i for i in missing if not Path(artifacts[i][0]).exists()]
        for i in todo:
            clear_leftovers(artifacts[i][1])
        if todo:
            compute(todo)
        return todo
