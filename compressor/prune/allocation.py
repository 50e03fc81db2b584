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

Tensor parallel (`tp` > 1, from the profile's device count): every layer's attention ends in a
shape vLLM can split over `tp` devices (`tensor_parallel.attention_states`), which may take several
units at once, or KV groups and GQA slices together; MLP widths round to `tp` x `round_to`. At
tp=1 every shape is allowed and the allocation is the unconstrained one, unit by unit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError
from ..model.adapters import LayerShape
from .surgery import LayerKeep
from .tensor_parallel import attention_states, mlp_multiple, removed_weights
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


def _keep_state(ls: LayerScores, state: tuple[int, int], n_channels_kept: int) -> LayerKeep:
    """The kept indices for attention state (KV groups removed, GQA slices removed): the lowest-scoring
    KV groups go first, then the lowest-scoring slices of the groups left (the same choice as
    `_keep` with `kv` or `query` units when only one kind goes)."""
    s = ls.shape
    per = s.heads_per_kv
    head = ls.attn.view(s.num_heads, s.head_dim).mean(1)
    groups = sorted(range(s.num_kv_heads), key=lambda g: float(head[g * per:(g + 1) * per].mean()))
    kv = sorted(groups[state[0]:])
    by_group = [sorted(range(g * per, (g + 1) * per), key=lambda h: -float(head[h])) for g in kv]
    slices = sorted(range(per), key=lambda k: float(head[[grp[k] for grp in by_group]].mean()))
    removed = {grp[k] for k in slices[:state[1]] for grp in by_group}
    q = [h for g in kv for h in range(g * per, (g + 1) * per) if h not in removed]
    top = torch.argsort(ls.mlp, descending=True, stable=True)[:n_channels_kept]
    return LayerKeep(q_heads=q, kv_heads=kv, channels=sorted(top.tolist()))


def allocate(
    layers: list[LayerScores],
    ratio: float,
    structure: str,
    attn_unit: str = "auto",
    round_to: int = 1,
    standardized: bool = False,
    tp: int = 1,
) -> list[LayerKeep]:
    """Which units every layer keeps so that about `ratio` of the decoder weights go (see the
    module's docstring); `tp`: the tensor-parallel size the widths must split over."""
    if not 0.0 < ratio < 1.0:
        raise UserError(f"The pruning ratio must be between 0 and 1 (exclusive), got {ratio}.")
    if standardized:
        layers = [LayerScores(ls.shape, ls.hidden, standardize(ls.attn), standardize(ls.mlp)) for ls in layers]
    if structure == "uniform":
        return _uniform(layers, ratio, attn_unit, round_to, tp)
    if structure == "global":
        return _global(layers, ratio, attn_unit, round_to, tp)
    raise UserError(f"Unknown structure '{structure}' (use uniform or global).")


def _uniform(layers: list[LayerScores], ratio: float, attn_unit: str, round_to: int, tp: int) -> list[LayerKeep]:
    keeps = []
    for ls in layers:
        state, kept = uniform_layer(ls.shape, ls.hidden, ratio, attn_unit, round_to, tp)
        keeps.append(_keep_state(ls, state, kept))
    return keeps


def attention_steps(ls: LayerScores, attn_unit: str, tp: int) -> tuple[list[tuple[int, int]], list[tuple[float, int]]]:
    """(the layer's allowed attention states, the (score, cost) of each step from one to the next).

    At tp=1 a step is one unit and its score the unit's. A step over several units of one kind scores
    their mean; a step between shapes of both kinds (not nested) scores the mean score of the heads it
    gives up. Scores are made non-decreasing along the layer, so that a threshold takes steps in order."""
    mode = resolve_attn_unit(attn_unit, ls.shape)
    states = attention_states(ls.shape, mode, tp)
    units = attention_units(ls, mode)
    s = ls.shape
    head = ls.attn.view(s.num_heads, s.head_dim).mean(1)
    steps = []
    prev_score = float("-inf")
    for a, b in zip(states, states[1:], strict=False):
        if (a[1] == b[1] == 0 and mode == "kv") or (a[0] == b[0] == 0 and mode == "query"):
            i, j = (a[0], b[0]) if mode == "kv" else (a[1], b[1])
            score = sum(u.score for u in units[i:j]) / (j - i)
        else:
            kept_a = _keep_state(ls, a, 0).q_heads
            kept_b = _keep_state(ls, b, 0).q_heads
            score = (float(head[kept_a].sum()) - float(head[kept_b].sum())) / (len(kept_a) - len(kept_b))
        prev_score = max(prev_score, score)
        steps.append((prev_score, removed_weights(s, ls.hidden, b) - removed_weights(s, ls.hidden, a)))
    return states, steps


def _global(layers: list[LayerScores], ratio: float, attn_unit: str, round_to: int, tp: int) -> list[LayerKeep]:
    # candidates: (score, cost, layer, kind); the last allowed attention state and the top
    # `round_to` x `tp` channels of every layer are never candidates. A layer whose dense attention
    # vLLM cannot split under `tp` starts in its first allowed state (that removal counts).
    cand: list[tuple[float, int, int, str]] = []
    all_states = []
    total = 0
    removed = 0
    for i, ls in enumerate(layers):
        states, steps = attention_steps(ls, attn_unit, tp)
        all_states.append(states)
        total += layer_params(ls.shape, ls.hidden)
        removed += removed_weights(ls.shape, ls.hidden, states[0])
        cand += [(score, cost, i, "attn") for score, cost in steps]
        floor = min(mlp_multiple(round_to, tp), ls.shape.intermediate_size)
        order = torch.sort(ls.mlp).values[: ls.shape.intermediate_size - floor]
        cand += [(float(s), 3 * ls.hidden, i, "mlp") for s in order]
    cand.sort(key=lambda c: c[0])
    target = ratio * total
    n_attn = [0] * len(layers)
    n_mlp = [0] * len(layers)
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
        keeps.append(_keep_state(ls, all_states[i][n_attn[i]], round_channels(width - n_mlp[i], width, round_to, tp)))
    return keeps


def select(ls: LayerScores, attn_unit: str, target: LayerKeep) -> LayerKeep:
    """Choose which units one layer keeps, given the widths `target` has (its indices are ignored)."""
    groups = len(target.kv_heads)
    state = (ls.shape.num_kv_heads - groups, ls.shape.heads_per_kv - len(target.q_heads) // max(groups, 1))
    return _keep_state(ls, state, len(target.channels))


def uniform_widths(shapes: list[LayerShape], hidden: int, ratio: float, attn_unit: str,
                   round_to: int, tp: int = 1) -> list[LayerKeep]:
    """The widths `uniform` gives, which do not depend on scores."""
    zeros = [LayerScores(s, hidden, torch.zeros(s.num_heads * s.head_dim, dtype=torch.float64),
                         torch.zeros(s.intermediate_size, dtype=torch.float64)) for s in shapes]
    return allocate(zeros, ratio, "uniform", attn_unit, round_to, tp=tp)
