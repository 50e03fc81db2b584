"""`compress plan`: predicted memory and latency per ratio on the profile's device, and the choice.

Exit codes (also in docs/ci-gate.md): 0 a ratio meets every budget line; 2 bad input (one
sentence); 3 the budget is infeasible at every ratio of the grid (the closest ratio is named).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from ..errors import UserError
from ..prune import ATTN_UNITS
from . import app, choice

err = Console(stderr=True)
out = Console()
MAX_RUNS = 1000  # timed runs per measurement: more is hours of measuring, not a better median


def _write_json(path: Path, data: dict) -> None:
    """A regular file or a new path: written beside the target and renamed, so an interrupted write
    never leaves half a JSON file. A device, a pipe or a symlink (`/dev/stdout`): written through,
    never replaced. A failed write is one sentence and a non-zero exit."""
    import errno
    import os
    import tempfile

    path = Path(path).expanduser()
    text = json.dumps(data, indent=2)
    tmp = None
    try:
        if path.is_symlink() or (path.exists() and not path.is_file()):
            with open(path, "w") as f:
                f.write(text)
            return
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.absolute().parent)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        full = exc.errno == errno.ENOSPC
        raise UserError(f"--json {path} could not be written ({exc.strerror or exc}).",
                        exit_code=28 if full else 2) from exc
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def plan_table(plan, title: str) -> Table:
    t = Table(title=title)
    for c in ("ratio", "decoder removed", "params", "memory GiB", "TTFT ms", "TPOT ms", "throughput tok/s", "budget"):
        t.add_column(c, justify="right")
    dense = plan.rows[0].arch.decoder_params
    chosen = plan.chosen.ratio if plan.chosen else None
    for row in plan.rows:
        p = row.prediction
        mark = "[bold green]chosen[/]" if row.ratio == chosen else (
            "[green]ok[/]" if row.ok else "[red]" + ", ".join([v.line for v in row.violations]
                                                              + (["tensor parallel"] if row.tp_problem else [])) + "[/]")
        t.add_row(f"{row.ratio:.2f}", f"{1 - row.arch.decoder_params / dense:.1%}", f"{row.arch.total_params:,}",
                  f"{p.memory.total_gib:.2f}", f"{p.ttft_s * 1e3:.1f}", f"{p.tpot_s * 1e3:.2f}",
                  f"{p.throughput_tok_s:.1f}", mark)
    return t


@app.command("plan", help="Predict memory, TTFT, TPOT and throughput of MODEL pruned at ratios 0..0.7 on the "
                          "profile's device, and choose the smallest ratio that meets every budget line. Reads the "
                          "model's config only; where the profile's device is this machine, one measured dense run "
                          "fits the cost model first. Exit 3 when the budget is infeasible.")
def plan_cmd(
    model: str = typer.Argument(None, help="Local HF directory, hub id, .gguf file; default: the embedded "
                                           "SmolLM2-135M-Instruct."),
    profile: str = typer.Option("auto", "--profile", "-p", help="Profile name, path to a YAML profile, or auto (the "
                                "profile of this host's GPUs, cpu-2core without a GPU)."),
    calibrate: bool = typer.Option(None, "--fit/--no-fit", "--calibrate/--no-calibrate", help="Fit the cost model by measuring this machine first "
                                   "(default: only when the profile's device is this machine)."),
    attn_unit: choice(*ATTN_UNITS) = typer.Option("auto", "--attn-unit", help="Attention pruning unit: kv, query or auto."),
    round_to: int = typer.Option(None, "--round-to", help="MLP width multiple (default: the profile's)."),
    runs: int = typer.Option(3, help="Timed runs per cost-model fitting measurement (medians)."),
    json_out: Path = typer.Option(None, "--json", help="Also write the plan as JSON to this file."),
    memory_gib: float = typer.Option(None, "--memory-gib", help="Memory per device in GiB, in place of the profile's."),
    ttft_ms: float = typer.Option(None, "--ttft-ms", help="Time-to-first-token line in ms, in place of the profile's."),
    tpot_ms: float = typer.Option(None, "--tpot-ms", help="Time-per-output-token line in ms, in place of the profile's."),
    throughput: float = typer.Option(None, "--throughput", help="Least output tokens/s, in place of the profile's."),
    levers: bool = typer.Option(True, "--levers/--width-only", help="Also search every lever (width, whole "
                                "layers dropped, the weight formats the device has kernels for) and print the "
                                "frontier; the choice is the mix that removes the fewest weights (the main job "
                                "chooses by measured KL) and, where the latency table was measured here, still "
                                "meets the budget measured at its exact shape."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also show third-party progress bars and logs "
                                 "(vLLM, transformers), which are quiet by default."),
):
    from profiles import load_profile

    from . import third_party_output

    third_party_output(verbose)

    from ..budget.planner import InfeasibleBudget, plan_for

    if attn_unit not in ATTN_UNITS:
        raise UserError(f"Unknown --attn-unit '{attn_unit}' (use {', '.join(ATTN_UNITS)}).")
    if round_to is not None and round_to < 1:
        raise UserError(f"--round-to must be at least 1, got {round_to}.")
    if not 1 <= runs <= MAX_RUNS:
        raise UserError(f"--runs must be between 1 and {MAX_RUNS}, got {runs}.")
    if json_out is not None:
        from ..config import refuse_out_file

        refuse_out_file(json_out, "--json")  # before the work, not after it
    from profiles.auto import resolve
    from profiles.schema import with_budget

    for value, option in ((memory_gib, "--memory-gib"), (ttft_ms, "--ttft-ms"), (tpot_ms, "--tpot-ms"),
                          (throughput, "--throughput")):
        if value is not None and not value > 0:
            raise UserError(f"{option} must be greater than 0, got {value}.")
    prof, changed = with_budget(load_profile(resolve(profile, err.print)), memory_gib, ttft_ms, tpot_ms, throughput)
    if changed:
        err.print(f"budget from the command line: {', '.join(changed)}", highlight=False)
    if round_to is not None:
        from ..model.loading import read_config

        width = read_config(model)[0].get("intermediate_size")
        if isinstance(width, int) and round_to > width:
            raise UserError(f"--round-to {round_to} is wider than the model's MLP ({width} channels), so no MLP "
                            "channel could be removed; choose a multiple that divides it.")
    plan, _ = plan_for(prof, model, calibrate_here=calibrate, attn_unit=attn_unit, round_to=round_to,
                       runs=runs, say=lambda s: err.print(s, highlight=False))
    out.print(plan_table(plan, f"plan for {prof.name} ({prof.device.name} x{prof.device.count}, {prof.runtime}, "
                               f"{prof.dtype}); all figures predicted"))
    out.print(f"efficiency: {plan.efficiency['source']} (bandwidth x{plan.efficiency['bandwidth']:.3g}, "
              f"compute x{plan.efficiency['compute']:.3g}, decode overhead "
              f"{plan.efficiency['step_overhead_ms']:.2f} ms + {plan.efficiency['layer_overhead_us']:.0f} us/layer)",
              highlight=False)
    for n in plan.notes:
        out.print(f"note: {n}", highlight=False)
    frontier = None
    if levers:
        from ..budget.frontier import lever_plan

        frontier, _ = lever_plan(prof, model, measure=calibrate, attn_unit=attn_unit, round_to=round_to, runs=runs,
                                 say=lambda s: err.print(s, highlight=False))
        frontier.choose()
        Console(width=max(out.width, 120)).print(frontier_table(frontier, f"every lever for {prof.name}: per weight format and number of layers "
                                           "dropped, the least width pruning that meets every budget line"))
        out.print(f"latency: {frontier.latency_source}", highlight=False)
        for n in frontier.notes:
            out.print(f"note: {n}", highlight=False)
        for fmt, why in frontier.skipped_formats.items():
            if not any(n.startswith(f"{fmt} not ") for n in frontier.notes):  # the table said it already
                out.print(f"note: {why}, so {fmt} is not a lever for this model", highlight=False)
    if json_out:
        _write_json(json_out, {**plan.as_dict(), "levers": frontier.as_dict() if frontier else None})
    import shlex

    budget = "".join(f" {o} {v:g}" for o, v in (("--memory-gib", memory_gib), ("--ttft-ms", ttft_ms),
                                                  ("--tpot-ms", tpot_ms), ("--throughput", throughput)) if v is not None)
    run = f"compress --profile {shlex.quote(str(profile if profile != 'auto' else prof.name))}" + (
        f" {shlex.quote(str(model))}" if model else "") + budget
    if frontier is not None and frontier.chosen is not None:
        out.print(f"[bold]choice[/]: {frontier.chosen.levers} ({frontier.rule}); width only: "
                  + (f"ratio {plan.chosen.ratio:.2f}" if plan.feasible else "infeasible"), highlight=False)
        out.print(f"[bold]run it[/]: {run}   (measures each candidate's KL on the weights, then "
                  f"executes the best that meets the budget)", highlight=False, soft_wrap=True)
        return
    if not plan.feasible:
        raise InfeasibleBudget(plan.infeasible_sentence())
    out.print(f"[bold]choice[/]: ratio {plan.chosen.ratio:.2f} "
              + ("(the dense model meets every budget line)" if plan.chosen.ratio == 0 else
                 "(the smallest ratio that meets every budget line)"))
    if plan.chosen.ratio > 0:
        out.print(f"[bold]run it[/]: {run} --ratio {plan.chosen.ratio:.2f}", highlight=False, soft_wrap=True)


def frontier_table(frontier, title: str) -> Table:
    t = Table(title=title)
    t.add_column("levers", no_wrap=True)
    for c in ("decoder removed", "memory GiB", "TTFT ms", "TPOT ms", "throughput tok/s", "KL", ""):
        t.add_column(c, justify="right", no_wrap=True)
    for c in frontier.candidates:
        p = c.prediction
        t.add_row(c.levers, f"{c.removed:.1%}", f"{p.memory.total_gib:.2f}", f"{p.ttft_s * 1e3:.1f}",
                  f"{p.tpot_s * 1e3:.2f}", f"{p.throughput_tok_s:.1f}", "-" if c.kl is None else f"{c.kl:.4f}",
                  "[bold green]chosen[/]" if c is frontier.chosen else
                  "inside the reserve" if c.marginal else "")
    return t

