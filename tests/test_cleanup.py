"""Clean up (compressor/tempdirs.py): no fitprune temporary directory survives a user error or an
interrupt, and what a SIGKILLed run left is found and removed by the next run.

Every test gives its processes a private TMPDIR, so other runs on this machine neither disturb it
nor are disturbed. Owners are real processes (alive, exited, or alive with another start time, as a
recycled pid would be)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compressor import tempdirs
from tests.conftest import ROOT, assert_clean_failure, small_tmpfs

FAST = ["--nsamples", "4", "--seqlen", "32", "--round-to", "8", "--ratio", "0.3"]


def _leftovers(*dirs: Path) -> list[str]:
    return sorted(p.name for d in dirs for p in d.iterdir() if "fitprune-" in p.name or ".tmp-" in p.name)


def _marked(root: Path, name: str, owner: dict) -> Path:
    d = root / name
    d.mkdir()
    (d / tempdirs.MARKER).write_text(json.dumps(owner))
    (d / "data.bin").write_bytes(b"x" * 100)
    return d


def test_sweep_removes_only_directories_whose_owner_is_gone(tmp_path):
    """The sweep removes a directory whose owner exited, or whose pid now belongs to another
    process (other start time); it keeps a live owner's, another host's and an unmarked one."""
    host = socket.gethostname()
    exited = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(exited.stdout)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        live_start = tempdirs._start_time(sleeper.pid)
        assert live_start is not None
        gone = _marked(tmp_path, "fitprune-tasks-gone", {"host": host, "pid": dead_pid, "start": "123"})
        recycled = _marked(tmp_path, "fitprune-calib-recycled", {"host": host, "pid": sleeper.pid, "start": "1"})
        live = _marked(tmp_path, "fitprune-onnx-live", {"host": host, "pid": sleeper.pid, "start": live_start})
        other_host = _marked(tmp_path, "fitprune-tasks-nfs", {"host": host + "-other", "pid": dead_pid, "start": "1"})
        unmarked = tmp_path / "fitprune-tasks-unmarked"
        unmarked.mkdir()
        lines: list[str] = []
        removed = tempdirs.sweep_stale([tmp_path], say=lines.append)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert sorted(removed) == sorted([gone, recycled])
    assert not gone.exists() and not recycled.exists()
    assert live.exists() and other_host.exists() and unmarked.exists()
    assert len(lines) == 1 and "removed 2 temporary directories" in lines[0], lines


def test_temp_dir_is_removed_on_every_exit_path(tmp_path, monkeypatch):
    """temp_dir removes its directory on success, on an exception and on KeyboardInterrupt; the
    marker names this process, so a sweep meanwhile keeps it."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    with tempdirs.temp_dir("fitprune-x-") as d:
        owner = json.loads((d / tempdirs.MARKER).read_text())
        assert owner["pid"] == os.getpid() and owner["start"] == tempdirs._start_time(os.getpid())
        assert tempdirs.sweep_stale([tmp_path], say=None) == [] and d.exists()
    assert not d.exists()
    for exc in (ValueError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with tempdirs.temp_dir("fitprune-x-") as d:
                raise exc
        assert not d.exists()
    assert list(tmp_path.iterdir()) == []


def test_the_output_carries_no_owner_marker(tmp_path):
    """atomic_dir removes the marker before the rename: a finished output is never mistaken for a leftover."""
    from compressor.output import atomic_dir

    out = tmp_path / "fitprune-out"
    with atomic_dir(out) as tmp:
        assert (tmp / tempdirs.MARKER).is_file()
        (tmp / "a.txt").write_text("a")
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]
    assert tempdirs.sweep_stale([tmp_path], say=None) == [] and out.exists()


def _cli(args, tmpdir: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "TMPDIR": str(tmpdir), "COLUMNS": "200"}
    return subprocess.Popen([sys.executable, "-m", "compressor", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


@pytest.mark.slow
def test_a_sigkilled_run_leaves_directories_the_next_run_removes(tmp_path, tiny_model_dir):
    """SIGKILL during export (the lm-eval tasks folder in TMPDIR and the output's temporary sibling
    both on disk); the next run removes both and says so."""
    tmpdir, work = tmp_path / "tmp", tmp_path / "work"
    tmpdir.mkdir()
    work.mkdir()
    out = work / "o"
    proc = _cli([str(tiny_model_dir), *FAST, "--threads", "1", "--out", str(out)], tmpdir, start_new_session=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            if list(tmpdir.glob("fitprune-tasks-*")) and list(work.glob(".o.tmp-*/model.safetensors")):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it reached the export: " + proc.communicate()[1][-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the run and any runtime it started, as kill -9 of the session
        proc.communicate()
    left = _leftovers(tmpdir, work)
    assert any(n.startswith("fitprune-tasks-") for n in left) and any(n.startswith(".o.tmp-") for n in left), left

    again = _cli([str(tiny_model_dir), *FAST, "--no-checks", "--threads", "1", "--out", str(out)], tmpdir)
    stdout, stderr = again.communicate(timeout=900)
    assert again.returncode == 0, stderr[-3000:]
    assert "removed 1 temporary directory left by killed fitprune runs" in stderr  # the temp root, when it starts
    assert "/fitprune-tasks-" in stderr and "/.o.tmp-" in stderr  # the sibling, when the output is made
    assert _leftovers(tmpdir, work) == []
    assert (out / "model.safetensors").is_file() and not (out / tempdirs.MARKER).exists()


@pytest.fixture
def full_disk(tmp_path):
    """A real 256 KiB tmpfs (conftest.small_tmpfs): less than the tiny model's export (about 700 KiB)."""
    with small_tmpfs(tmp_path, "256k") as mnt:
        yield mnt


def test_a_user_error_with_checks_on_leaves_no_temporary_directory(tmp_path, full_disk, tiny_model_dir):
    """A user error while the run's lm-eval tasks folder exists (the disk holding --out fills up
    during the export) leaves nothing in TMPDIR nor beside --out."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    out = full_disk / "o"
    proc = _cli([str(tiny_model_dir), *FAST, "--threads", "1", "--out", str(out)], tmpdir)
    stdout, stderr = proc.communicate(timeout=900)
    p = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert_clean_failure(p, out, "is full; nothing was written.", code=28)
    assert "dense held-out perplexity" in stderr  # the tasks folder existed by then
    assert _leftovers(tmpdir, full_disk) == [] and list(full_disk.iterdir()) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_with_checks_on_leaves_no_temporary_directory(tmp_path, tiny_model_dir, sig):
    """Ctrl-C (or SIGTERM) once the lm-eval tasks folder exists: exit 130, one sentence, and no
    fitprune directory in TMPDIR nor beside --out."""
    tmpdir, work = tmp_path / "tmp", tmp_path / "work"
    tmpdir.mkdir()
    work.mkdir()
    out = work / "o"
    proc = _cli([str(tiny_model_dir), *FAST, "--threads", "1", "--out", str(out)], tmpdir)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not list(tmpdir.glob("fitprune-tasks-*")):
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before its tasks folder appeared: " + proc.communicate()[1][-3000:]
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=300)
    p = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert_clean_failure(p, out, f"Interrupted by {signal.Signals(sig).name}; nothing was written.", code=130)
    assert _leftovers(tmpdir, work) == []
