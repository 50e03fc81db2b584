"""Tensor parallel: which widths vLLM can split over N devices. The one rule that allocation, the
planner and the export/container path consult (imports no torch).

vLLM 0.32 shards a Llama-style decoder layer over the N ranks of tensor parallel like this
(vllm/model_executor/models/llama.py `LlamaAttention.__init__`, vllm/config/model.py
`ModelConfig.verify_with_parallel_config`, vllm/model_executor/layers/linear.py):
  * query heads: `num_heads % N == 0` (each rank gets num_heads / N of them);
  * KV heads: when `num_kv_heads >= N`, `num_kv_heads % N == 0`; when fewer, `N % num_kv_heads == 0`
    and each KV head is replicated on N / num_kv_heads ranks;
  * MLP: gate/up are column-parallel and down is row-parallel over the intermediate dimension, so
    `intermediate_size % N == 0`. We ask more: a multiple of N x round_to, so that every rank's
    slice is still a multiple of the profile's alignment.
Because every layer of fitprune's per-layer format builds vLLM's own `LlamaAttention` with that
layer's head counts (exporters/vllm_plugin/model.py), the rule holds per layer, not only for the
config's top-level counts.

A layer's attention is pruned by whole KV groups (`kv` unit) or by GQA slices (`query` unit), so its
shape after pruning is (g kept KV groups) x (s kept query heads per group); `attention_states` lists
the shapes the rule allows, largest first. When the requested unit alone reaches no allowed shape
(SmolLM2's 3 KV heads under N=2 with the query unit: all 3 KV heads stay, and 3 neither divides
by 2 nor divides 2), both are combined: KV groups and slices go together.
"""

from __future__ import annotations

from ..errors import UserError
from ..model.adapters import LayerShape


def tensor_parallel_size(profile) -> int:
    """The tensor-parallel size a profile serves with: `Profile.tensor_parallel`, its device count,
    which the container also passes to `vllm serve --tensor-parallel-size`."""
    return profile.tensor_parallel


def heads_problem(q_heads: int, kv_heads: int, tp: int) -> str | None:
    """Why vLLM refuses `q_heads` query / `kv_heads` KV heads at tensor parallel `tp` (None: it accepts)."""
    if tp <= 1:
        return None
    if q_heads < 1 or kv_heads < 1:
        return f"{q_heads} query heads and {kv_heads} KV heads are not an attention shape"
    if q_heads % tp:
        return f"{q_heads} query heads do not divide by tensor parallel {tp}"
    if kv_heads >= tp and kv_heads % tp:
        return f"{kv_heads} KV heads do not divide by tensor parallel {tp}"
    if kv_heads < tp and tp % kv_heads:
        return f"{kv_heads} KV heads neither divide by nor divide tensor parallel {tp}"
    return None


def heads_ok(q_heads: int, kv_heads: int, tp: int) -> bool:
    return heads_problem(q_heads, kv_heads, tp) is None


def mlp_multiple(round_to: int, tp: int) -> int:
    """The multiple kept MLP widths round to: every rank's slice a multiple of `round_to`."""
    return max(1, round_to) * max(1, tp)


def widths_problems(q_heads: list[int], kv_heads: list[int], intermediate: list[int], tp: int) -> list[str]:
    """One sentence per layer whose widths vLLM cannot split over `tp` devices (empty: all fine).
    The MLP check is vLLM's own (divisible by tp), not the stricter alignment allocation uses."""
    out = []
    for i, (q, kv, d) in enumerate(zip(q_heads, kv_heads, intermediate, strict=True)):
        why = heads_problem(q, kv, tp)
        if why is None and tp > 1 and d % tp:
            why = f"MLP width {d} does not divide by tensor parallel {tp}"
        if why:
            out.append(f"layer {i}: {why}")
    return out


