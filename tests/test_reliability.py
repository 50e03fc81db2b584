"""The reliability catalogue (docs/reliability.md): each row is one test here. Every failure a user
can cause ends in one sentence, a non-zero exit, no traceback and no output directory (nor its
temporary sibling) left behind.

Interruptions are real signals delivered to a real `compress` process. For the tests that must hit
one stage exactly, a small wrapper around the CLI sends the signal to its own process from inside
that stage (the first calibrated layer, or right after the weights reached the disk in export);
one more test sends SIGINT from outside while the embedded model calibrates.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli, run_main, run_python, small_tmpfs
from tests.conftest import assert_clean_failure as _clean_failure

# --structure global: the allocation search (auto on a small model in memory) is not what these cases test
FAST = ["--nsamples", "4", "--seqlen", "32", "--round-to", "8", "--ratio", "0.3", "--no-checks",
        "--structure", "global"]


def assert_clean_failure(p, out_dir: Path | None, match: str, code: int | None = None) -> None:
    """conftest's check (which also records the case for docs/reliability.md); here OUT must not exist at all."""
    _clean_failure(p, out_dir, match, code)
    if out_dir is not None:
        assert not out_dir.exists(), f"{out_dir} was left behind"


# a real signal, sent by the process to itself from inside one stage of the real pipeline
_SIGNAL_WRAPPER = r'''
import os, signal, sys, json
sig = getattr(signal, sys.argv[1])
stage = sys.argv[2]
if stage == "calibration":
    import compressor.prune.engine as engine
    real_run = engine.LayerwiseEngine.run
    def run(self, visit, **kw):
        def first_layer(i, layer, st):
            os.kill(os.getpid(), sig)
            return visit(i, layer, st)
        return real_run(self, first_layer, **kw)
    engine.LayerwiseEngine.run = run
elif stage in ("export", "export-twice"):
    import exporters.hf as hf
    real_save = hf.save_file
    def save_file(tensors, filename, *a, **k):
        real_save(tensors, filename, *a, **k)  # the weights are on disk in the temporary directory
        os.kill(os.getpid(), sig)
    hf.save_file = save_file
    if stage == "export-twice":  # a second signal while the temporary directory is being removed
        import compressor.output as output
        real_rmtree = output.shutil.rmtree
        def rmtree(path, *a, **k):
            os.kill(os.getpid(), sig)
            return real_rmtree(path, *a, **k)
        output.shutil.rmtree = rmtree
elif stage == "watch-export":  # no signal: record where the weights are written, and if OUT exists then
    import exporters.hf as hf
    real_save = hf.save_file
    out = sys.argv[sys.argv.index("--out") + 1]
    def save_file(tensors, filename, *a, **k):
        real_save(tensors, filename, *a, **k)
        with open(os.environ["WATCH_LOG"], "w") as f:
            json.dump({"written": str(filename), "out_exists": os.path.exists(out)}, f)
    hf.save_file = save_file
from compressor.cli import main
sys.exit(main(sys.argv[3:]))
'''


def _run_with_signal(sig: str, stage: str, *args: str, env: dict | None = None):
    return run_python(_SIGNAL_WRAPPER, sig, stage, *args, env={"COLUMNS": "200", **(env or {})})


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("stage", ["calibration", "export"])
def test_interrupt_leaves_no_output(tmp_path, tiny_model_dir, sig, stage):
    out = tmp_path / "o"
    p = _run_with_signal(sig, stage, str(tiny_model_dir), *FAST, "--out", str(out))
    assert_clean_failure(p, out, f"Interrupted by {sig}; nothing was written.", code=130)
    if stage == "export":
        assert "dense held-out perplexity" in p.stderr  # it got as far as the export
    assert sorted(x.name for x in tmp_path.iterdir()) == []


def test_second_signal_during_cleanup_does_not_leave_the_temporary_directory(tmp_path, tiny_model_dir):
    out = tmp_path / "o"
    p = _run_with_signal("SIGINT", "export-twice", str(tiny_model_dir), *FAST, "--out", str(out))
    assert_clean_failure(p, out, "Interrupted by SIGINT; nothing was written.", code=130)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.integration
def test_sigint_from_outside_during_calibration_of_the_embedded_model(tmp_path, smollm2_dir):
    """A real Ctrl-C from another process while the embedded model calibrates."""
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "compressor", str(smollm2_dir), "--nsamples", "64", "--seqlen", "256",
           "--ratio", "0.2", "--no-checks", "--threads", "1", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    seen = []
    for line in proc.stderr:  # the line printed just before the calibration pass starts
        seen.append(line)
        if "dense held-out perplexity" in line:
            break
    time.sleep(1.0)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    stdout, rest = proc.communicate(timeout=300)
    result = subprocess.CompletedProcess(cmd, proc.returncode, stdout, "".join(seen) + rest)
    assert_clean_failure(result, out, "Interrupted by SIGINT; nothing was written.", code=130)
    assert "pruned held-out perplexity" not in result.stderr  # it really stopped during calibration


def test_output_is_written_to_a_temporary_sibling_and_renamed(tmp_path, tiny_model_dir):
    out = tmp_path / "o"
    log = tmp_path / "watch.json"
    p = _run_with_signal("SIGINT", "watch-export", str(tiny_model_dir), *FAST, "--out", str(out),
                         env={"WATCH_LOG": str(log)})
    assert p.returncode == 0, p.stderr[-3000:]
    seen = json.loads(log.read_text())
    written = Path(seen["written"])
    assert written.parent.parent == tmp_path and written.parent.name.startswith(".o.tmp-"), seen
    assert seen["out_exists"] is False  # OUT appears only by the final rename
    assert (out / "model.safetensors").is_file() and (out / "report.json").is_file()
    assert not list(tmp_path.glob(".o.tmp-*"))


