"""Physical surgery: replace a layer's linear modules by smaller ones holding the kept rows or
columns, and add compensation biases. The result is an ordinary transformers model with
smaller matrices; per-layer widths are read back from the weights by `Adapter.shape`.

Depth is the same operation with nothing kept: a `LayerKeep` without query and KV heads removes the
layer's attention block, one without channels removes its MLP block, both remove the whole decoder
layer. A removed block becomes a `NoAttention` / `NoMLP` that adds nothing to the residual stream,
and the norm in front of it becomes an `nn.Identity` (its weights would be dead), so the model
stays an ordinary transformers model of the same depth whose parameter count is exact; the
exporters drop wholly removed layers and write block no-ops in the per-layer format."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..model.adapters import Adapter


@dataclass
class LayerKeep:
    """Indices kept in one decoder layer (sorted). No query and no KV heads: the attention block is
    removed; no channels: the MLP block is removed; neither: the whole layer is (an identity)."""

    q_heads: list[int]
    kv_heads: list[int]
    channels: list[int]

    @property
    def attention_removed(self) -> bool:
        return not self.q_heads and not self.kv_heads

    @property
    def mlp_removed(self) -> bool:
        return not self.channels

    @property
    def layer_removed(self) -> bool:
        return self.attention_removed and self.mlp_removed


class NoAttention(nn.Module):
    """A removed attention block: adds nothing to the residual stream.

    It still records a placeholder of one 1-wide head per token in the KV cache: transformers reads
    the sequence length from layer 0's cache (`Cache.get_seq_length`) for positions and masks, so
    a layer that cached nothing would make `generate` restart positions at 0. The placeholder costs
    1/(kv_heads * head_dim) of a real layer's cache."""

    def __init__(self, layer_idx: int | None, head_dim: int, config=None):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = head_dim
        self.config = config
        self.is_causal = True
        self.num_key_value_groups = 0

    def forward(self, hidden_states: torch.Tensor, past_key_values=None, **kwargs):
        if past_key_values is not None and self.layer_idx is not None:
            b, t = hidden_states.shape[:2]
            placeholder = hidden_states.new_zeros(b, 1, t, 1)
            past_key_values.update(placeholder, placeholder, self.layer_idx)
        return torch.zeros_like(hidden_states), None


class NoMLP(nn.Module):
    """A removed MLP block: adds nothing to the residual stream."""

    intermediate_size = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def is_removed(block: nn.Module) -> bool:
    """Is this attention or MLP module a removed block (ours, or a per-layer-format model's no-op)?"""
    return not (hasattr(block, "q_proj") or hasattr(block, "gate_proj"))


def _rows(lin: nn.Linear, idx: torch.Tensor) -> nn.Linear:
    new = nn.Linear(lin.in_features, len(idx), bias=lin.bias is not None, dtype=lin.weight.dtype,
                    device=lin.weight.device)
    new.weight.data.copy_(lin.weight.data[idx])
    if lin.bias is not None:
        new.bias.data.copy_(lin.bias.data[idx])
    return new


def _cols(lin: nn.Linear, idx: torch.Tensor, extra_bias: torch.Tensor | None) -> nn.Linear:
    has_bias = lin.bias is not None or extra_bias is not None
    new = nn.Linear(len(idx), lin.out_features, bias=has_bias, dtype=lin.weight.dtype, device=lin.weight.device)
    new.weight.data.copy_(lin.weight.data[:, idx])
    if has_bias:
        bias = torch.zeros(lin.out_features, dtype=torch.float64, device=lin.weight.device)
        if lin.bias is not None:
            bias += lin.bias.data.double()
        if extra_bias is not None:
            bias += extra_bias.to(bias.device, torch.float64)
        new.bias.data.copy_(bias.to(lin.weight.dtype))
    return new


def head_channels(heads: list[int], head_dim: int) -> torch.Tensor:
    return torch.tensor([h * head_dim + d for h in heads for d in range(head_dim)], dtype=torch.long)


