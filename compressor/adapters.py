"""Architecture adapters: for each model family, which modules form the pruning groups.

A *head group* is a query head of a decoder layer together with its columns of `o_proj`; query
heads share key/value heads in GQA models, so a *KV group* is one KV head with the query heads
that read it. An *MLP channel* is one row of `gate_proj` and `up_proj` and one column of
`down_proj`. Pruned shapes always stay valid GQA shapes: every kept KV head keeps the same number
of query heads.

To add a family, register an `Adapter` under its `config.model_type`. The families here share
transformers' Llama module layout and differ only in biases and per-head norms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import UserError


@dataclass(frozen=True)
class LayerShape:
    """The widths of one decoder layer, read from its weights (so it is right after pruning too)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int

    @property
    def heads_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class Adapter:
    family: str  # the config.model_type it serves
    qkv_bias: str = "config"  # "config": config.attention_bias switches q/k/v/o biases; "always": q/k/v have one
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3): shared across heads, never sliced
    # can the family's own config express biases on o_proj / down_proj? (else: our per-layer format)
    o_bias_switch: str | None = "attention_bias"
    down_bias_switch: str | None = "mlp_bias"
    # does the family's config accept num_attention_heads that does not divide hidden_size?
    free_head_count: bool = True

    def decoder(self, model: nn.Module) -> nn.Module:
        return model.model

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return self.decoder(model).layers

    @staticmethod
    def attention(layer: nn.Module) -> nn.Module:
        return layer.self_attn

    @staticmethod
    def mlp(layer: nn.Module) -> nn.Module:
        return layer.mlp

    def shape(self, layer: nn.Module) -> LayerShape:
        attn, mlp = self.attention(layer), self.mlp(layer)
        head_dim = attn.head_dim
        return LayerShape(
            num_heads=attn.q_proj.out_features // head_dim,
            num_kv_heads=attn.k_proj.out_features // head_dim,
            head_dim=head_dim,
            intermediate_size=mlp.gate_proj.out_features,
        )

    def attention_modules(self, layer: nn.Module) -> dict[str, nn.Linear]:
        attn = self.attention(layer)
        return {"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj, "o": attn.o_proj}

    def mlp_modules(self, layer: nn.Module) -> dict[str, nn.Linear]:
        mlp = self.mlp(layer)
        return {"gate": mlp.gate_proj, "up": mlp.up_proj, "down": mlp.down_proj}


ADAPTERS: dict[str, Adapter] = {}


def register(adapter: Adapter) -> Adapter:
    ADAPTERS[adapter.family] = adapter
    return adapter


register(Adapter("llama", free_head_count=False))
register(Adapter("mistral", o_bias_switch=None, down_bias_switch=None))
register(Adapter("qwen2", qkv_bias="always", o_bias_switch=None, down_bias_switch=None))
register(Adapter("qwen3", qk_norm=True, down_bias_switch=None))
# our own per-layer-width format (a pruned model can be pruned again)
register(Adapter("fitprune", o_bias_switch=None, down_bias_switch=None))


def adapter_for(model: nn.Module) -> Adapter:
    model_type = getattr(model.config, "model_type", None)
    if model_type == "fitprune":
        return ADAPTERS["fitprune"]
    if model_type not in ADAPTERS:
        known = ", ".join(sorted(k for k in ADAPTERS if k != "fitprune"))
        raise UserError(f"The architecture '{model_type}' is not supported (supported: {known}).")
    return ADAPTERS[model_type]


def linear_bias(linear: nn.Linear) -> torch.Tensor | None:
    return linear.bias.data if linear.bias is not None else None