def check_widths(q_heads: list[int], kv_heads: list[int], intermediate: list[int], tp: int, what: str) -> None:
    """Raise a one-sentence UserError when `what` (e.g. 'the export') cannot be split over `tp` devices."""
    problems = widths_problems(q_heads, kv_heads, intermediate, tp)
    if problems:
        more = f" (and {len(problems) - 1} more layers)" if len(problems) > 1 else ""
        raise UserError(f"vLLM cannot serve {what} with tensor parallel {tp}: {problems[0]}{more}.")


def config_widths(config: dict) -> tuple[list[int], list[int], list[int]]:
    """(query heads, KV heads, MLP widths) per layer from an export's config.json: fitprune's
    per-layer format lists them, a family's own config has one value for every layer."""
    n = int(config.get("num_hidden_layers") or 0)
    heads = int(config.get("num_attention_heads") or 0)
    q = config.get("layer_num_attention_heads") or [heads] * n
    kv = config.get("layer_num_key_value_heads") or [config.get("num_key_value_heads") or heads] * n
    d = config.get("layer_intermediate_size") or [config.get("intermediate_size") or 0] * n
    return [int(x) for x in q], [int(x) for x in kv], [int(x) for x in d]


def check_config(config: dict, tp: int, what: str) -> None:
    """`check_widths` on an export's config.json (the container path: before an image is written)."""
    check_widths(*config_widths(config), tp, what)


def removed_weights(shape: LayerShape, hidden: int, state: tuple[int, int]) -> int:
    """Weights of q/k/v/o a layer loses in attention state (KV groups removed, slices removed)."""
    q, kv = heads_kept(shape, state)
    return hidden * shape.head_dim * (2 * (shape.num_heads - q) + 2 * (shape.num_kv_heads - kv))


def heads_kept(shape: LayerShape, state: tuple[int, int]) -> tuple[int, int]:
    """(query heads, KV heads) a layer keeps in attention state (KV groups removed, slices removed)."""
    groups = shape.num_kv_heads - state[0]
    return groups * (shape.heads_per_kv - state[1]), groups


def attention_states(shape: LayerShape, unit: str, tp: int) -> list[tuple[int, int]]:
    """The attention shapes of a layer allowed at tensor parallel `tp`, as (KV groups removed, GQA
    slices removed), the fewest heads removed first; every one keeps at least one query head.

    `unit` is the resolved attention unit (`kv` or `query`): only that unit is removed, unless it
    reaches no allowed shape; then both are combined, and of two shapes keeping as many query heads
    the one closer to the unit's own kind wins (the `query` unit keeps more KV heads, `kv` fewer)."""
    g0, p0 = shape.num_kv_heads, shape.heads_per_kv

    def ok(st: tuple[int, int]) -> bool:
        return heads_ok(*heads_kept(shape, st), tp)

    if unit == "kv":
        states = [(r, 0) for r in range(g0) if ok((r, 0))]
    else:
        states = [(0, r) for r in range(p0) if ok((0, r))]
    if states:
        return states
    best: dict[int, tuple[int, int]] = {}
    for rg in range(g0):
        for rs in range(p0):
            st = (rg, rs)
            if not ok(st):
                continue
            q = heads_kept(shape, st)[0]
            prefer = (lambda s: s[0]) if unit == "query" else (lambda s: s[1])  # noqa: E731
            if q not in best or prefer(st) < prefer(best[q]):
                best[q] = st
    if not best:
        raise UserError(f"A layer with {shape.num_heads} query heads and {shape.num_kv_heads} KV heads cannot be "
                        f"pruned to a shape vLLM splits over {tp} devices (tensor parallel {tp}); use a profile "
                        "with fewer devices.")
    return [best[q] for q in sorted(best, reverse=True)]


def describe(tp: int, round_to: int) -> str:
    """The constraint in one sentence, for the plan and the console."""
    return (f"tensor parallel {tp}: every layer keeps a multiple of {tp} query heads and a number of KV heads "
            f"that divides by {tp} (or divides {tp}, then replicated), and MLP widths that are multiples of "
            f"{mlp_multiple(round_to, tp)} ({tp} x {round_to}), as vLLM requires to split them over {tp} devices")
