"""Physical surgery: replace a layer's linear modules by smaller ones holding the kept rows or
columns, and add compensation biases. The result is an ordinary transformers model with
smaller matrices; per-layer widths are read back from the weights by `Adapter.shape`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..model.adapters import Adapter


@dataclass
class LayerKeep:
    """Indices kept in one decoder layer (sorted)."""

    q_heads: list[int]
    kv_heads: list[int]
    channels: list[int]


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
    weights when a compensation re-fitted them."""
    shape = adapter.shape(layer)
    attn, mlp = adapter.attention(layer), adapter.mlp(layer)
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

    ch = torch.tensor(keep.channels, dtype=torch.long)
    mlp.gate_proj = _rows(mlp.gate_proj, ch)
    mlp.up_proj = _rows(mlp.up_proj, ch)
    mlp.down_proj = _cols(mlp.down_proj, ch, down_bias)
    if down_weight is not None:
        mlp.down_proj.weight.data.copy_(down_weight)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(keep.channels)
