"""Widths: how many attention units and MLP channels a layer keeps. The one width function that
allocation and the planner share (the planner predicts exactly the widths allocation produces).
Imports no torch."""

from __future__ import annotations

from ..model.adapters import LayerShape


def layer_params(shape: LayerShape, hidden: int) -> int:
    """Weights of one decoder layer's linear modules (norms and biases are negligible)."""
    attn = hidden * shape.head_dim * (2 * shape.num_heads + 2 * shape.num_kv_heads)
    return attn + 3 * hidden * shape.intermediate_size


def resolve_attn_unit(mode: str, shape: LayerShape) -> str:
    if mode == "auto":
        return "query" if shape.heads_per_kv > 1 else "kv"
    if mode == "query" and shape.heads_per_kv == 1:
        return "kv"  # multi-head attention: a slice is a head, the same as a KV group
    return mode


def attention_unit_cost(shape: LayerShape, hidden: int, mode: str) -> tuple[int, int]:
    """(number of attention units, weights one unit removes) of a layer."""
    per = shape.heads_per_kv
    if resolve_attn_unit(mode, shape) == "kv":
        return shape.num_kv_heads, hidden * shape.head_dim * (2 * per + 2)
    return per, hidden * shape.head_dim * 2 * shape.num_kv_heads


def round_channels(kept: int, total: int, round_to: int) -> int:
    """Kept MLP channels rounded to a multiple of `round_to` (at least one multiple, at most all)."""
    if total <= round_to:
        return total
    r = int(round(kept / round_to)) * round_to
    return max(round_to, min(total, r))


def uniform_layer(shape: LayerShape, hidden: int, ratio: float, attn_unit: str, round_to: int) -> tuple[int, int]:
    """`uniform` structure: (attention units removed, MLP channels kept) so that about `ratio` of
    the layer's weights go: whole attention units first, MLP channels make up the rest."""
    n_units, cost = attention_unit_cost(shape, hidden, attn_unit)
    n_rm = min(n_units - 1, int(round(n_units * ratio)))
    mlp_target = ratio * layer_params(shape, hidden) - n_rm * cost
    channels_removed = max(0.0, mlp_target / (3 * hidden))
    total = shape.intermediate_size
    return n_rm, round_channels(int(round(total - channels_removed)), total, round_to)


def heads_after(shape: LayerShape, attn_unit: str, n_removed: int) -> tuple[int, int]:
    """(query heads, KV heads) a layer keeps when `n_removed` attention units go."""
    if resolve_attn_unit(attn_unit, shape) == "kv":
        return shape.num_heads - n_removed * shape.heads_per_kv, shape.num_kv_heads - n_removed
    return shape.num_heads - n_removed * shape.num_kv_heads, shape.num_kv_heads


def uniform_shapes(shapes: list[LayerShape], hidden: int, ratio: float, attn_unit: str,
                   round_to: int) -> list[LayerShape]:
    """Every layer's shape after `uniform` pruning at `ratio` (no scores needed)."""
    out = []
    for s in shapes:
        n_rm, kept = uniform_layer(s, hidden, ratio, attn_unit, round_to)
        q, kv = heads_after(s, attn_unit, n_rm)
        out.append(LayerShape(q, kv, s.head_dim, kept))
    return out
