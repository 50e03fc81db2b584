"""Compensation: what replaces the removed units' contribution. One function per name in
`COMPENSATIONS`; each gets the layer (still unpruned), what is kept, and the engine's statistics
of the inputs of `o_proj` / `down_proj`, and returns extra biases and/or re-fitted weights for
`surgery.prune_layer`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .adapters import Adapter
from .engine import LayerStats
from .errors import UserError
from .surgery import LayerKeep, head_channels


@dataclass
class Fix:
    o_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    o_weight: torch.Tensor | None = None
    down_weight: torch.Tensor | None = None


@dataclass(frozen=True)
class Compensation:
    name: str
    fn: Callable[[Adapter, nn.Module, LayerKeep, LayerStats], Fix]
    adds_bias: bool
    help: str = ""


COMPENSATIONS: dict[str, Compensation] = {}


def compensation(name: str, adds_bias: bool, help: str = ""):
    def wrap(fn):
        COMPENSATIONS[name] = Compensation(name, fn, adds_bias, help)
        return fn

    return wrap


def _removed(total: int, kept: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(total, dtype=torch.bool)
    mask[kept] = False
    return mask.nonzero().flatten()


def removed_channels(adapter: Adapter, layer: nn.Module, keep: LayerKeep) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the removed input channels of o_proj and of down_proj."""
    shape = adapter.shape(layer)
    attn = _removed(shape.num_heads * shape.head_dim, head_channels(keep.q_heads, shape.head_dim))
    mlp = _removed(shape.intermediate_size, torch.tensor(keep.channels, dtype=torch.long))
    return attn, mlp


@compensation("none", adds_bias=False, help="Drop the removed units and do nothing else.")
def no_compensation(adapter, layer, keep, stats) -> Fix:
    return Fix()


@compensation("bias", adds_bias=True,
              help="FLAP bias compensation: the removed channels' mean contribution W[:, removed] @ mean(x[removed]) "
                   "becomes a bias of o_proj / down_proj.")
def bias_compensation(adapter: Adapter, layer: nn.Module, keep: LayerKeep, stats: LayerStats) -> Fix:
    rm_attn, rm_mlp = removed_channels(adapter, layer, keep)
    o = adapter.attention(layer).o_proj.weight.data.double()
    down = adapter.mlp(layer).down_proj.weight.data.double()
    mean_a, mean_m = stats.attn.mean.cpu(), stats.mlp.mean.cpu()
    return Fix(o_bias=o[:, rm_attn] @ mean_a[rm_attn], down_bias=down[:, rm_mlp] @ mean_m[rm_mlp])


def get(name: str) -> Compensation:
    if name not in COMPENSATIONS:
        raise UserError(f"Unknown compensation '{name}' (known: {', '.join(sorted(COMPENSATIONS))}).")
    return COMPENSATIONS[name]
