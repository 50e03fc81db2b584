"""Atomic output directories: everything is written into a hidden temporary sibling of `--out`
and renamed into place only when complete, so a failed or interrupted run leaves nothing behind.
And the run's logs: in a quiet run (`QUIET`), what third-party code prints goes to files in the
folder `LOGS` names (`quietly`, `run_log`), which the run copies to OUT/logs/."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

from . import tempdirs
from .errors import UserError


def check_out_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"The output directory {out} already exists and is not empty; choose another --out.")


class Interrupted(UserError):
    def __init__(self, what: str):
        super().__init__(f"Interrupted by {what}; nothing was written.", exit_code=130)
        self.signal_name = what


@contextlib.contextmanager
def signals_as_errors() -> Iterator[None]:
    """SIGINT and SIGTERM raise `Interrupted`, so `finally` blocks clean up temporary output."""

    fired: list[int] = []

    def handler(signum, _frame):
        if fired:  # a second Ctrl-C must not interrupt the cleanup the first one started
            return
        fired.append(signum)
        raise Interrupted(signal.Signals(signum).name)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a temporary directory next to `out`; on success rename it to `out`."""
    out = Path(out).absolute()
    check_out_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempdirs.make(f".{out.name}.tmp-", dir=out.parent)  # also sweeps siblings left by killed runs
    try:
        yield tmp
        tempdirs.disown(tmp)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except Exception as exc:
        if _disk_full(exc):
            raise UserError(f"The disk holding {out.parent} is full; nothing was written.", exit_code=28) from exc
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _disk_full(exc: BaseException | None) -> bool:
    """ENOSPC / EDQUOT / EFBIG anywhere in the exception chain; safetensors' writer reports it as a
    SafetensorError whose text carries the OS error ("No space left on device (os error 28)")."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return True
        text = str(exc)
        if any(f"(os error {n})" in text for n in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


QUIET = "FITPRUNE_QUIET"  # "1": third-party output stays off the console (compressor.cli.third_party_output)
LOGS = "FITPRUNE_LOGS"  # the folder a quiet run keeps third-party output in, until it copies it to OUT/logs


def run_log(name: str) -> Path | None:
    """The log file `name` of a quiet run that keeps logs (None otherwise: output stays where it goes)."""
    folder = os.environ.get(LOGS)
    if os.environ.get(QUIET) != "1" or not folder:
        return None
    Path(folder).mkdir(parents=True, exist_ok=True)
    return Path(folder) / name


def quietly(log: Path | None, fn):
    """`fn()`, with what it prints appended to `log`: Python's streams and the process's file
    descriptors 1 and 2, so that the processes it starts (vLLM's engine, git run by lm-eval) write
    there too, for as long as they live. With `log` None (no run folder keeps logs, e.g. `compress
    plan`) the output goes to an unnamed temporary file, shown only if `fn` fails. As it is where
    `QUIET` is not set (-v)."""
    import sys
    import tempfile

    if os.environ.get(QUIET) != "1":
        return fn()
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
    with (open(log, "a+", encoding="utf-8") if log is not None else  # noqa: SIM115
          tempfile.TemporaryFile("w+", encoding="utf-8")) as f, contextlib.ExitStack() as stack:
        start = f.tell()
        for stream in (sys.stdout, sys.stderr):
            fd = _fileno(stream)
            if fd is not None:
                stream.flush()
                saved = os.dup(fd)
                os.dup2(f.fileno(), fd)
                stack.callback(os.close, saved)
                stack.callback(os.dup2, saved, fd)
                stack.callback(stream.flush)
        stack.enter_context(contextlib.redirect_stderr(f))
        stack.enter_context(contextlib.redirect_stdout(f))
        try:
            return fn()
        except BaseException:
            stack.close()  # the console back, then what the failed call printed
            f.flush()
            f.seek(start)
            sys.stderr.write(f.read()[-20_000:])
            raise


def _fileno(stream) -> int | None:
    """The OS file descriptor behind `stream`, or None (pytest's capture, StringIO)."""
    try:
        return stream.fileno()
    except (OSError, ValueError, AttributeError):
        return None