@pytest.fixture
def tiny_fs(tmp_path):
    """A real 256 KiB tmpfs (conftest.small_tmpfs): less than the tiny model's export (about 700 KiB)."""
    with small_tmpfs(tmp_path, "256k") as mnt:
        yield mnt


def test_disk_full_during_export(tiny_fs, tiny_model_dir):
    out = tiny_fs / "o"
    p = run_main(str(tiny_model_dir), *FAST, "--out", str(out))
    assert_clean_failure(p, out, "is full; nothing was written.", code=28)
    assert list(tiny_fs.iterdir()) == []


def test_disk_full_while_writing_a_container_context(tiny_fs, tmp_path, tiny_model_dir):
    export = tmp_path / "export"
    p = run_main(str(tiny_model_dir), *FAST, "--out", str(export))
    assert p.returncode == 0, p.stderr[-3000:]
    ctx = tiny_fs / "ctx"
    p = run_main("container", str(export), "--out", str(ctx))
    assert_clean_failure(p, ctx, "is full; nothing was written.", code=28)
    assert list(tiny_fs.iterdir()) == []


def _copy_without_weights(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    return dst


@pytest.mark.parametrize("mode", ["auto", "on"], ids=["in-memory", "out-of-core"])
@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_corrupt_safetensors(tmp_path, tiny_model_dir, kind, mode):
    model = _copy_without_weights(tiny_model_dir, tmp_path / "m")
    real = (tiny_model_dir / "model.safetensors").read_bytes()
    data = b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}xx" if kind == "garbage" else real[: len(real) // 2]
    (model / "model.safetensors").write_bytes(data)
    out = tmp_path / "o"
    p = run_main(str(model), *FAST, "--out-of-core", mode, "--out", str(out))
    assert_clean_failure(p, out, "corrupt or truncated")
    assert not (tmp_path / ".o.fitprune-work").exists()


def _gguf_with_architecture(path: Path, arch: str) -> Path:
    """A small but well-formed GGUF file (with a tokenizer) naming an architecture."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    tokens = ["<unk>", "<s>", "</s>", *[chr(c) for c in range(97, 123)]]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_merges([])
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_of_an_unsupported_architecture(tmp_path):
    model = _gguf_with_architecture(tmp_path / "m.gguf", "rwkv6")
    out = tmp_path / "o"
    p = run_main(str(model), *FAST, "--out", str(out))
    assert_clean_failure(p, out, "Cannot read the GGUF file")
    assert "rwkv6" in p.stderr


def test_file_that_is_not_gguf(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"definitely not GGUF")
    out = tmp_path / "o"
    p = run_main(str(model), *FAST, "--out", str(out))
    assert_clean_failure(p, out, "is not a GGUF file")


@pytest.mark.parametrize("encoding", ["utf-16", "latin-1"])
def test_calibration_text_of_the_wrong_encoding(tmp_path, tiny_model_dir, encoding):
    text = tmp_path / "calib.txt"
    text.write_bytes(("Überprüfung der Kalibrierung, déjà vu. " * 200).encode(encoding))
    out = tmp_path / "o"
    p = run_main(str(tiny_model_dir), *FAST, "--calib", str(text), "--out", str(out))
    assert_clean_failure(p, out, "is not UTF-8 text")


def _weights_hash(d: Path) -> str:
    return hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()


def test_same_seed_gives_bit_identical_weights(tmp_path, tiny_model_dir):
    args = ["--nsamples", "8", "--seqlen", "32", "--round-to", "8", "--ratio", "0.3", "--no-checks"]
    runs = {}
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        p = run_cli(str(tiny_model_dir), *args, "--seed", seed, "--out", str(tmp_path / name))
        assert p.returncode == 0, p.stderr[-3000:]
        runs[name] = _weights_hash(tmp_path / name)
    assert runs["a"] == runs["b"]
    # the hash does see the calibration: another seed draws other windows and other weights
    assert runs["c"] != runs["a"]


# ---- out of core: the same failures, and the work directory beside --out never stays behind ----

OOC = ("--out-of-core", "on")


def test_disk_full_during_streaming_export(tiny_fs, tiny_model_dir):
    out = tiny_fs / "o"
    p = run_main(str(tiny_model_dir), *FAST, *OOC, "--out", str(out))
    assert_clean_failure(p, out, "is full; nothing was written.", code=28)
    assert list(tiny_fs.iterdir()) == []  # no work directory either


def test_missing_shard_out_of_core(tmp_path, tiny_model_dir):
    model = _copy_without_weights(tiny_model_dir, tmp_path / "m")
    shutil.copy(tiny_model_dir / "model.safetensors", model / "model-00001-of-00002.safetensors")
    from safetensors import safe_open

    with safe_open(str(tiny_model_dir / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    weight_map = {k: "model-00001-of-00002.safetensors" for k in keys}
    weight_map["model.layers.1.mlp.down_proj.weight"] = "model-00002-of-00002.safetensors"
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    out = tmp_path / "o"
    p = run_main(str(model), *FAST, *OOC, "--out", str(out))
    assert_clean_failure(p, out, "the shard model-00002-of-00002.safetensors named in its index is missing")