def prune_layer(
    adapter: Adapter,
    layer: nn.Module,
    keep: LayerKeep,
    o_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    o_weight: torch.Tensor | None = None,
    down_weight: torch.Tensor | None = None,
) -> None:
    """Shrink `layer` in place to `keep`. `o_bias`/`down_bias` are added to the output biases;
    `o_weight`/`down_weight` (already restricted to the kept columns) replace the second-layer
    weights when a compensation re-fitted them.

    An empty attention (MLP) keep removes that block (see the module docstring); compensation
    given for a removed block is ignored, since no export format has a place for a constant
    output of a missing block (re-fit the next block instead). Removing a block twice is a no-op."""
    if bool(keep.q_heads) != bool(keep.kv_heads):
        raise ValueError("an attention keep needs both query and KV heads, or neither (the block removed)")
    if keep.attention_removed:
        _remove_attention(adapter, layer)
    else:
        _prune_attention(adapter, layer, keep, o_bias, o_weight)
    if keep.mlp_removed:
        _remove_mlp(adapter, layer)
    else:
        _prune_mlp(adapter, layer, keep, down_bias, down_weight)


def _remove_attention(adapter: Adapter, layer: nn.Module) -> None:
    attn = adapter.attention(layer)
    if not adapter.has_attention(layer):  # ours, or a per-layer-format model's no-op: removed already
        return
    layer.self_attn = NoAttention(getattr(attn, "layer_idx", None), attn.head_dim, getattr(attn, "config", None))
    layer.input_layernorm = nn.Identity()


def _remove_mlp(adapter: Adapter, layer: nn.Module) -> None:
    if not adapter.has_mlp(layer):
        return
    layer.mlp = NoMLP()
    layer.post_attention_layernorm = nn.Identity()


def _prune_attention(adapter: Adapter, layer: nn.Module, keep: LayerKeep, o_bias, o_weight) -> None:
    shape = adapter.shape(layer)
    attn = adapter.attention(layer)
    if not adapter.has_attention(layer):
        raise ValueError("this layer's attention block was removed: nothing to keep")
    per_kv = len(keep.q_heads) // max(len(keep.kv_heads), 1)
    groups = [h // shape.heads_per_kv for h in keep.q_heads]
    assert len(keep.q_heads) == per_kv * len(keep.kv_heads), "every kept KV head needs the same number of query heads"
    assert sorted(set(groups)) == list(keep.kv_heads), "kept query heads must belong to kept KV heads"

    q_idx = head_channels(keep.q_heads, shape.head_dim)
    kv_idx = head_channels(keep.kv_heads, shape.head_dim)
    attn.q_proj = _rows(attn.q_proj, q_idx)
    attn.k_proj = _rows(attn.k_proj, kv_idx)
    attn.v_proj = _rows(attn.v_proj, kv_idx)
    attn.o_proj = _cols(attn.o_proj, q_idx, o_bias)
    if o_weight is not None:
        attn.o_proj.weight.data.copy_(o_weight)
    attn.num_key_value_groups = per_kv
    for name in ("num_heads", "num_attention_heads"):
        if hasattr(attn, name):
            setattr(attn, name, len(keep.q_heads))
    for name in ("num_key_value_heads",):
        if hasattr(attn, name):
            setattr(attn, name, len(keep.kv_heads))


def _prune_mlp(adapter: Adapter, layer: nn.Module, keep: LayerKeep, down_bias, down_weight) -> None:
    mlp = adapter.mlp(layer)
    if not adapter.has_mlp(layer):
        raise ValueError("this layer's MLP block was removed: nothing to keep")
    ch = torch.tensor(keep.channels, dtype=torch.long)
    mlp.gate_proj = _rows(mlp.gate_proj, ch)
    mlp.up_proj = _rows(mlp.up_proj, ch)
    mlp.down_proj = _cols(mlp.down_proj, ch, down_bias)
    if down_weight is not None:
        mlp.down_proj.weight.data.copy_(down_weight)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(keep.channels)
