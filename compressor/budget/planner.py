"""What every plan is made of: the widths uniform pruning gives at a ratio (`arch_at_ratio`, the
allocation's own width rule, under tensor parallel too), a shallower model (`shallower`), the ratio
grid, the notes on the latency reserve and on tensor parallel, and the two ways a plan refuses
(an infeasible budget, exit 3; nothing to prune, exit 4). The search itself: `budget/frontier.py`.
"""

from __future__ import annotations

from dataclasses import replace

from profiles import Profile
from profiles.costmodel import Arch

from ..errors import UserError
from ..model.adapters import LayerShape
from ..prune.tensor_parallel import describe, widths_problems
from ..prune.widths import uniform_shapes

GRID = tuple(round(0.05 * i, 2) for i in range(15))  # 0.0 .. 0.7


class InfeasibleBudget(UserError):
    """No ratio of the grid meets the budget (exit code 3)."""

    def __init__(self, message: str):
        super().__init__(message, exit_code=3)


class NothingToPrune(UserError):
    """The dense model meets the budget already and no --ratio was given (exit code 4)."""

    def __init__(self, message: str):
        super().__init__(message, exit_code=4)


def arch_at_ratio(arch: Arch, ratio: float, attn_unit: str = "auto", round_to: int = 1, tp: int = 1) -> Arch:
    """The widths uniform pruning gives at `ratio` under tensor parallel `tp`: the allocation's own
    width function. Ratio 0 is the dense model as it is (whether or not `tp` can split it)."""
    if ratio <= 0:
        return arch
    shapes = [LayerShape(arch.q_heads[i], arch.kv_heads[i], arch.head_dim, arch.intermediate[i])
              for i in range(arch.layers)]
    after = uniform_shapes(shapes, arch.hidden, ratio, attn_unit, round_to, tp)
    return Arch(arch.hidden, arch.vocab, arch.head_dim, tuple(s.num_heads for s in after),
                tuple(s.num_kv_heads for s in after), tuple(s.intermediate_size for s in after), arch.tied_embeddings,
                arch.biased)


def shallower(arch: Arch, dropped: int) -> Arch:
    """`arch` with its last `dropped` layers gone: with uniform widths, which layers go does not change
    the cost, only how many."""
    n = arch.layers - dropped
    return replace(arch, q_heads=arch.q_heads[:n], kv_heads=arch.kv_heads[:n], intermediate=arch.intermediate[:n])


def headroom_notes(profile: Profile, marginal: bool = False) -> list[str]:
    """The plan's reserve on the latency lines, in words (none without one); `marginal`: plans inside
    it are offered, confirmed on their exports (`budget/confirm.py`)."""
    h = profile.budget.latency_headroom
    if not h:
        return []
    inside = ("; a better plan inside the reserve is kept only if its own export, measured beside the dense "
              "export before pruning, meets the lines themselves") if marginal else ""
    return [f"planned with {h:.0%} of the TTFT and TPOT lines in reserve (the profile's latency_headroom): a "
            "plan must be predicted within that much less; the measured export is judged against the lines "
            f"themselves{inside}"]


def tensor_parallel_notes(arch: Arch, tp: int, round_to: int) -> list[str]:
    """What the plan says about tensor parallel: the constraint, and whether the dense model meets it."""
    if tp <= 1:
        return []
    notes = [describe(tp, round_to)]
    problems = widths_problems(list(arch.q_heads), list(arch.kv_heads), list(arch.intermediate), tp)
    if problems:
        notes.append(f"the dense model cannot be served with tensor parallel {tp} ({problems[0]}), so ratio 0 is "
                     "not a choice and every ratio prunes at least to the nearest shape vLLM can split")
    return notes
