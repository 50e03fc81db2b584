"""Widths: how many attention units and MLP channels a layer keeps. The one width function that
allocation and the planner share (the planner predicts exactly the widths allocation produces),
under the tensor-parallel rule of `tensor_parallel` (tp=1: no constraint). Imports no torch."""

from __future__ import annotations

from ..model.adapters import LayerShape
from .tensor_parallel import attention_states, heads_kept, mlp_multiple, removed_weights


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


def round_channels(kept: int, total: int, round_to: int, tp: int = 1) -> int:
    """Kept MLP channels rounded to a multiple of `round_to` x `tp` (at least one multiple, at most
    all; all only when they split over `tp` devices: see `tensor_parallel`)."""
    step = mlp_multiple(round_to, tp)
    whole = total if total % max(tp, 1) == 0 else (total // step) * step
    if total <= step:
        return total - total % max(tp, 1) or total
    r = int(round(kept / step)) * step
    return max(step, min(whole, r))


def uniform_layer(shape: LayerShape, hidden: int, ratio: float, attn_unit: str, round_to: int,
                  tp: int = 1) -> tuple[tuple[int, int], int]:
    """`uniform` structure: (attention state, MLP channels kept) so that about `ratio` of the
    layer's weights go: whole attention units first, MLP channels make up the rest. The attention
    state (KV groups removed, GQA slices removed) is the one allowed at tensor parallel `tp` whose
    removed weights are closest to `ratio` of the layer's attention units (at tp=1: that number of units)."""
    n_units, cost = attention_unit_cost(shape, hidden, attn_unit)
    n_rm = min(n_units - 1, int(round(n_units * ratio)))
    states = attention_states(shape, resolve_attn_unit(attn_unit, shape), tp)
    state = min(states, key=lambda st: abs(removed_weights(shape, hidden, st) - n_rm * cost))
    mlp_target = ratio * layer_params(shape, hidden) - removed_weights(shape, hidden, state)
    channels_removed = max(0.0, mlp_target / (3 * hidden))
    total = shape.intermediate_size
    return state, round_channels(int(round(total - channels_removed)), total, round_to, tp)


def uniform_shapes(shapes: list[LayerShape], hidden: int, ratio: float, attn_unit: str,
                   round_to: int, tp: int = 1) -> list[LayerShape]:
    """Every layer's shape after `uniform` pruning at `ratio` (no scores needed)."""
    out = []
    for s in shapes:
        state, kept = uniform_layer(s, hidden, ratio, attn_unit, round_to, tp)
        q, kv = heads_kept(s, state)
        out.append(LayerShape(q, kv, s.head_dim, kept))
    return out
