"""Hugging Face checkpoint export (safetensors only).

Uniform widths -> the original architecture's own config (`LlamaForCausalLM`, `Qwen2ForCausalLM`,
...) with the pruned head counts and intermediate size, loadable by unmodified transformers and
vLLM. Bias compensation turns on the config's own bias switches (`attention_bias`, `mlp_bias`),
and every bias such a switch implies is written (zeros where unused). A Llama whose pruned head
count no longer divides `hidden_size` is written as `MistralForCausalLM` (same computation, takes
an explicit `head_dim`) when it has no biases.

Anything else (different widths per layer, or a bias the family's config cannot switch on) ->
fitprune's per-layer format (`model_type: fitprune`), with its modeling file beside the weights.

Depth: a wholly removed decoder layer (no attention and no MLP block) is left out of every export
and the layers after it are renumbered, so uniform widths with dropped layers are still the
original architecture, just with fewer `num_hidden_layers` (per-layer lists such as
`layer_types` trimmed). A layer that lost only its attention or only its MLP block needs the
per-layer format, where a 0 in `layer_num_attention_heads` / `layer_intermediate_size` is that
block's no-op (no weights, no norm, no KV cache).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from compressor.errors import UserError
from compressor.model import adapter_for, adapter_for_config
from compressor.model.adapters import Widths
from compressor.model.hf_arch import MODELING_FILE, FitPruneConfig

SHARD_BYTES = 4 * 2**30


@dataclass
class ExportResult:
    path: Path
    format: str  # "native" or "fitprune"
    architecture: str
    files: list[str]
    dropped_layers: list[int] = field(default_factory=list)  # original indices left out (depth pruning)


def read_widths(model: nn.Module) -> Widths:
    """Every layer's widths and biases, as the model's family adapter reads them."""
    return adapter_for(model).widths(model)


def _native_config(config, w: Widths):
    """The family's own config for a uniform model (the family adapter decides), or None."""
    from transformers import AutoConfig

    native = adapter_for_config(config).native_config(config.to_dict(), w)
    if native is None:
        return None
    family, d = native
    d.pop("model_type", None)
    cfg = AutoConfig.for_model(family, **d)
    cfg.architectures = [type(cfg).__name__.replace("Config", "ForCausalLM")]
    return cfg


def layer_renumbering(w: Widths) -> dict[int, int]:
    """{index in the pruned model: index in the export} for the layers an export keeps."""
    return {old: new for new, old in enumerate(w.kept_layers)}


_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")


def renumber_key(name: str, renumber: dict[int, int]) -> str | None:
    """A tensor name with its layer index renumbered; None for a tensor of a dropped layer."""
    m = _LAYER_KEY.match(name)
    if m is None:
        return name
    new = renumber.get(int(m.group(1)))
    return None if new is None else f"model.layers.{new}.{name[m.end():]}"


def _fitprune_config(config, w: Widths) -> FitPruneConfig:
    d = config.to_dict()
    keep = {f for f in FitPruneConfig.__dataclass_fields__}
    kw = {k: v for k, v in d.items() if k in keep}
    w = w.without_dropped()
    kw.update(
        base_model_type=config.model_type if config.model_type != "fitprune" else config.base_model_type,
        num_hidden_layers=len(w.heads),
        # the widest layer's (a model whose every attention or MLP block went keeps the original's)
        num_attention_heads=max(w.heads) or config.num_attention_heads,
        num_key_value_heads=max(w.kv_heads) or config.num_key_value_heads,
        intermediate_size=max(w.intermediate) or config.intermediate_size, head_dim=w.head_dim,
        layer_num_attention_heads=w.heads, layer_num_key_value_heads=w.kv_heads,
        layer_intermediate_size=w.intermediate,
        attention_bias=w.o_bias or w.qkv_bias, mlp_bias=w.down_bias,
        qk_norm=adapter_for_config(config).has_qk_norm(config.to_dict()),
    )
    cfg = FitPruneConfig(**kw)
    cfg.architectures = ["FitPruneForCausalLM"]
    cfg.auto_map = {
        "AutoConfig": "modeling_fitprune.FitPruneConfig",
        "AutoModelForCausalLM": "modeling_fitprune.FitPruneForCausalLM",
    }
    return cfg


def _state_dict(model: nn.Module, w: Widths, attention_bias: bool, mlp_bias: bool, tied: bool, dtype) -> dict:
    """Weights as the target config expects them: dropped layers left out and the rest renumbered,
    zero biases wherever a switch implies one."""
    renumber = layer_renumbering(w)
    sd = {}
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        new = renumber_key(name, renumber)
        if new is not None:
            sd[new] = t.detach().to(dtype).contiguous()
    adapter = adapter_for(model)
    for old, layer in enumerate(adapter.layers(model)):
        if old not in renumber:
            continue
        i = renumber[old]
        groups = []
        if attention_bias and adapter.has_attention(layer):
            groups.append(("self_attn", layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")))
        if mlp_bias and adapter.has_mlp(layer):
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


def target_config(config, w: Widths, dtype: torch.dtype, force_format: str | None = None):
    """(config to write, "native" or "fitprune") for a pruned model of widths `w` from `config`
    (`w` has one entry per layer of the pruned model, wholly removed ones included)."""
    if not w.kept_layers:
        raise UserError("Every decoder layer was removed: there is no model left to export.")
    cfg = None
    if force_format != "fitprune":
        cfg = _native_config(config, w)
    fmt = "native" if cfg is not None else "fitprune"
    if cfg is None:
        cfg = _fitprune_config(config, w)
    cfg.dtype = str(dtype).replace("torch.", "")
    return cfg, fmt


def finish_dir(out: Path, cfg, fmt: str, files: list[str], generation_config, tokenizer) -> ExportResult:
    """Everything beside the weights: config, modeling file (per-layer format), generation config, tokenizer."""
    cfg.save_pretrained(out)
    files = [*files, "config.json"]
    if fmt == "fitprune":
        shutil.copy(MODELING_FILE, out / MODELING_FILE.name)
        files.append(MODELING_FILE.name)
    if generation_config is not None:
        generation_config.save_pretrained(out)
        files.append("generation_config.json")
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return ExportResult(out, fmt, cfg.architectures[0], files)


def export_hf(model: nn.Module, tokenizer, out: Path, dtype: torch.dtype | None = None,
              force_format: str | None = None) -> ExportResult:
    """Write `model` (pruned in memory) into the existing directory `out`."""
    out = Path(out)
    config = model.config
    dtype = dtype or next(model.parameters()).dtype
    w = read_widths(model)
    cfg, fmt = target_config(config, w, dtype, force_format)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    sd = _state_dict(model, w, bool(getattr(cfg, "attention_bias", False)), bool(getattr(cfg, "mlp_bias", False)),
                     tied, dtype)
    files = _write_weights(sd, out)
    result = finish_dir(out, cfg, fmt, files, getattr(model, "generation_config", None), tokenizer)
    result.dropped_layers = w.dropped_layers
    return result

