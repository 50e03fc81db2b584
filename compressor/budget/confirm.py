"""A plan inside the latency reserve, confirmed on its own export before it is kept (issue 12).

The frontier keeps a reserve below each latency line (the profile's `latency_headroom`) because a
plan's export can measure slower than its price. When the best plan by quality meets the lines but
not the reserve (`frontier.Candidate.marginal`), the plan is not thrown away on the price: its real
export (pruned, exported in the profile's dtype and quantized to its format) is measured in the
profile's runtime request by request in turn with the dense export, in both load orders
(`device.measure_chain`), and the ratio carries the dense export's latency measured at planning
(the anchor of the table) to the plan's. It is kept if that meets the lines themselves, else the
best plan that keeps the reserve is taken (`Frontier.confirm`).

What it costs: one export and 2N + 1 = 3 engine loads, only when the choice is marginal."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from profiles import Profile
from profiles.costmodel import CostModel

from .. import tempdirs
from .device import PairedRatio, measure_chain, open_runtime


def export_in_format(model, tokenizer, folder: Path, dtype: str, fmt: str) -> float:
    """`model` exported to `folder` in `dtype` and quantized to `fmt` (unless "none"), as the main job
    writes it; the weights' GiB."""
    from exporters import export_hf

    export_hf(model, tokenizer, folder, dtype=getattr(torch, dtype))
    if fmt != "none":
        from exporters.quantize import quantize_export

        quantize_export(folder, fmt)
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors")) / 2**30


def measure_beside(dense_dir: Path, export_dir: Path, profile: Profile, runtime: str, runs: int) -> PairedRatio:
    """The export's latency over the dense export's, in `runtime` at batch 1, request by request in
    turn and in both load orders (`measure_chain`: 3 engine loads)."""
    threads = profile.device.threads if profile.device.kind == "cpu" else None
    w = profile.workload
    [pr] = measure_chain(lambda: open_runtime(runtime, dense_dir, profile.dtype, threads),
                         [lambda: open_runtime(runtime, export_dir, profile.dtype, threads)],
                         w.prompt_tokens, w.output_tokens, runs)
    return pr


def confirm_choice(frontier, pruned_copy, tokenizer, dense_dir: Path, anchor: tuple[float, float], profile: Profile,
                   runtime: str, runs: int = 5, say=print):
    """Where the frontier's choice is marginal: measure its export beside the dense export in
    `dense_dir` and keep it or take the fallback (`Frontier.confirm`). `pruned_copy(candidate)` gives
    the candidate's pruned model, leaving the model in memory dense; `anchor` is the dense export's
    (TTFT s, TPOT s) measured at planning. Returns the choice (None: nothing meets the budget)."""
    c = frontier.chosen
    if c is None or not c.marginal:
        return c
    say(f"plan: {c.levers} meets the lines but not the reserve below them: measuring its export in {runtime} in "
        f"turn with the dense export before it is kept")
    tmp = tempdirs.make("fitprune-confirm-")
    try:
        model = pruned_copy(c)
        export_in_format(model, tokenizer, tmp, profile.dtype, c.fmt)
        del model
        pr = measure_beside(dense_dir, tmp, profile, runtime, runs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ttft, tpot = pr.ttft_ratio * anchor[0], pr.tpot_ratio * anchor[1]
    how = (f"its export over the dense export's, x{pr.tpot_ratio:.3f} TPOT and x{pr.ttft_ratio:.3f} TTFT, measured "
           f"in {runtime} in turn and in both load orders, times the dense export's latency measured at planning")
    chosen = frontier.confirm(ttft, tpot, CostModel(profile), how)
    say(f"plan: {c.levers}: export x{pr.tpot_ratio:.3f} the dense TPOT ("
        + ", ".join(f"x{r['tpot_ratio']:.3f} with the {r['loaded_first']} loaded first" for r in pr.rounds)
        + f") = {tpot * 1e3:.2f} ms: " + ("kept" if chosen is c else
                                          f"missed; taking {chosen.levers}" if chosen else "missed, and no fallback"))
    return chosen


__all__ = ["confirm_choice", "export_in_format", "measure_beside"]
