"""Out of core: weights stay in the checkpoint and one layer at a time is in memory.

- the out-of-core prune gives the in-memory prune's weights (every family, uniform and global,
  one pass keeping the Gram matrices and two passes recomputing them);
- an interrupted run resumed from its work directory gives bit-identical weights;
- the layer-wise perplexity equals the whole-model one;
- the CLI runs out of core end to end, and a SIGTERM keeps the work for --resume.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compressor.model import adapter_for
from compressor.model.lazy import LazyModel
from compressor.model.loading import load
from compressor.pipeline.streamed import ExportSink
from compressor.prune import COMPENSATION
from compressor.prune.driver import Compute, PruneSpec, prune
from compressor.prune.resume import WorkState
from exporters import export_hf
from tests.conftest import ROOT, run_cli, tiny_model

BIG = 2**50  # free memory that holds every Gram matrix (one pass)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _save_tiny(path: Path, family: str, layers: int = 3, **over) -> Path:
    model = tiny_model(family, layers=layers, **over)
    model.save_pretrained(path)
    return path


def _calib(n: int = 8, seqlen: int = 16, vocab: int = 128) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(2, vocab, (n, seqlen), generator=g)


def _in_memory(path: Path, spec: PruneSpec, calib) -> dict[str, torch.Tensor]:
    loaded = load(str(path), tokenizer_required=False)
    prune(loaded.model, adapter_for(loaded.model), calib, spec, Compute(batch_size=4))
    out = path.parent / (path.name + "-mem")
    out.mkdir()
    export_hf(loaded.model, None, out)
    return _weights(out)


def _out_of_core(path: Path, spec: PruneSpec, calib, work_dir: Path, free: int = BIG, work: WorkState | None = None,
                 shard_bytes: int | None = None, sink_cls=ExportSink) -> tuple[WorkState, object]:
    lazy = LazyModel(path)
    if work is None:
        work = WorkState(work_dir, {"test": 1})
        work.create()
    sink = sink_cls(lazy, adapter_for(lazy.model), COMPENSATION.get(spec.compensation), lazy.dtype, work,
                    shard_bytes=shard_bytes)
    res = prune(lazy, adapter_for(lazy.model), calib, spec, Compute(batch_size=4), sink, work=work,
                            free_bytes=free, say=lambda *_: None)
    sink.finish(None)
    return work, res


@pytest.mark.parametrize("structure", ["uniform", "global"])
@pytest.mark.parametrize("free", [BIG, 0], ids=["one-pass", "two-pass"])
def test_out_of_core_gives_the_in_memory_weights(tmp_path, family, structure, free):
    path = _save_tiny(tmp_path / "m", family)
    spec = PruneSpec(metric="flap", compensation="lsq+bias", structure=structure, ratio=0.3, round_to=8)
    calib = _calib()
    ref = _in_memory(path, spec, calib)
    work, res = _out_of_core(path, spec, calib, tmp_path / "w", free=free)
    assert res.notes["out_of_core"] == ("one-pass" if free else "two-pass")
    got = _weights(work.export_dir)
    assert set(got) == set(ref)
    for k in ref:
        assert got[k].shape == ref[k].shape, k
        assert float((got[k] - ref[k]).abs().max()) <= 1e-6, k


@pytest.mark.parametrize("metric,compensation", [("output-approx", "bias"), ("wanda-sp", "lsq-dense+bias")])
def test_greedy_out_of_core_gives_the_in_memory_weights(tmp_path, metric, compensation):
    """The greedy pass (a sequential metric, or a re-fit towards the dense stream) out of core."""
    path = _save_tiny(tmp_path / "m", "llama-gqa")
    spec = PruneSpec(metric=metric, compensation=compensation, structure="uniform", ratio=0.3, round_to=8)
    calib = _calib()
    ref = _in_memory(path, spec, calib)
    work, res = _out_of_core(path, spec, calib, tmp_path / "w")
    assert res.notes["out_of_core"] == "greedy"
    got = _weights(work.export_dir)
    assert set(got) == set(ref)
    assert max(float((got[k] - ref[k]).abs().max()) for k in ref) <= 1e-6


class _Stop(KeyboardInterrupt):
    pass


class _FailingWork(WorkState):
    """Stops the run right after pass 1 saved layer `after`."""

    after = 1

    def save_pass1_layer(self, i, *args, **kw):
        super().save_pass1_layer(i, *args, **kw)
        if i == self.after:
            raise _Stop


class _FailingSink(ExportSink):
    """Stops the run right after pass 2 wrote layer `after` to disk."""

    after = 2

    def add(self, index, layer):
        flushed = super().add(index, layer)
        if index == self.after:
            raise _Stop
        return flushed

    def state(self):
        return super().state()


@pytest.mark.parametrize("stop_in", ["pass1", "pass2"])
@pytest.mark.parametrize("free", [BIG, 0], ids=["one-pass", "two-pass"])
def test_resume_gives_identical_weights(tmp_path, stop_in, free):
    path = _save_tiny(tmp_path / "m", "llama-gqa", layers=5)
    spec = PruneSpec(metric="flap", compensation="lsq+bias", structure="global", ratio=0.3, round_to=8)
    calib = _calib()
    whole, _ = _out_of_core(path, spec, calib, tmp_path / "whole", free=free, shard_bytes=1)
    ref = _weights(whole.export_dir)

    folder = tmp_path / "resumed"
    work = (_FailingWork if stop_in == "pass1" else WorkState)(folder, {"test": 1})
    work.create()
    with pytest.raises(_Stop):
        _out_of_core(path, spec, calib, folder, free=free, work=work, shard_bytes=1,
                     sink_cls=_FailingSink if stop_in == "pass2" else ExportSink)
    again = WorkState(folder, {"test": 1})
    again.load()
    if stop_in == "pass1":
        assert again.pass1_done == 2 and again.pass2_done == 0
    else:
        # layer 2 reached the disk but the run stopped before its state was saved: it is written again
        assert again.pass1_done == 5 and again.pass2_done == 2
    _out_of_core(path, spec, calib, folder, free=free, work=again, shard_bytes=1)
    got = _weights(again.export_dir)
    assert set(got) == set(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert json.loads((again.export_dir / "model.safetensors.index.json").read_text())["weight_map"]


def test_resume_refuses_other_settings(tmp_path):
    from compressor.errors import UserError

    work = WorkState(tmp_path / "w", {"ratio": 0.2})
    work.create()
    with pytest.raises(UserError, match="other settings .*ratio"):
        WorkState(tmp_path / "w", {"ratio": 0.3}).load()


def test_layerwise_perplexity_equals_the_whole_model(tmp_path):
    from compressor.evaluate.perplexity import layerwise_perplexity, perplexity

    path = _save_tiny(tmp_path / "m", "qwen3")
    windows = _calib(6, 24)
    whole = perplexity(load(str(path), tokenizer_required=False).model, windows)
    lazy = LazyModel(path)
    assert abs(layerwise_perplexity(lazy, adapter_for(lazy.model), windows, vocab_chunk=50) / whole - 1) < 1e-5


def test_layerwise_perplexity_in_a_weight_format_equals_the_whole_model(tmp_path):
    """`simulate` (the run's weight format, compressed-tensors' fake quantization) gives the fake-quantized
    whole model's perplexity, with one layer's quantized copy alive at a time."""
    import weakref

    from compressor.evaluate.perplexity import layerwise_perplexity, perplexity
    from compressor.prune.planned import fake_quantized

    path = _save_tiny(tmp_path / "m", "llama-gqa")
    windows = _calib(6, 24)
    whole = perplexity(fake_quantized(load(str(path), tokenizer_required=False).model, "w8a8-int8"), windows)
    copies = []

    def simulate(layer):
        q = fake_quantized(layer, "w8a8-int8")
        copies.append(weakref.ref(q))
        assert sum(r() is not None for r in copies) == 1  # the previous layer's copy is gone
        return q

    lazy = LazyModel(path)
    got = layerwise_perplexity(lazy, adapter_for(lazy.model), windows, vocab_chunk=50, simulate=simulate)
    assert len(copies) == len(adapter_for(lazy.model).layers(lazy.model)) and copies[-1]() is None
    assert abs(got / whole - 1) < 1e-4


def test_lazy_model_refuses_incomplete_and_non_finite_checkpoints(tmp_path):
    from safetensors.torch import save_file

    from compressor.errors import UserError

    path = _save_tiny(tmp_path / "m", "llama-gqa")
    sd = load_file(str(path / "model.safetensors"))
    sd["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(sd, str(path / "model.safetensors"))
    lazy = LazyModel(path)
    with pytest.raises(UserError, match="non-finite values .*layers.1.mlp.up_proj"):
        lazy.materialize(lazy.model.model.layers[1], "model.layers.1", "cpu")
    del sd["model.layers.2.self_attn.q_proj.weight"]
    save_file(sd, str(path / "model.safetensors"))
    with pytest.raises(UserError, match="incomplete: it has no tensor 'model.layers.2.self_attn.q_proj.weight'"):
        LazyModel(path)  # refused from the headers, before any weight is read


@pytest.mark.slow
def test_cli_out_of_core_end_to_end_and_resume_after_sigterm(tmp_path, tiny_model_dir):
    """`--out-of-core on` writes a model stock transformers loads and generates with; a SIGTERM in the
    middle keeps the work directory (exit 130, the message says --resume), and `--resume` finishes
    with the weights an uninterrupted run writes."""
    from transformers import AutoConfig, AutoTokenizer

    from tests.conftest import tiny_config

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    path = tmp_path / "m"
    cfg = tiny_config("llama-gqa", vocab_size=len(tok), layers=8, hidden_size=192, intermediate_size=768,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=32)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    args = [str(path), "--ratio", "0.2", "--nsamples", "64", "--seqlen", "64", "--no-checks", "--out-of-core", "on",
            "--round-to", "16", "--threads", "1"]
    ref_out = tmp_path / "ref"
    p = run_cli(*args, "--out", str(ref_out))
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads((ref_out / "report.json").read_text())
    assert report["method"]["out_of_core"] == "one-pass"
    assert set(report["memory"]["stages"]) >= {"load", "perplexity_dense", "pruning_step", "export"}
    assert not list(tmp_path.glob(".ref*"))  # the work directory is gone

    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-m", "compressor", *args, "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = tmp_path / ".o.fitprune-work" / "state.json"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if state.is_file() and json.loads(state.read_text())["pass1_done"] >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "--resume" in err and "Traceback" not in err
    assert state.is_file() and not out.exists()
    p = run_cli(*args, "--out", str(out), "--resume")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming" in p.stderr
    ref, got = _weights(ref_out), _weights(out)
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    resumed = json.loads((out / "report.json").read_text())
    assert resumed["params"] == report["params"] and resumed["widths"] == report["widths"]
    assert not state.parent.exists()

    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "t = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "ids = t('The capital of France is', return_tensors='pt').input_ids\n"
        "out = m.generate(ids, max_new_tokens=5, do_sample=False)\n"
        "assert out.shape[1] == ids.shape[1] + 5\n"
        "print('GENERATED', type(m).__name__)\n"
    )
    g = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert "GENERATED" in g.stdout, g.stderr[-2000:]
    assert AutoConfig.from_pretrained(out, trust_remote_code=True).num_hidden_layers == 8


@pytest.mark.slow
def test_stale_work_directory_is_reported_and_removed(tmp_path, tiny_model_dir):
    stale = tmp_path / ".o.fitprune-work"
    stale.mkdir()
    (stale / "state.json").write_text("{}")
    p = run_cli(str(tiny_model_dir), "--ratio", "0.2", "--nsamples", "4", "--seqlen", "32", "--no-checks",
                "--out-of-core", "on", "--out", str(tmp_path / "o"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "interrupted run" in p.stderr
    assert not stale.exists() and (tmp_path / "o" / "report.json").is_file()


def test_resume_without_a_work_directory_is_one_sentence(tmp_path, tiny_model_dir):
    from tests.conftest import assert_clean_failure

    out = tmp_path / "o"
    p = run_cli(str(tiny_model_dir), "--ratio", "0.2", "--nsamples", "4", "--seqlen", "32", "--no-checks", "--resume",
                "--out", str(out))
    assert_clean_failure(p, out, "Nothing to resume")


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_depth(tmp_path, tiny_model_dir):
    """Two runs out of core (two passes: one layer's statistics at a time), 2 and 8 layers of the same
    width, each in its own process: the peak host RSS of the pruning step and of the layer-wise
    evaluation stays flat, where holding the 6 extra layers would add ~200 MB (bf16)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.conftest import tiny_config

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    peaks = {}
    for layers in (2, 8):
        path = tmp_path / f"m{layers}"
        cfg = tiny_config("llama-mha", vocab_size=len(tok), layers=layers, hidden_size=1024, intermediate_size=4096,
                          num_attention_heads=8, num_key_value_heads=8, head_dim=128)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(path)
        tok.save_pretrained(path)
        out = tmp_path / f"o{layers}"
        p = run_cli(str(path), "--ratio", "0.2", "--nsamples", "16", "--seqlen", "64", "--no-checks",
                    "--out-of-core", "on", "--passes", "two", "--round-to", "64", "--out", str(out))
        assert p.returncode == 0, p.stderr[-3000:]
        stages = json.loads((out / "report.json").read_text())["memory"]["stages"]
        peaks[layers] = {k: stages[k]["peak_rss_mib"]
                         for k in ("pruning_step", "perplexity_dense", "perplexity_pruned")}
    layer_mib = (4 * 1024 * 1024 + 3 * 1024 * 4096) * 2 / 2**20  # one layer in bf16: 32 MiB
    print(peaks)
    for stage in peaks[2]:
        assert peaks[8][stage] - peaks[2][stage] < 2 * layer_mib, (stage, peaks)


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("structure", ["uniform", "global"])
def test_smollm2_out_of_core_gives_the_in_memory_weights(tmp_path, smollm2_dir, structure):
    """The real model: the default method (flap + lsq+bias) out of core, with one layer's Gram
    matrices at a time (two passes), writes the weights the in-memory path writes (fp32, <= 1e-6)."""
    from compressor.data import load_texts

    loaded = load(str(smollm2_dir))
    texts = load_texts("builtin", loaded.tokenizer, loaded.model, 8, 128, 2, 0)
    spec = PruneSpec(metric="flap", compensation="lsq+bias", structure=structure, ratio=0.2, round_to=64)
    prune(loaded.model, adapter_for(loaded.model), texts.calib, spec, Compute())
    mem = tmp_path / "mem"
    mem.mkdir()
    export_hf(loaded.model, loaded.tokenizer, mem)
    ref = _weights(mem)
    work, res = _out_of_core(smollm2_dir, spec, texts.calib, tmp_path / "w", free=0)
    assert res.notes["out_of_core"] == "two-pass"
    got = _weights(work.export_dir)
    assert set(got) == set(ref)
    worst = max(float((got[k] - ref[k]).abs().max()) for k in ref)
    print(f"{structure}: max abs diff {worst:.3g} over {len(ref)} tensors")
    assert worst <= 1e-6


def test_both_paths_hold_the_checkpoint_s_dtype_unless_dtype_says_otherwise(tmp_path, tiny_model_dir, capsys):
    """A bfloat16 checkpoint is pruned in bfloat16 in memory and out of core alike (the weights are
    never widened to float32 unless --dtype asks), and exported in it; --dtype float32 widens them."""
    import shutil

    from transformers import AutoModelForCausalLM

    from compressor.cli import main

    ckpt = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(ckpt)
    for f in tiny_model_dir.glob("tokenizer*"):
        shutil.copy(f, ckpt / f.name)
    base = [str(ckpt), "--ratio", "0.3", "--nsamples", "4", "--seqlen", "32", "--round-to", "8", "--no-checks",
            "--domain-windows", "0"]
    for extra, want in (([], "bfloat16"), (["--out-of-core", "on"], "bfloat16"), (["--dtype", "float32"], "float32"),
                        (["--out-of-core", "on", "--dtype", "float32"], "float32")):
        out = tmp_path / f"o{len(list(tmp_path.iterdir()))}"
        assert main([*base, *extra, "--out", str(out)]) == 0
        r = json.loads((out / "report.json").read_text())
        assert r["method"]["dtype"] == want and r["export"]["dtype"] == want, (extra, r["method"], r["export"])
        assert {t.dtype for f in out.glob("*.safetensors") for t in load_file(f).values()} == {getattr(torch, want)}
    err = " ".join(capsys.readouterr().err.split())
    assert "in memory: the weights in bfloat16 (the checkpoint's dtype)" in err
    assert "computed in bfloat16" in err and "computed in float32" in err
