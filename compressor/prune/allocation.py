"""Allocation: from channel scores to the indices every layer keeps.

Units (what is removed as a whole):
  * attention, `kv` mode: a KV group (one KV head and the query heads that read it);
  * attention, `query` mode: a GQA *slice*, the k-th most important query head of every KV group,
    so each KV head keeps the same number of query heads (valid GQA shape, KV cache unchanged);
  * MLP: one intermediate channel (gate/up row + down column).
A unit's score is the mean of its channels' scores. Its cost is the number of weights it removes.

Structures:
  * `global` (FLAP): scores standardized per layer and module (if the metric asks), one threshold
    over all layers: the lowest-scoring units go until the requested fraction of decoder weights is
    removed, so layers end up with different widths;
  * `uniform`: every layer keeps the same widths (the same fraction goes in every layer; attention
    by whole units, MLP channels make up the rest); which units go is still chosen by score.
Kept MLP widths round to a multiple of `round_to`; every layer keeps at least one attention unit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError
from ..model.adapters import LayerShape
from .surgery import LayerKeep
from .widths import layer_params, resolve_attn_unit, round_channels, uniform_layer


@dataclass
class LayerScores:
    shape: LayerShape
    hidden: int
    attn: torch.Tensor  # channel scores [num_heads * head_dim]
    mlp: torch.Tensor  # channel scores [intermediate_size]


@dataclass
class AttnUnit:
    score: float
    q_heads: list[int]
    kv_head: int | None  # the KV head removed with the unit (kv mode), None in query mode
    cost: int


def standardize(x: torch.Tensor) -> torch.Tensor:
    std = x.std()
    if not torch.isfinite(std) or std == 0:
        return x - x.mean()
    return (x - x.mean()) / std


def attention_units(ls: LayerScores, mode: str) -> list[AttnUnit]:
    """The layer's attention units, least important first."""
    s = ls.shape
    head = ls.attn.view(s.num_heads, s.head_dim).mean(1)
    per = s.heads_per_kv
    if resolve_attn_unit(mode, s) == "kv":
        cost = ls.hidden * s.head_dim * (2 * per + 2)
        units = [
            AttnUnit(float(head[g * per:(g + 1) * per].mean()), list(range(g * per, (g + 1) * per)), g, cost)
            for g in range(s.num_kv_heads)
        ]
    else:
        by_group = [sorted(range(g * per, (g + 1) * per), key=lambda h: -float(head[h])) for g in range(s.num_kv_heads)]
        cost = ls.hidden * s.head_dim * 2 * s.num_kv_heads
        units = []
        for k in range(per):
            heads = [grp[k] for grp in by_group]
            units.append(AttnUnit(float(head[heads].mean()), sorted(heads), None, cost))
    return sorted(units, key=lambda u: u.score)


def _keep(ls: LayerScores, units: list[AttnUnit], n_attn_removed: int, n_channels_kept: int) -> LayerKeep:
    removed = units[:n_attn_removed]
    removed_q = {h for u in removed for h in u.q_heads}
    removed_kv = {u.kv_head for u in removed if u.kv_head is not None}
    q = [h for h in range(ls.shape.num_heads) if h not in removed_q]
    kv = [g for g in range(ls.shape.num_kv_heads) if g not in removed_kv]
    top = torch.argsort(ls.mlp, descending=True, stable=True)[:n_channels_kept]
    return LayerKeep(q_heads=q, kv_heads=kv, channels=sorted(top.tolist()))


def allocate(
    layers: list[LayerScores],
    ratio: float,
    structure: str,
    attn_unit: str = "auto",
    round_to: int = 1,
    standardized: bool = False,
) -> list[LayerKeep]:
    if not 0.0 < ratio < 1.0:
        raise UserError(f"The pruning ratio must be between 0 and 1 (exclusive), got {ratio}.")
    if standardized:
        layers = [LayerScores(ls.shape, ls.hidden, standardize(ls.attn), standardize(ls.mlp)) for ls in layers]
    if structure == "uniform":
        return _uniform(layers, ratio, attn_unit, round_to)
    if structure == "global":
        return _global(layers, ratio, attn_unit, round_to)
    raise UserError(f"Unknown structure '{structure}' (use uniform or global).")


def _uniform(layers: list[LayerScores], ratio: float, attn_unit: str, round_to: int) -> list[LayerKeep]:
    keeps = []
    for ls in layers:
        n_rm, kept = uniform_layer(ls.shape, ls.hidden, ratio, attn_unit, round_to)
        keeps.append(_keep(ls, attention_units(ls, attn_unit), n_rm, kept))
    return keeps


def _global(layers: list[LayerScores], ratio: float, attn_unit: str, round_to: int) -> list[LayerKeep]:
    # candidates: (score, cost, layer, kind); the most important attention unit and the top
    # `round_to` channels of every layer are never candidates.
    cand: list[tuple[float, int, int, str]] = []
    all_units = []
    total = 0
    for i, ls in enumerate(layers):
        units = attention_units(ls, attn_unit)
        all_units.append(units)
        total += layer_params(ls.shape, ls.hidden)
        cand += [(u.score, u.cost, i, "attn") for u in units[:-1]]
        floor = min(round_to, ls.shape.intermediate_size)
        order = torch.sort(ls.mlp).values[: ls.shape.intermediate_size - floor]
        cand += [(float(s), 3 * ls.hidden, i, "mlp") for s in order]
    cand.sort(key=lambda c: c[0])
    target = ratio * total
    n_attn = [0] * len(layers)
    n_mlp = [0] * len(layers)
    removed = 0
    for _score, cost, i, kind in cand:
        if removed >= target:
            break
        if kind == "attn":
            n_attn[i] += 1
        else:
            n_mlp[i] += 1
        removed += cost
    keeps = []
    for i, ls in enumerate(layers):
        width = ls.shape.intermediate_size
        keeps.append(_keep(ls, all_units[i], n_attn[i], round_channels(width - n_mlp[i], width, round_to)))
    return keeps


def select(ls: LayerScores, attn_unit: str, target: LayerKeep) -> LayerKeep:
    """Choose which units one layer keeps, given the widths `target` has (its indices are ignored)."""
    units = attention_units(ls, attn_unit)
    if resolve_attn_unit(attn_unit, ls.shape) == "kv":
        n_removed = ls.shape.num_kv_heads - len(target.kv_heads)
    else:
        n_removed = ls.shape.heads_per_kv - len(target.q_heads) // max(len(target.kv_heads), 1)
    return _keep(ls, units, n_removed, len(target.channels))


def uniform_widths(shapes: list[LayerShape], hidden: int, ratio: float, attn_unit: str,
                   round_to: int) -> list[LayerKeep]:
    """The widths `uniform` gives, which do not depend on scores."""
    zeros = [LayerScores(s, hidden, torch.zeros(s.num_heads * s.head_dim, dtype=torch.float64),
                         torch.zeros(s.intermediate_size, dtype=torch.float64)) for s in shapes]
    return allocate(zeros, ratio, "uniform", attn_unit, round_to)
