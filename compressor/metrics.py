"""Importance metrics: one function per name, registered in `METRICS`.

A metric looks at one decoder layer and the statistics the engine streamed at the inputs of
`o_proj` and `down_proj`, and returns a score per *input channel* of those two modules (higher =
more important): `attn` has num_heads x head_dim entries, `mlp` has intermediate_size entries.
Allocation turns channel scores into unit scores (a head, a GQA slice, a KV group, an MLP
channel) and picks what to keep. Adding a metric = one function decorated with `@metric(...)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .adapters import Adapter
from .engine import LayerStats


@dataclass
class ChannelScores:
    attn: torch.Tensor  # [num_heads * head_dim], float64
    mlp: torch.Tensor  # [intermediate_size], float64


@dataclass(frozen=True)
class Metric:
    name: str
    fn: Callable[[Adapter, nn.Module, LayerStats], ChannelScores]
    default_structure: str  # "global" or "uniform"
    standardize: bool  # standardize per layer and module before a global ranking (FLAP)
    needs_data: bool = True
    help: str = ""


METRICS: dict[str, Metric] = {}


def metric(name: str, default_structure: str, standardize: bool, needs_data: bool = True, help: str = ""):
    def wrap(fn):
        METRICS[name] = Metric(name, fn, default_structure, standardize, needs_data, help)
        return fn

    return wrap


def _col_sq_norm(lin: nn.Linear) -> torch.Tensor:
    return lin.weight.data.double().pow(2).sum(0)


@metric("flap", "global", standardize=True,
        help="FLAP fluctuation: variance of the input channel over calibration tokens x squared norm of its weight column.")
def flap(adapter: Adapter, layer: nn.Module, stats: LayerStats) -> ChannelScores:
    o = adapter.attention(layer).o_proj
    down = adapter.mlp(layer).down_proj
    return ChannelScores(
        attn=stats.attn.var * _col_sq_norm(o).to(stats.attn.var.device),
        mlp=stats.mlp.var * _col_sq_norm(down).to(stats.mlp.var.device),
    )


@metric("wanda-sp", "uniform", standardize=False,
        help="Structured Wanda: mean |W| of the weight column x the input channel's L2 norm over calibration tokens.")
def wanda_sp(adapter: Adapter, layer: nn.Module, stats: LayerStats) -> ChannelScores:
    o = adapter.attention(layer).o_proj
    down = adapter.mlp(layer).down_proj

    def score(lin: nn.Linear, s) -> torch.Tensor:
        return lin.weight.data.double().abs().mean(0).to(s.mean.device) * s.sq_norm.sqrt()

    return ChannelScores(attn=score(o, stats.attn), mlp=score(down, stats.mlp))


@metric("magnitude", "uniform", standardize=False, needs_data=False,
        help="Data-free: squared L2 norm of every weight the unit owns (q rows + o columns; gate/up rows + down column).")
def magnitude(adapter: Adapter, layer: nn.Module, stats: LayerStats) -> ChannelScores:
    attn, mlp = adapter.attention(layer), adapter.mlp(layer)
    q = attn.q_proj.weight.data.double().pow(2).sum(1)
    o = _col_sq_norm(attn.o_proj)
    gate = mlp.gate_proj.weight.data.double().pow(2).sum(1)
    up = mlp.up_proj.weight.data.double().pow(2).sum(1)
    down = _col_sq_norm(mlp.down_proj)
    return ChannelScores(attn=q + o, mlp=gate + up + down)


def get(name: str) -> Metric:
    from .errors import UserError

    if name not in METRICS:
        raise UserError(f"Unknown metric '{name}' (known: {', '.join(sorted(METRICS))}).")
    return METRICS[name]
