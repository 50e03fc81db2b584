"""Exports reload in a fresh process (stock transformers, no pruning code) with the same logits."""

import json

import pytest
import torch
from safetensors.torch import save_file

from compressor.model import adapter_for
from compressor.prune import COMPENSATION, IMPORTANCE
from compressor.prune.allocation import allocate
from compressor.prune.driver import Compute, prune_model, score_layers
from exporters import export_hf
from tests.conftest import run_python, tiny_model

CASES = [
    # family, structure, compensation, expected format, expected architecture
    ("llama-mha", "uniform", "none", "native", "LlamaForCausalLM"),
    ("llama-gqa", "uniform", "bias", "native", "LlamaForCausalLM"),
    ("llama-gqa", "global", "bias", "fitprune", "FitPruneForCausalLM"),
    ("llama-mha", "global", "none", "fitprune", "FitPruneForCausalLM"),
    ("mistral", "uniform", "none", "native", "MistralForCausalLM"),
    ("mistral", "uniform", "bias", "fitprune", "FitPruneForCausalLM"),
    ("qwen2", "uniform", "none", "native", "Qwen2ForCausalLM"),
    ("qwen2", "global", "bias", "fitprune", "FitPruneForCausalLM"),
    ("qwen3", "uniform", "none", "native", "Qwen3ForCausalLM"),
    ("qwen3", "global", "bias", "fitprune", "FitPruneForCausalLM"),
]

RELOAD = r"""
import json, sys, torch
from safetensors.torch import load_file
mode = sys.argv[1]
if mode == "registered":
    import compressor.model.hf_arch  # fitprune's transformers registration only, no pruning code
from transformers import AutoModelForCausalLM
assert not [m for m in sys.modules if m.startswith(("compressor.prune", "compressor.budget", "compressor.evaluate"))]
res = {}
for d in sys.argv[2:]:
    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, trust_remote_code=(mode == "remote"))
    ref = load_file(d + "/expected.safetensors")
    with torch.no_grad():
        got = m(ref["input_ids"]).logits
    res[d] = [type(m).__name__, float((got - ref["logits"]).abs().max())]
print(json.dumps(res))
"""


def _pruned(family, structure, comp, ratio=0.35):
    model = tiny_model(family, seed=3)
    adapter = adapter_for(model)
    x = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(1))
    scored, _ = score_layers(model, adapter, x, IMPORTANCE.get("flap"), Compute(batch_size=3))
    keeps = allocate(scored.scores, ratio, structure, round_to=8, standardized=structure == "global")
    prune_model(model, adapter, keeps, scored, COMPENSATION.get(comp))
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    dirs = []
    for family, structure, comp, fmt, arch in CASES:
        model = _pruned(family, structure, comp)
        d = root / f"{family}-{structure}-{comp}"
        d.mkdir()
        res = export_hf(model, None, d)
        ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            logits = model(ids).logits
        save_file({"input_ids": ids, "logits": logits.contiguous()}, str(d / "expected.safetensors"))
        dirs.append((d, res, fmt, arch))
    return dirs


def test_export_format_follows_the_shape(exported):
    for d, res, fmt, arch in exported:
        assert (res.format, res.architecture) == (fmt, arch), d.name
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["architectures"] == [arch]
        assert not list(d.glob("*.bin")) and not list(d.glob("*.pt"))


@pytest.mark.parametrize("mode", ["registered", "remote"])
def test_fresh_process_reload_matches_in_memory_logits(exported, mode, tmp_path):
    dirs = [str(d) for d, res, *_ in exported if mode == "registered" or res.format == "fitprune"]
    p = run_python(RELOAD, mode, *dirs, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    for d, (cls, diff) in res.items():
        assert diff <= 1e-4, (d, cls, diff)


def test_llama_head_count_not_dividing_hidden_goes_to_mistral(tmp_path):
    model = tiny_model("llama-mha", num_attention_heads=6, num_key_value_heads=6, head_dim=8)
    adapter = adapter_for(model)
    from compressor.prune.surgery import LayerKeep, prune_layer

    for layer in adapter.layers(model):
        prune_layer(adapter, layer, LayerKeep([0, 1, 2, 3, 4], [0, 1, 2, 3, 4], list(range(64))))
    res = export_hf(model, None, tmp_path)
    assert res.architecture == "MistralForCausalLM"  # 48 % 5 != 0: LlamaConfig would refuse it
