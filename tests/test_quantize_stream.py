"""Quantizing an export one decoder layer at a time (exporters/quantize_stream.py), which is what
`quantize_export` and so `compress --quantize` do, in memory and out of core: the checkpoint equals,
tensor for tensor and in config.json, the one compressed-tensors' lifecycle writes with the whole
model in memory (`quantize_in_memory`); it loads; its peak memory is a layer's, not the model's; a
full disk or an unreadable shard leaves the export as it was; `--out-of-core on --quantize` works.
vLLM serving streamed checkpoints is tests/test_quantize.py's vLLM tests (they quantize through
`quantize_export`, so they serve streamed W8A8 checkpoints: SmolLM2 in stock vLLM, per-layer ones in
the plugin)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compressor.errors import UserError
from tests.conftest import ROOT, run_cli, small_tmpfs, tiny_model
from tests.test_quantize import _per_layer_export, _tensors

WIDE = dict(hidden_size=128, intermediate_size=256, head_dim=32, num_attention_heads=4, num_key_value_heads=2)


def _uniform(path: Path, **over) -> Path:
    tiny_model("llama-gqa", **{"layers": 3, **over}).save_pretrained(path)
    return path


def _both(src: Path, tmp: Path, scheme: str) -> tuple[Path, Path]:
    """The export quantized by the whole model in memory (reference) and streamed (quantize_export)."""
    from exporters.quantize import quantize_export, quantize_in_memory

    ref, got = tmp / "in-memory", tmp / "streamed"
    shutil.copytree(src, ref)
    shutil.copytree(src, got)
    quantize_in_memory(ref, scheme)
    quantize_export(got, scheme)
    return ref, got


def _assert_same_checkpoint(ref: Path, got: Path) -> None:
    a, b = _tensors(ref), _tensors(got)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert json.loads((ref / "config.json").read_text()) == json.loads((got / "config.json").read_text())


CASES = [  # (export, scheme): fp8 is compressed on the CPU too (the library's cast to float8_e4m3fn)
    ("uniform", "w8a8-int8"), ("uniform", "fp8"), ("uniform-128", "w4a16"), ("tied", "w8a8-int8"),
    ("per-layer", "w8a8-int8"), ("per-layer", "w4a16"), ("per-layer", "fp8"),
]


@pytest.mark.parametrize("export, scheme", CASES)
def test_streamed_checkpoint_equals_the_in_memory_one(tmp_path, export, scheme):
    """Same tensor names, dtypes and values (int8 / packed int4 / fp8 weights, scales, the dense head
    and embeddings), same config.json (quantization_config included). The per-layer export has a
    layer without attention and one without an MLP (depth pruning's removed blocks); `tied` shares
    the embedding with the head, as SmolLM2 does (the head is then not in the checkpoint)."""
    if export == "per-layer":
        src, _ = _per_layer_export(tmp_path / "src")
    else:
        over = {"uniform": {}, "uniform-128": WIDE, "tied": {"tie_word_embeddings": True}}[export]
        src = _uniform(tmp_path / "src", **over)
    ref, got = _both(src, tmp_path, scheme)
    _assert_same_checkpoint(ref, got)
    names = set(_tensors(got))
    assert ("lm_head.weight" in names) == (export != "tied")
    assert len(list(got.glob("*.safetensors"))) > 1 and (got / "model.safetensors.index.json").is_file()
    assert not (got / ".fitprune-quantize").exists()


@pytest.mark.slow
def test_a_per_layer_export_of_the_cli_streams_to_the_in_memory_checkpoint(tmp_path, tiny_model_dir):
    """What `compress --structure global` writes (fitprune's format, its modeling file and auto_map in
    the config) quantizes to the same checkpoint both ways."""
    src = tmp_path / "global"
    p = run_cli(str(tiny_model_dir), "--profile", "cpu-2core", "--nsamples", "4", "--seqlen", "32", "--round-to", "8",
                "--ratio", "0.5", "--domain-windows", "0", "--structure", "global", "--no-checks", "--out", str(src))
    assert p.returncode == 0, p.stderr[-3000:]
    config = json.loads((src / "config.json").read_text())
    assert config["architectures"] == ["FitPruneForCausalLM"] and len(set(config["layer_num_attention_heads"])) > 1
    ref, got = _both(src, tmp_path, "w8a8-int8")
    _assert_same_checkpoint(ref, got)


def test_transformers_loads_the_streamed_checkpoint_as_the_in_memory_one(tmp_path):
    """transformers (compressed-tensors decompressing the weights, quantizing activations per token)
    runs the streamed checkpoint to the same logits as the in-memory one, close to the dense model."""
    from transformers import AutoModelForCausalLM

    src = _uniform(tmp_path / "src", **WIDE)
    ref, got = _both(src, tmp_path, "w8a8-int8")
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = AutoModelForCausalLM.from_pretrained(src)(x).logits
        a = AutoModelForCausalLM.from_pretrained(ref)(x).logits
        b = AutoModelForCausalLM.from_pretrained(got)(x).logits
    assert torch.equal(a, b)
    err = ((b - dense).norm() / dense.norm()).item()
    assert 1e-4 < err < 0.05, err


# ---- failures leave the export as it was ----------------------------------------------------

def _snapshot(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_an_unreadable_shard_is_one_sentence_and_changes_nothing(tmp_path):
    from exporters.quantize import quantize_export

    path = _uniform(tmp_path / "m")
    with open(path / "model.safetensors", "r+b") as f:
        f.truncate(f.seek(0, 2) - 100)  # the last tensor's bytes cut short
    before = _snapshot(path)
    with pytest.raises(UserError, match=r"model\.safetensors is corrupt or truncated"):
        quantize_export(path, "w8a8-int8")
    assert _snapshot(path) == before


def test_an_export_quantized_already_is_refused(tmp_path):
    from exporters.quantize import quantize_export

    path = _uniform(tmp_path / "m")
    quantize_export(path, "w8a8-int8")
    before = _snapshot(path)
    with pytest.raises(UserError, match="is quantized already"):
        quantize_export(path, "fp8")
    assert _snapshot(path) == before


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MiB tmpfs (conftest.small_tmpfs)."""
    with small_tmpfs(tmp_path, "2m") as mnt:
        yield mnt


def test_a_full_disk_is_one_sentence_and_leaves_the_dense_export(tmp_path, small_disk):
    """The dense export (1.8 MB) fits on the 2 MiB disk, its quantized shards (0.7 MB) beside it do not:
    the error says so (exit code 28 through the CLI), the dense export is untouched, no work folder stays."""
    from exporters.quantize import quantize_export

    path = _uniform(small_disk / "m", layers=2, **{**WIDE, "intermediate_size": 384}, vocab_size=256)
    before = _snapshot(path)
    assert 1.7e6 < sum(len(v) for v in before.values()) < 1.95e6
    with pytest.raises(UserError, match="is full; the export was not quantized") as err:
        quantize_export(path, "w8a8-int8")
    assert err.value.exit_code == 28
    assert _snapshot(path) == before


# ---- memory ---------------------------------------------------------------------------------

MEASURE = r"""
import json, resource, sys, time
from pathlib import Path
import torch
import transformers, compressed_tensors.compressors  # the interpreter's baseline: what quantizing imports
from exporters import quantize
if sys.argv[1] == "baseline":
    from transformers import AutoModelForCausalLM  # noqa: F401
    seconds = 0.0
else:
    t = time.perf_counter()
    getattr(quantize, sys.argv[1])(Path(sys.argv[2]), "w8a8-int8")
    seconds = time.perf_counter() - t
print("RESULT " + json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                              "seconds": seconds}))
"""


def measure(how: str, path: Path | None = None) -> dict:
    """Peak RSS (MiB) and seconds of quantizing `path` with exporters.quantize's function `how` in a
    fresh interpreter, or of the same imports alone (`baseline`). The child reports its own
    RUSAGE_SELF peak: RUSAGE_CHILDREN in the parent keeps the largest child's peak of the whole session."""
    p = subprocess.run([sys.executable, "-c", MEASURE, how, str(path or "")], capture_output=True, text=True,
                       cwd=ROOT, timeout=900, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(next(ln for ln in p.stdout.splitlines() if ln.startswith("RESULT "))[7:])


@pytest.mark.slow
def test_peak_memory_is_a_layer_not_the_checkpoint(tmp_path):
    """A random bf16 Llama of 12 layers of 1024 x 4096 (~390 MB, written shard by shard by
    benchmarks/random_checkpoint.py) quantizes with peak RSS above the interpreter's own (the same
    imports, measured in the same way) well below half the checkpoint: one layer is 30 MiB in bf16,
    and the layer's largest matrix is 16 MiB more in float32 while its scales are computed.
    Measured here: +72 MiB streamed (+63 MiB with 2 layers: flat in depth); the in-memory path adds
    +740 MiB, 1.9x the checkpoint (the model, and its compressed copy)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from random_checkpoint import write_checkpoint
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    (tok_dir / "tokenizer.json").write_text("{}")  # the checkpoint writer copies a tokenizer; quantizing needs none
    w = write_checkpoint(tmp_path / "ckpt", layers=12, hidden=1024, heads=8, kv_heads=4, intermediate=4096,
                         vocab=8192, shard_bytes=256 * 2**20, tokenizer_dir=tok_dir, fsync=False)
    size_mib = w.total_bytes / 2**20
    base = measure("baseline")["peak_mib"]
    streamed = measure("quantize_export", w.path)
    print(f"checkpoint {size_mib:.0f} MiB; baseline {base:.0f} MiB; streamed peak {streamed['peak_mib']:.0f} MiB "
          f"in {streamed['seconds']:.1f} s")
    assert json.loads((w.path / "config.json").read_text())["quantization_config"]["format"] == "int-quantized"
    assert streamed["peak_mib"] - base < 0.5 * size_mib, (streamed, base, size_mib)


# ---- the CLI, out of core -------------------------------------------------------------------

@pytest.mark.slow
def test_out_of_core_run_quantizes_its_export(tmp_path, tiny_model_dir):
    """`--out-of-core on --quantize w8a8-int8` (refused before streaming quantization existed) writes
    a compressed-tensors export equal, tensor for tensor, to the in-memory run's (both paths prune
    to the same weights and quantize the same way), and times and measures its quantize stage."""
    args = [str(tiny_model_dir), "--profile", "cpu-2core", "--ratio", "0.3", "--nsamples", "4", "--seqlen", "32",
            "--round-to", "8", "--structure", "uniform", "--domain-windows", "0", "--no-checks",
            "--quantize", "w8a8-int8"]
    out, ref = tmp_path / "o", tmp_path / "ref"
    p = run_cli(*args, "--out-of-core", "on", "--out", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "out of core" in p.stderr and "quantized the export: w8a8-int8" in p.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["format"] == "int-quantized"
    report = json.loads((out / "report.json").read_text())
    assert "compressed-tensors w8a8-int8" in report["export"]["format"]
    assert "quantize" in report["seconds"] and "quantize" in report["memory"]["stages"]
    assert all((out / f).is_file() for f in report["export"]["files"])
    assert not list(tmp_path.glob(".o*"))  # no work directory left
    p = run_cli(*args, "--out-of-core", "off", "--out", str(ref))
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = _tensors(ref), _tensors(out)
    assert sorted(a) == sorted(b) and a["model.layers.0.mlp.down_proj.weight"].dtype == torch.int8
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
