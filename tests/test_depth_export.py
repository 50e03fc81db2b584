"""Depth pruning's exports: removed layers, attention-only and MLP-only removal, with width pruning.

A wholly removed layer is left out of every export (the rest renumbered): with uniform widths the
export is the original architecture with fewer layers, which stock transformers (and stock vLLM)
load. A layer without its attention or its MLP block is fitprune's per-layer format, a 0 in
`layer_num_attention_heads` / `layer_intermediate_size`; it reloads through the registered class,
as remote code, in the vLLM plugin and in ONNX Runtime. Reference: the pruned model in memory.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from compressor.errors import UserError
from compressor.model import adapter_for
from compressor.prune.surgery import LayerKeep, NoAttention, NoMLP, prune_layer
from exporters import export_hf
from exporters.hf_arch import FitPruneConfig
from exporters.stream import layer_tensors
from exporters.vllm_plugin import check_checkpoint, expected_keys
from tests.conftest import run_python, tiny_model
from tests.test_export import RELOAD

FP32_TOL = 1e-4


def _cut(model, plan: dict[int, str], widths: bool = True, seed: int = 0):
    """Prune `model` in place. plan: layer -> "drop" (whole layer), "attn" (attention block removed),
    "mlp" (MLP block removed); every layer's remaining blocks are also width-pruned (one KV group
    less where it has several, 3/4 of the MLP channels) when `widths`, with random compensation
    biases so that bias handling is exercised too."""
    adapter = adapter_for(model)
    g = torch.Generator().manual_seed(seed)
    for i, layer in enumerate(adapter.layers(model)):
        s = adapter.shape(layer)
        kv = list(range(s.num_kv_heads))
        channels = list(range(s.intermediate_size))
        if widths:
            kv = kv[1:] if len(kv) > 1 else kv
            channels = sorted(torch.randperm(s.intermediate_size, generator=g)[: s.intermediate_size * 3 // 4].tolist())
        heads = [k * s.heads_per_kv + j for k in kv for j in range(s.heads_per_kv)]
        what = plan.get(i)
        keep = LayerKeep([] if what in ("drop", "attn") else heads, [] if what in ("drop", "attn") else kv,
                         [] if what in ("drop", "mlp") else channels)
        o_bias, down_bias = (0.1 * torch.randn(2, model.config.hidden_size, generator=g)) if widths else (None, None)
        prune_layer(adapter, layer, keep, o_bias=o_bias, down_bias=down_bias)
    return model


def _ids(batch=2, seq=11, seed=7):
    return torch.randint(2, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _save_expected(model, d):
    ids = _ids()
    with torch.no_grad():
        logits = model(ids).logits
    save_file({"input_ids": ids, "logits": logits.contiguous()}, str(d / "expected.safetensors"))


def _reload(d):
    from transformers import AutoModelForCausalLM

    import exporters.hf_arch  # noqa: F401

    return AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()


def _greedy(model, prompt, n=8):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _greedy_no_cache(model, prompt, n=8):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    return ids[0, len(prompt):].tolist()


# ---- in memory --------------------------------------------------------------------------------

@pytest.mark.parametrize("removed", [0, 2], ids=["layer0", "middle"])
def test_generate_with_attention_removed_uses_the_cache_right(removed):
    """transformers reads the cached length from layer 0: with that layer's attention removed, the
    placeholder NoAttention caches keeps positions right, so cached decoding equals recomputing."""
    model = _cut(tiny_model("llama-gqa", layers=4), {removed: "attn", 1: "drop", 3: "mlp"})
    layers = adapter_for(model).layers(model)
    assert isinstance(layers[removed].self_attn, NoAttention) and isinstance(layers[3].mlp, NoMLP)
    prompt = [5, 9, 17, 33, 65]
    assert _greedy(model, prompt) == _greedy_no_cache(model, prompt)


def test_removed_blocks_read_as_zero_widths_and_cost_no_parameters():
    model = tiny_model("llama-gqa", layers=4)
    adapter = adapter_for(model)
    before = adapter.count_params(model)["decoder"]
    per_layer = before // 4
    _cut(model, {0: "attn", 1: "drop", 3: "mlp"}, widths=False)
    w = adapter.widths(model)
    assert (w.heads, w.kv_heads, w.intermediate) == ([0, 0, 6, 6], [0, 0, 2, 2], [64, 0, 64, 0])
    assert (w.kept_layers, w.dropped_layers, w.uniform, w.has_block_noops) == ([0, 2, 3], [1], False, True)
    attn = 48 * 8 * (6 + 2 + 2) + 6 * 8 * 48 + 48  # q, k, v, o and the input norm
    mlp = 3 * 48 * 64 + 48
    assert adapter.count_params(model)["decoder"] == before - per_layer - attn - mlp
    # removing a removed block again is a no-op; keeping units of a removed block is an error
    prune_layer(adapter, adapter.layers(model)[1], LayerKeep([], [], []))
    with pytest.raises(ValueError, match="was removed"):
        prune_layer(adapter, adapter.layers(model)[0], LayerKeep([0, 1, 2], [0], list(range(64))))
    with pytest.raises(ValueError, match="both query and KV heads"):
        prune_layer(adapter, adapter.layers(model)[2], LayerKeep([], [0], list(range(64))))


# ---- native: dropped layers, uniform widths ----------------------------------------------------

NATIVE = [("llama-gqa", "LlamaForCausalLM", True), ("qwen2", "Qwen2ForCausalLM", False),
          ("mistral", "MistralForCausalLM", False)]


@pytest.mark.parametrize("family,arch,widths", NATIVE, ids=[c[0] for c in NATIVE])
def test_dropped_layers_export_the_original_architecture_with_fewer_layers(tmp_path, family, arch, widths):
    """Layers 0 and 3 of 5 dropped (layer 0 too: its cache is what transformers reads the length
    from), the others uniform: stock transformers reloads it in a fresh process without fitprune."""
    model = _cut(tiny_model(family, layers=5, seed=2), {0: "drop", 3: "drop"}, widths=widths)
    res = export_hf(model, None, tmp_path)
    assert (res.format, res.architecture, res.dropped_layers) == ("native", arch, [0, 3])
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3 and cfg["architectures"] == [arch]
    if "layer_types" in cfg:
        assert len(cfg["layer_types"]) == 3
    assert cfg.get("attention_bias", False) == widths  # the compensation biases need the switch
    keys = set(load_file(str(tmp_path / "model.safetensors")))
    assert {int(k.split(".")[2]) for k in keys if k.startswith("model.layers.")} == {0, 1, 2}
    assert keys == expected_keys(cfg)
    _save_expected(model, tmp_path)
    p = run_python(RELOAD, "stock", str(tmp_path), cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    cls, diff = json.loads(p.stdout.strip().splitlines()[-1])[str(tmp_path)]
    assert cls == arch and diff <= FP32_TOL, (cls, diff)
    reloaded = _reload(tmp_path)
    assert _greedy(reloaded, [3, 4, 5]) == _greedy(model, [3, 4, 5])


def test_dropped_layers_with_unequal_widths_go_to_the_per_layer_format(tmp_path):
    model = _cut(tiny_model("llama-gqa", layers=3), {1: "drop"}, widths=False)
    adapter = adapter_for(model)
    prune_layer(adapter, adapter.layers(model)[2], LayerKeep([0, 1, 2], [0], list(range(32))))
    res = export_hf(model, None, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert res.format == "fitprune" and cfg["num_hidden_layers"] == 2
    assert (cfg["layer_num_attention_heads"], cfg["layer_intermediate_size"]) == ([6, 3], [64, 32])


# ---- fitprune: block no-ops ----------------------------------------------------------------------

PLAN = {0: "attn", 1: "drop", 2: "mlp", 4: "attn"}  # layer 3 keeps both blocks (width-pruned)


@pytest.fixture(scope="module", params=["llama-gqa", "qwen3"])
def noop_export(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"noops-{request.param}")
    model = _cut(tiny_model(request.param, layers=5, seed=4), PLAN)
    res = export_hf(model, None, d)
    _save_expected(model, d)
    return model, d, res


def test_block_noops_are_zeros_in_the_per_layer_config(noop_export):
    model, d, res = noop_export
    assert (res.format, res.architecture, res.dropped_layers) == ("fitprune", "FitPruneForCausalLM", [1])
    cfg = json.loads((d / "config.json").read_text())
    heads = 2 if model.config.model_type == "qwen3" else 3  # one KV group removed
    assert cfg["num_hidden_layers"] == 4
    assert cfg["layer_num_attention_heads"] == [0, heads, heads, 0]
    assert cfg["layer_num_key_value_heads"] == [0, 1, 1, 0]
    assert cfg["layer_intermediate_size"] == [48, 0, 48, 48]
    keys = set(load_file(str(d / "model.safetensors")))
    assert keys == expected_keys(cfg)
    assert not any(k.startswith("model.layers.0.self_attn") or k == "model.layers.0.input_layernorm.weight"
                   for k in keys)
    assert not any(k.startswith("model.layers.1.mlp") for k in keys)
    check_checkpoint(d)


@pytest.mark.parametrize("mode", ["registered", "remote"])
def test_block_noop_export_reloads_with_the_same_logits(noop_export, mode, tmp_path):
    _, d, _ = noop_export
    p = run_python(RELOAD, mode, str(d), cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    cls, diff = json.loads(p.stdout.strip().splitlines()[-1])[str(d)]
    assert cls == "FitPruneForCausalLM" and diff <= FP32_TOL, (cls, diff)


def test_block_noop_export_generates_like_the_pruned_model(noop_export):
    model, d, _ = noop_export
    reloaded = _reload(d)
    for prompt in ([5, 9, 17, 33], [100]):
        ref = _greedy(model, prompt)
        assert _greedy(reloaded, prompt) == ref == _greedy_no_cache(reloaded, prompt)


def test_checkpoint_check_wants_every_kept_blocks_tensor(noop_export, tmp_path):
    _, d, _ = noop_export
    for f in ("config.json", "model.safetensors"):
        (tmp_path / f).write_bytes((d / f).read_bytes())
    sd = load_file(str(tmp_path / "model.safetensors"))
    del sd["model.layers.2.post_attention_layernorm.weight"]
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.layers.2.post_attention_layernorm.weight"):
        check_checkpoint(tmp_path)


def test_per_layer_config_accepts_no_attention_but_not_lonely_kv_heads():
    FitPruneConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                   layer_num_attention_heads=[0, 4], layer_num_key_value_heads=[0, 2])
    with pytest.raises(ValueError, match="cannot share"):
        FitPruneConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=8, layer_num_attention_heads=[2, 4], layer_num_key_value_heads=[0, 2])


def test_every_layer_removed_is_refused(tmp_path):
    model = _cut(tiny_model("llama-mha", layers=2), {0: "drop", 1: "drop"})
    with pytest.raises(UserError, match="Every decoder layer was removed"):
        export_hf(model, None, tmp_path)
    assert not list(tmp_path.iterdir())


def test_streamed_layers_are_renumbered_and_dropped_ones_left_out():
    from exporters.hf import layer_renumbering, target_config

    model = _cut(tiny_model("llama-gqa", layers=4), {1: "drop", 2: "attn"})
    adapter = adapter_for(model)
    w = adapter.widths(model)
    cfg, fmt = target_config(model.config, w, torch.float32)
    renumber = layer_renumbering(w)
    assert fmt == "fitprune" and renumber == {0: 0, 2: 1, 3: 2}
    expected = expected_keys(cfg.to_dict())
    got = {}
    for i, layer in enumerate(adapter.layers(model)):
        got.update(layer_tensors(layer, i, expected, torch.float32, renumber))
    assert set(got) == {k for k in expected if k.startswith("model.layers.")}


# ---- real runtimes -------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.integration
def test_onnx_runtime_matches_torch_on_block_noops(tmp_path):
    """Attention removed in layer 0 and 3, MLP in layer 2, layer 1 dropped: the ONNX graph has cache
    inputs only for the attention layers, and ONNX Runtime matches torch, cached decoding included."""
    pytest.importorskip("onnxruntime", reason="the 'onnx' extra is not installed")
    pytest.importorskip("onnxscript", reason="the 'onnx' extra is not installed")
    from exporters.onnx import export_onnx
    from runtimes.onnx_runtime import OnnxRuntime

    torch.set_num_threads(1)
    hf, onnx_dir = tmp_path / "hf", tmp_path / "onnx"
    hf.mkdir()
    onnx_dir.mkdir()
    export_hf(_cut(tiny_model("qwen2", layers=5, seed=6), {0: "attn", 1: "drop", 2: "mlp", 3: "attn"}), None, hf)
    model = _reload(hf)
    export_onnx(model, None, onnx_dir)
    m = json.loads((onnx_dir / "fitprune_onnx.json").read_text())
    assert m["attention_layers"] == [1, 3] and m["num_key_value_heads"] == [0, 1, 0, 1]
    assert m["inputs"]["past"]["names"] == ["past_key_values.1.key", "past_key_values.1.value",
                                            "past_key_values.3.key", "past_key_values.3.value"]
    with OnnxRuntime(onnx_dir, threads=1) as rt:
        ids = _ids(2, 11)
        with torch.no_grad():
            ref = model(ids).logits.numpy()
        assert np.abs(rt.logits(ids.numpy()) - ref).max() <= FP32_TOL
        for prompt in ([5, 9, 17, 33, 65, 3, 7], [11, 12]):
            assert rt.generate([prompt], 8, ignore_eos=True)[0].token_ids == _greedy(model, prompt)
