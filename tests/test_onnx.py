"""ONNX export with KV cache + the ONNX Runtime runtime, on tiny random models of every family.

Every model goes the way a user's does: pruned in memory -> `export_hf` -> reloaded by
transformers (the family's own class, or `FitPruneForCausalLM` for per-layer widths) ->
`export_onnx` -> ONNX Runtime. Reference: the reloaded transformers model in float32.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from compressor.model import adapter_for
from compressor.prune import COMPENSATION, IMPORTANCE
from compressor.prune.allocation import allocate
from compressor.prune.driver import Compute, prune_model, score_layers
from exporters import EXPORTERS, export_hf
from exporters.hf import read_widths
from exporters.onnx import MANIFEST_FILE, MODEL_FILE, export_onnx
from runtimes.base import Measurement, get_runtime
from tests.conftest import assert_clean_failure, run_cli, tiny_model

pytest.importorskip("onnxruntime", reason="the 'onnx' extra is not installed")
pytest.importorskip("onnxscript", reason="the 'onnx' extra is not installed")

from runtimes.onnx_runtime import OnnxRuntime  # noqa: E402

FP32_TOL = 1e-4

CASES = [
    # family, structure, compensation, expected HF format (uniform -> native, per-layer -> fitprune)
    ("llama-gqa", "uniform", "bias", "native"),  # LlamaForCausalLM with attention/mlp biases
    ("llama-gqa", "global", "bias", "fitprune"),
    ("mistral", "uniform", "none", "native"),  # exported with external data (threshold 0)
    ("qwen2", "global", "bias", "fitprune"),  # q/k/v biases of its own + compensation biases
    ("qwen3", "global", "bias", "fitprune"),  # QK norm
]
EXTERNAL = "mistral"


def _pruned(family: str, structure: str, comp: str, ratio: float = 0.4, attn_unit: str = "kv"):
    """A 2-layer tiny model pruned with FLAP (export time grows with the layer count); whole KV
    groups go, so per-layer models have different KV head counts per layer."""
    model = tiny_model(family, seed=3, layers=2)
    adapter = adapter_for(model)
    x = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(1))
    scored, _ = score_layers(model, adapter, x, IMPORTANCE.get("flap"), Compute(batch_size=3))
    keeps = allocate(scored.scores, ratio, structure, attn_unit, round_to=8, standardized=structure == "global")
    prune_model(model, adapter, keeps, scored, COMPENSATION.get(comp))
    return model


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One thread each for torch and ONNX Runtime: on a shared 2-core machine, thread pools that
    spin against each other (and against other jobs) cost far more than they bring."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _reload(path):
    from transformers import AutoModelForCausalLM

    import compressor.model.hf_arch  # noqa: F401

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=CASES, ids=["-".join(c[:3]) for c in CASES])
def exported(request, tmp_path_factory):
    family, structure, comp, fmt = request.param
    root = tmp_path_factory.mktemp(f"onnx-{family}-{structure}-{comp}")
    hf_dir, onnx_dir = root / "hf", root / "onnx"
    hf_dir.mkdir()
    onnx_dir.mkdir()
    res = export_hf(_pruned(family, structure, comp), None, hf_dir)
    assert res.format == fmt
    model = _reload(hf_dir)
    if fmt == "fitprune":  # the cache tensors really differ in shape from layer to layer
        assert len(set(read_widths(model).kv_heads)) > 1
    export_onnx(model, None, onnx_dir, external_data_threshold=0 if family == EXTERNAL else 2**30)
    rt = OnnxRuntime(onnx_dir, threads=1)
    yield model, rt, onnx_dir, res
    rt.close()


def _ids(batch, seq, seed=0, vocab=128):
    return torch.randint(2, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_manifest_and_graph_name_everything_the_runtime_needs(exported):
    model, _rt, onnx_dir, _res = exported
    m = json.loads((onnx_dir / MANIFEST_FILE).read_text())
    w = read_widths(model)
    n = model.config.num_hidden_layers
    assert m["num_layers"] == n and m["num_key_value_heads"] == w.kv_heads and m["head_dim"] == w.head_dim
    assert m["num_attention_heads"] == w.heads and m["intermediate_size"] == w.intermediate
    assert m["dtype"] == "float32"
    assert m["external_data_file"] == ("model.onnx.data" if model.config.model_type == EXTERNAL else None)
    assert m["inputs"]["past"]["names"][-1] == f"past_key_values.{n - 1}.value"
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_dir / MODEL_FILE), providers=["CPUExecutionProvider"])
    ins = {i.name: i.shape for i in sess.get_inputs()}
    outs = {o.name: o.shape for o in sess.get_outputs()}
    assert list(ins) == ["input_ids", "attention_mask", "position_ids", "logits_index", *m["inputs"]["past"]["names"]]
    assert list(outs) == ["logits", *m["outputs"]["present"]["names"]]
    for i, kv in enumerate(w.kv_heads):  # per-layer KV head counts are baked into the cache shapes
        assert ins[f"past_key_values.{i}.key"][1] == kv and outs[f"present.{i}.value"][1] == kv
    if m["external_data_file"]:  # every weight outside the protobuf; parity below runs on this layout
        import onnx

        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        assert (onnx_dir / m["external_data_file"]).stat().st_size >= 0.95 * weights
        proto = onnx.load(str(onnx_dir / MODEL_FILE), load_external_data=False)
        assert not [t.name for t in proto.graph.initializer
                    if t.data_location != onnx.TensorProto.EXTERNAL and len(t.raw_data) > 4096]


def test_logits_match_transformers(exported):
    model, rt, *_ = exported
    ids = _ids(2, 11)
    with torch.no_grad():
        ref = model(ids).logits.numpy()
    diff = np.abs(rt.logits(ids.numpy()) - ref).max()
    assert diff <= FP32_TOL, diff


def test_kv_cache_decoding_equals_full_recompute(exported):
    """Prefill 5 tokens, then a chunk of 3, then 4 single tokens through the cache: every
    position's logits equal one full pass over the 12 tokens."""
    _model, rt, *_ = exported
    ids = _ids(2, 12, seed=1).numpy()
    full = rt.logits(ids)
    past, got, start = rt.empty_cache(2), [], 0
    for size in (5, 3, 1, 1, 1, 1):
        chunk = ids[:, start:start + size]
        mask = np.ones((2, start + size), dtype=np.int64)
        pos = np.broadcast_to(np.arange(start, start + size), (2, size))
        logits, past = rt.step(chunk, mask, pos, past, np.arange(size))
        got.append(logits)
        start += size
    assert past[0].shape[2] == 12
    diff = np.abs(np.concatenate(got, axis=1) - full).max()
    assert diff <= FP32_TOL, diff


