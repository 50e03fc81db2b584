"""fitprune's temporary directories: each holds an owner marker, is removed on every exit path of
the process that made it, and is swept by the next run when that process was killed.

`finally` blocks and `signals_as_errors` cover user errors, exceptions, Ctrl-C and SIGTERM; only
SIGKILL (the OOM killer, `kill -9`, a lost session) skips them. For those, every directory made here
records its owner (host, pid and the process's start time, so a recycled pid is not mistaken for
the owner) in a marker file, and `sweep_stale` (run at the start of every `compress` command)
removes the directories whose owner is gone. A directory without a marker (one being created this
instant, or not ours) is never touched. Out-of-core work directories are not made here: they are
kept on purpose for `--resume`.

Standard library only: the CLI imports this module before `--help` and must not import torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

MARKER = ".fitprune-owner"


def _start_time(pid: int) -> str | None:
    """When process `pid` started, as an opaque string (None when it does not exist or cannot be told).
    Linux: field 22 of /proc/PID/stat (clock ticks after boot); elsewhere psutil when installed."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]  # fields after "(comm)" start at field 3
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None  # a Linux /proc without this pid: the process is gone
    except (OSError, IndexError):
        pass
    try:
        import psutil

        return repr(psutil.Process(pid).create_time())
    except Exception:
        return None


def _owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid())}


def _alive(owner: dict) -> bool:
    """Is the process named in a marker still running (and still the same process)?"""
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    start = owner.get("start")
    if start is None:
        return True  # no start time was recorded: a live pid counts as the owner
    now = _start_time(pid)
    return now is None or now == start


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make(prefix: str, dir: str | os.PathLike | None = None) -> Path:
    """A new temporary directory (like `tempfile.mkdtemp`) holding an owner marker. The caller
    removes it (`remove`, or `shutil.rmtree`); a directory that will be renamed into place must be
    `disown`ed first. When `dir` is given (beside `--out`, in the model cache), stale directories of
    killed runs in it are swept first (the CLI sweeps the temp root itself when it starts)."""
    if dir is not None:
        sweep_stale([dir], say=_stderr)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=dir))
    try:
        (path / MARKER).write_text(json.dumps(_owner()))
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    return path


def disown(path: str | os.PathLike) -> None:
    """Remove the owner marker, before the directory is renamed into its final place."""
    with contextlib.suppress(FileNotFoundError):
        (Path(path) / MARKER).unlink()


def remove(path: str | os.PathLike | None) -> None:
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def temp_dir(prefix: str, dir: str | os.PathLike | None = None) -> Iterator[Path]:
    """`make` as a context manager: the directory is removed on every exit path."""
    path = make(prefix, dir)
    try:
        yield path
    finally:
        remove(path)


def _stale_owner(entry: Path) -> dict | None:
    """The marker of a directory whose owner is gone, else None (live owner, other host, no marker)."""
    try:
        owner = json.loads((entry / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(owner, dict) or owner.get("host") != socket.gethostname():
        return None  # a process on another host (a shared file system) cannot be checked from here
    return None if _alive(owner) else owner


def sweep_stale(dirs: list | None = None, say: Callable[[str], None] | None = print) -> list[Path]:
    """Remove the temporary directories of killed fitprune runs in `dirs` (default: the temp root);
    says what it removed in one line. Never raises: a sweep must not stop the run it precedes."""
    removed: list[Path] = []
    for d in dirs if dirs is not None else [tempfile.gettempdir()]:
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            if not ("fitprune-" in e.name or ".tmp-" in e.name):
                continue
            try:
                if not e.is_dir(follow_symlinks=False):
                    continue
            except OSError:
                continue
            owner = _stale_owner(Path(e.path))
            if owner is not None:
                shutil.rmtree(e.path, ignore_errors=True)
                if not os.path.exists(e.path):
                    removed.append(Path(e.path))
    if removed and say is not None:
        say(f"removed {len(removed)} temporary director{'y' if len(removed) == 1 else 'ies'} left by killed "
            f"fitprune runs: {', '.join(str(p) for p in removed)}")
    return removed
