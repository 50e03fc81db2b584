"""An out-of-core run (with recovery) interrupted at any durable point resumes to the weights and figures of an
uninterrupted run, and a failure never deletes resumable work.

Every durable write of a run goes through `os.replace` (state, activations, shard parts, the
export's final names, the quantized files, the output's rename). The reference run records where
each one comes from; the run is then interrupted right after the first and the last write of each
place (SIGTERM's `Interrupted` in process; SIGKILL in a subprocess at the riskiest points), and
`--resume` must finish with bit-identical weights.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compressor.cli import main
from compressor.output import Interrupted
from tests.conftest import ROOT

ARGS = ["--profile", "cpu-2core", "--ratio", "0.3", "--nsamples", "4", "--seqlen", "32",
        "--domain-windows", "1", "--round-to", "8", "--no-checks", "--out-of-core", "on", "--quantize", "w8a8-int8",
        "--threads", "1", "--recover-tokens", "100"]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _figures(folder: Path) -> dict:
    r = json.loads((folder / "report.json").read_text())
    return {"params": r["params"], "widths": r["widths"], "ppl": r["perplexity"]["pruned"],
            "dense": r["perplexity"]["dense"], "cross": r["perplexity"]["cross_domain"]}


class _Replace:
    """`os.replace` that records the calling function of every write under `root`, and raises
    `Interrupted` right after write number `stop` (1-based)."""

    def __init__(self, root: Path, stop: int | None = None):
        self.root, self.stop, self.calls = str(root), stop, []
        self.real = os.replace

    def __call__(self, src, dst, *a, **kw):
        self.real(src, dst, *a, **kw)
        if str(dst).startswith(self.root):
            self.calls.append(sys._getframe(1).f_code.co_name)
            if len(self.calls) == self.stop:
                raise Interrupted("SIGTERM")


def _points(calls: list[str]) -> dict[int, str]:
    """The first and last write of every place: {write number: place}."""
    points = {}
    for place in dict.fromkeys(calls):
        idx = [i + 1 for i, c in enumerate(calls) if c == place]
        points.update({idx[0]: place, idx[-1]: place})
    return dict(sorted(points.items()))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("resume")
    rec = _Replace(root)
    out = root / "ref"
    mp = pytest.MonkeyPatch()
    mp.setattr(os, "replace", rec)
    try:
        assert main([str(tiny_model_dir), *ARGS, "--out", str(out)]) == 0
    finally:
        mp.undo()
    return root, out, rec.calls


def test_resume_after_an_interruption_at_every_durable_point(reference, tiny_model_dir, monkeypatch, capsys):
    root, ref, calls = reference
    places = set(calls)
    # every stage of the run writes durably: pass 1, pass 2, the export's names, the perplexities
    # (layer by layer), the recovery's targets and adapters (`_save_atomic`: its first and last
    # write), the merged shards, the quantized files and the final rename
    assert {"save", "_atomic_save", "flush", "finish", "on_done", "_save_atomic", "merge_into_shards",
            "_replace_shards", "write"} <= places, places
    assert calls.count("_save_atomic") == 2, calls
    want, figures = _weights(ref), _figures(ref)
    for stop, place in _points(calls).items():
        out = root / f"o{stop}"
        monkeypatch.setattr(os, "replace", _Replace(root, stop))
        rc = main([str(tiny_model_dir), *ARGS, "--out", str(out)])
        monkeypatch.undo()
        err = capsys.readouterr().err
        if place == "write" and stop == len(calls):  # interrupted after the output's own rename: it is complete
            assert rc == 130 and _weights(out).keys() == want.keys()
            continue
        assert rc == 130, (stop, place, err[-2000:])
        assert "--resume" in err and not out.exists()
        rc = main([str(tiny_model_dir), *ARGS, "--out", str(out), "--resume"])
        err = capsys.readouterr().err
        assert rc == 0, (stop, place, err[-3000:])
        got = _weights(out)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), (stop, place)
        assert _figures(out) == figures, (stop, place)
        assert not (root / f".o{stop}.fitprune-work").exists()


KILL = """
import os, signal, sys
from compressor.cli import main
real, root, stop, seen = os.replace, sys.argv[1], sys.argv[2], []
def replace(src, dst, *a, **kw):
    real(src, dst, *a, **kw)
    if str(dst).startswith(root):
        seen.append(sys._getframe(1).f_code.co_name)
        if seen.count(stop) == 1 and seen[-1] == stop:
            os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("place", ["finish", "_replace_shards"])
