"""Hugging Face checkpoint export (safetensors only).

Uniform widths -> the original architecture's own config (`LlamaForCausalLM`, `Qwen2ForCausalLM`,
...) with the pruned head counts and intermediate size, loadable by unmodified transformers and
vLLM. Bias compensation turns on the config's own bias switches (`attention_bias`, `mlp_bias`),
and every bias such a switch implies is written (zeros where unused). A Llama whose pruned head
count no longer divides `hidden_size` is written as `MistralForCausalLM` (same computation, takes
an explicit `head_dim`) when it has no biases.

Anything else (different widths per layer, or a bias the family's config cannot switch on) ->
fitprune's per-layer format (`model_type: fitprune`), with its modeling file beside the weights.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .hf_arch import MODELING_FILE, FitPruneConfig

SHARD_BYTES = 4 * 2**30


@dataclass
class ExportResult:
    path: Path
    format: str  # "native" or "fitprune"
    architecture: str
    files: list[str]


@dataclass(frozen=True)
class Widths:
    heads: list[int]
    kv_heads: list[int]
    intermediate: list[int]
    head_dim: int
    o_bias: bool  # any layer has an o_proj bias
    down_bias: bool
    qkv_bias: bool  # q/k/v carry biases already (Qwen2, or a Llama with attention_bias)

    @property
    def uniform(self) -> bool:
        return len(set(self.heads)) == 1 and len(set(self.kv_heads)) == 1 and len(set(self.intermediate)) == 1


def read_widths(model: nn.Module) -> Widths:
    layers = model.model.layers
    head_dim = layers[0].self_attn.head_dim
    return Widths(
        heads=[layer.self_attn.q_proj.out_features // head_dim for layer in layers],
        kv_heads=[layer.self_attn.k_proj.out_features // head_dim for layer in layers],
        intermediate=[layer.mlp.gate_proj.out_features for layer in layers],
        head_dim=head_dim,
        o_bias=any(layer.self_attn.o_proj.bias is not None for layer in layers),
        down_bias=any(layer.mlp.down_proj.bias is not None for layer in layers),
        qkv_bias=any(layer.self_attn.q_proj.bias is not None for layer in layers),
    )


def _native_config(config, w: Widths):
    """The family's own config for a uniform model, or None when it cannot express it."""
    from transformers import AutoConfig

    family = config.model_type
    d = config.to_dict()
    for key in ("architectures", "auto_map", "quantization_config", "transformers_version", "_name_or_path"):
        d.pop(key, None)
    d.update(num_attention_heads=w.heads[0], num_key_value_heads=w.kv_heads[0],
             intermediate_size=w.intermediate[0], head_dim=w.head_dim)
    if family == "llama":
        if w.o_bias or w.qkv_bias:
            d["attention_bias"] = True
        if w.down_bias:
            d["mlp_bias"] = True
        if d["hidden_size"] % w.heads[0] != 0:
            if d.get("attention_bias") or d.get("mlp_bias"):
                return None
            family = "mistral"
            d["model_type"] = "mistral"
            d["sliding_window"] = None
    elif family == "qwen3":
        if w.down_bias:
            return None
        if w.o_bias:
            d["attention_bias"] = True
    elif family in ("qwen2", "mistral"):
        if w.o_bias or w.down_bias:
            return None
    else:
        return None
    d.pop("model_type", None)
    cfg = AutoConfig.for_model(family, **d)
    cfg.architectures = [type(cfg).__name__.replace("Config", "ForCausalLM")]
    return cfg


def _fitprune_config(config, w: Widths) -> FitPruneConfig:
    d = config.to_dict()
    keep = {f for f in FitPruneConfig.__dataclass_fields__}
    kw = {k: v for k, v in d.items() if k in keep}
    kw.update(
        base_model_type=config.model_type if config.model_type != "fitprune" else config.base_model_type,
        num_attention_heads=max(w.heads), num_key_value_heads=max(w.kv_heads),
        intermediate_size=max(w.intermediate), head_dim=w.head_dim,
        layer_num_attention_heads=w.heads, layer_num_key_value_heads=w.kv_heads,
        layer_intermediate_size=w.intermediate,
        attention_bias=w.o_bias or w.qkv_bias, mlp_bias=w.down_bias,
        qk_norm=config.model_type == "qwen3" or bool(getattr(config, "qk_norm", False)),
    )
    cfg = FitPruneConfig(**kw)
    cfg.architectures = ["FitPruneForCausalLM"]
    cfg.auto_map = {
        "AutoConfig": "modeling_fitprune.FitPruneConfig",
        "AutoModelForCausalLM": "modeling_fitprune.FitPruneForCausalLM",
    }
    return cfg


def _state_dict(model: nn.Module, attention_bias: bool, mlp_bias: bool, tied: bool, dtype) -> dict:
    """Weights as the target config expects them: zero biases wherever a switch implies one."""
    sd = {}
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        sd[name] = t.detach().to(dtype).contiguous()
    for i, layer in enumerate(model.model.layers):
        groups = []
        if attention_bias:
            groups.append(("self_attn", layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")))
        if mlp_bias:
            groups.append(("mlp", layer.mlp, ("gate_proj", "up_proj", "down_proj")))
        for prefix, module, names in groups:
            for n in names:
                key = f"model.layers.{i}.{prefix}.{n}.bias"
                if key not in sd:
                    sd[key] = torch.zeros(getattr(module, n).out_features, dtype=dtype)
    # tensors that share storage cannot be saved twice by safetensors
    seen = {}
    for k, v in sd.items():
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen:
            sd[k] = v.clone()
        seen[ptr] = k
    return sd


def _write_weights(sd: dict, out: Path) -> list[str]:
    total = sum(t.numel() * t.element_size() for t in sd.values())
    if total <= SHARD_BYTES:
        save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    shards: list[dict] = [{}]
    size = 0
    for k, t in sd.items():
        b = t.numel() * t.element_size()
        if size + b > SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += b
    files, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        files.append(name)
        weight_map.update({k: name for k in shard})
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    return files + ["model.safetensors.index.json"]


def export_hf(model: nn.Module, tokenizer, out: Path, dtype: torch.dtype | None = None,
              force_format: str | None = None) -> ExportResult:
    """Write `model` (pruned in memory) into the existing directory `out`."""
    out = Path(out)
    config = model.config
    w = read_widths(model)
    dtype = dtype or next(model.parameters()).dtype
    cfg = None
    if w.uniform and force_format != "fitprune":
        cfg = _native_config(config, w)
    fmt = "native" if cfg is not None else "fitprune"
    if cfg is None:
        cfg = _fitprune_config(config, w)
    cfg.dtype = str(dtype).replace("torch.", "")
    tied = bool(getattr(config, "tie_word_embeddings", False))
    sd = _state_dict(model, bool(getattr(cfg, "attention_bias", False)), bool(getattr(cfg, "mlp_bias", False)),
                     tied, dtype)
    files = _write_weights(sd, out)
    cfg.save_pretrained(out)
    files.append("config.json")
    if fmt == "fitprune":
        shutil.copy(MODELING_FILE, out / MODELING_FILE.name)
        files.append(MODELING_FILE.name)
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(out)
        files.append("generation_config.json")
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return ExportResult(out, fmt, cfg.architectures[0], files)


EXPORTERS = {"hf": export_hf}