def test_greedy_tokens_equal_transformers_with_left_padding(exported):
    """A batch of prompts of different lengths (left-padded in ONNX Runtime) gives, row by row,
    what transformers' `generate` gives for each prompt alone."""
    model, rt, *_ = exported
    prompts = [[5, 9, 17, 33, 65, 3, 7], [11, 12], [100, 90, 80, 70]]
    got = rt.generate(prompts, 10, ignore_eos=True, logprobs=2)
    for p, g in zip(prompts, got, strict=True):
        with torch.no_grad():
            # no EOS at all (min_new_tokens would instead suppress EOS logits: different tokens)
            ref = model.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)[0, len(p):].tolist()
        assert g.token_ids == ref, (p, g.token_ids, ref)
        assert len(g.logprobs) == 10 and all(max(d, key=d.get) == t for d, t in zip(g.logprobs, ref, strict=True))


def test_generation_stops_at_eos(exported):
    model, rt, *_ = exported
    first = rt.generate([[5, 6, 7]], 1, ignore_eos=True)[0].token_ids[0]
    rt.eos_ids, saved = {first}, rt.eos_ids
    try:
        out = rt.generate([[5, 6, 7], [8, 9]], 6)
    finally:
        rt.eos_ids = saved
    assert out[0].token_ids == [first]
    assert len(out[1].token_ids) == 6 or out[1].token_ids[-1] == first


def test_registered_as_exporter_and_runtime():
    assert EXPORTERS.get("onnx") is export_onnx
    assert get_runtime("onnxruntime") is OnnxRuntime


def test_float16_runs_and_bfloat16_is_refused(tmp_path):
    model = tiny_model("qwen2", seed=5, layers=1)
    with pytest.raises(ValueError, match="bfloat16"):
        export_onnx(model, None, tmp_path, "bfloat16")
    export_onnx(model, None, tmp_path, "float16")
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is left alone
    rt = OnnxRuntime(tmp_path)
    assert rt.dtype == "float16" and rt.empty_cache(1)[0].dtype == np.float16
    with pytest.raises(ValueError, match="float16"):
        OnnxRuntime(tmp_path, dtype="float32")
    ids = _ids(1, 9)
    with torch.no_grad():
        ref = model.half().float()(ids).logits.numpy()  # the same fp16-rounded weights in fp32
    diff = np.abs(rt.logits(ids.numpy()) - ref).max()
    assert diff <= 2e-2, diff  # fp16 activations
    greedy = rt.generate([[5, 6, 7, 8]], 6, ignore_eos=True)[0].token_ids
    assert len(greedy) == 6




def test_cli_export_then_runtime_measures(tmp_path, tiny_model_dir):
    out = tmp_path / "onnx"
    p = run_cli("export-onnx", str(tiny_model_dir), "--out", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "max |logit diff|" in p.stdout
    names = {f.name for f in out.iterdir()}
    assert {MODEL_FILE, MANIFEST_FILE, "tokenizer.json", "tokenizer_config.json"} <= names
    with OnnxRuntime(out, threads=1) as rt:
        m = rt.measure(prompt_tokens=16, output_tokens=4, concurrency=2, runs=1, warmup=1)
    assert isinstance(m, Measurement) and m.runtime == "onnxruntime" and "onnxruntime" in m.device
    assert 0 < m.ttft_s and 0 < m.tpot_s and m.throughput_tok_s > 0


@pytest.mark.parametrize("case", ["bfloat16", "not-a-model"])  # each case pays a CLI start
def test_cli_bad_input_is_one_sentence(tmp_path, tiny_model_dir, case):
    out = tmp_path / "onnx"
    src, extra, match = str(tiny_model_dir), [], ""
    if case == "bfloat16":
        extra, match = ["--dtype", "bfloat16"], "no bfloat16 kernels"
    else:
        (tmp_path / "empty").mkdir()
        src, match = str(tmp_path / "empty"), "no config.json"
    p = run_cli("export-onnx", src, "--out", str(out), *extra)
    assert_clean_failure(p, out, match)


def test_export_onnx_refuses_a_quantized_export_in_one_sentence(tmp_path, capsys):
    from compressor.cli import main

    model = tmp_path / "q"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {
        "quant_method": "compressed-tensors", "format": "int-quantized"}}))
    assert main(["export-onnx", str(model), "--out", str(tmp_path / "onnx")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "is quantized (compressed-tensors)" in err and "Traceback" not in err
    assert not (tmp_path / "onnx").exists()