def test_resume_after_sigkill(reference, tiny_model_dir, tmp_path, place):
    """SIGKILL (no handler runs) right after the first export part gets its final name, and right
    after the first quantized file replaces a dense one: `--resume` finishes the job."""
    _, ref, _ = reference
    out = tmp_path / "o"
    p = subprocess.run([sys.executable, "-c", KILL, str(tmp_path), place, str(tiny_model_dir), *ARGS, "--out",
                        str(out)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert main([str(tiny_model_dir), *ARGS, "--out", str(out), "--resume"]) == 0
    want, got = _weights(ref), _weights(out)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert _figures(out) == _figures(ref)


def test_a_failed_resume_keeps_the_work(reference, tiny_model_dir, tmp_path, monkeypatch, capsys):
    """An unexpected error while resuming keeps the work directory and says how to retry in one sentence."""
    out = tmp_path / "o"
    _, _, calls = reference
    monkeypatch.setattr(os, "replace", _Replace(tmp_path, calls.index("flush") + 2))
    assert main([str(tiny_model_dir), *ARGS, "--out", str(out)]) == 130
    monkeypatch.undo()
    from compressor.pipeline.streamed import Streamed

    def broken(*a, **kw):
        raise RuntimeError("boom")

    monkeypatch.setattr(Streamed, "prune", broken)
    capsys.readouterr()
    assert main([str(tiny_model_dir), *ARGS, "--out", str(out), "--resume"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "RuntimeError: boom" in err and "kept in" in err and "--resume" in err
    work = tmp_path / ".o.fitprune-work"
    assert (work / "state.json").is_file() and (work / "error.log").is_file()
    monkeypatch.undo()
    assert main([str(tiny_model_dir), *ARGS, "--out", str(out), "--resume"]) == 0
    assert not work.exists()


def _damage(work: Path, how: str) -> None:
    state = json.loads((work / "state.json").read_text())
    if how == "pass1-layer-missing":
        (work / "pass1" / "layer-00000.safetensors").unlink()
    elif how == "pass1-layer-truncated":
        f = work / "pass1" / "layer-00001.safetensors"
        f.write_bytes(f.read_bytes()[:40])
    elif how == "part-missing":
        (work / "export" / state["parts"][0]["file"]).unlink()
    elif how == "activations-missing":
        for f in work.glob("acts-*.safetensors"):
            f.unlink()
    elif how == "counts-not-integers":
        (work / "state.json").write_text(json.dumps({**state, "pass1_done": "two"}))
    elif how == "part-outside-the-folder":
        state["parts"][0]["file"] = "../../etc/passwd"
        (work / "state.json").write_text(json.dumps(state))


@pytest.mark.parametrize("how", ["pass1-layer-missing", "pass1-layer-truncated", "part-missing", "activations-missing",
                                 "counts-not-integers", "part-outside-the-folder"])
def test_a_damaged_work_directory_is_one_sentence(reference, tiny_model_dir, tmp_path, monkeypatch, capsys, how):
    """A work directory whose state names files that are not there (or are not what it says) stops
    the resumed run with one sentence and a non-zero exit, never a traceback or an exported model."""
    import shutil

    _, _, calls = reference
    out = tmp_path / "o"
    # in pass 2 with parts written; for the activations, in pass 1 (one layer scored, its outputs saved)
    stop = calls.index("_atomic_save") + 3 if how == "activations-missing" else calls.index("flush") + 2
    monkeypatch.setattr(os, "replace", _Replace(tmp_path, stop))
    assert main([str(tiny_model_dir), *ARGS, "--out", str(out)]) == 130
    monkeypatch.undo()
    work = tmp_path / ".o.fitprune-work"
    state = json.loads((work / "state.json").read_text())
    assert state["pass1_done"] == 1 if how == "activations-missing" else state["parts"], state
    _damage(work, how)
    capsys.readouterr()
    rc = main([str(tiny_model_dir), *ARGS, "--out", str(out), "--resume"])
    err = " ".join(capsys.readouterr().err.split())
    assert rc not in (0, 1, 130), err[-2000:]
    assert "is damaged" in err and "Traceback" not in err and not out.exists(), err[-2000:]
    shutil.rmtree(work, ignore_errors=True)
