"""`compress plan`: the lever frontier for a model on the profile's device (every lever, or width
only), predicted from the model's config, and the choice with the command that executes it.

Exit codes (also in docs/ci-gate.md): 0 a plan meets every budget line; 2 bad input (one
sentence); 3 the budget is infeasible (the closest plan and what it misses are named).
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


@app.command("plan", help="Predict memory, TTFT, TPOT and throughput of MODEL under every lever (width, whole "
                          "layers dropped, the weight formats the device has kernels for; --width-only: width alone) "
                          "on the profile's device, print the frontier and the choice, and the command that executes "
                          "it. Reads the model's config only; where the profile's device is this machine, the "
                          "latency table is measured there first (cached). Exit 3 when the budget is infeasible.")
def plan_cmd(
    model: str = typer.Argument(None, help="Local HF directory, hub id, .gguf file; default: the embedded "
                                           "SmolLM2-135M-Instruct."),
    profile: str = typer.Option("auto", "--profile", "-p", help="Profile name, path to a YAML profile, or auto (the "
                                "profile of this host's GPUs, cpu-2core without a GPU)."),
    calibrate: bool = typer.Option(None, "--fit/--no-fit", "--calibrate/--no-calibrate", help="Measure the latency "
                                   "table on this machine first (default: only when the profile's device is this "
                                   "machine; --no-fit: predicted from the datasheet)."),
    attn_unit: choice(*ATTN_UNITS) = typer.Option("auto", "--attn-unit", help="Attention pruning unit: kv, query or auto."),
    round_to: int = typer.Option(None, "--round-to", help="MLP width multiple (default: the profile's)."),
    runs: int = typer.Option(3, help="Timed runs per latency-table measurement (medians)."),
    json_out: Path = typer.Option(None, "--json", help="Also write the plan as JSON to this file."),
    memory_gib: float = typer.Option(None, "--memory-gib", help="Memory per device in GiB, in place of the profile's."),
    ttft_ms: float = typer.Option(None, "--ttft-ms", help="Time-to-first-token line in ms, in place of the profile's."),
    tpot_ms: float = typer.Option(None, "--tpot-ms", help="Time-per-output-token line in ms, in place of the profile's."),
    throughput: float = typer.Option(None, "--throughput", help="Least output tokens/s, in place of the profile's."),
    levers: bool = typer.Option(True, "--levers/--width-only", help="Plan every lever (width, whole layers "
                                "dropped, the weight formats the device has kernels for), or width alone in the "
                                "profile's dtype; the choice is the plan that removes the fewest weights (the main "
                                "job chooses by measured KL) and, where the latency table was measured here, still "
                                "meets the budget measured at its exact shape."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also show third-party progress bars and logs "
                                 "(vLLM, transformers), which are quiet by default."),
):
    from profiles import load_profile

    from . import third_party_output

    third_party_output(verbose)

    from ..budget.frontier import lever_plan
    from ..budget.planner import InfeasibleBudget

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
    frontier, _ = lever_plan(prof, model, measure=calibrate, attn_unit=attn_unit, round_to=round_to, runs=runs,
                             formats=None if levers else ["none"], max_dropped=None if levers else 0,
                             say=lambda s: err.print(s, highlight=False))
    if not levers:
        frontier.unscored = "width only: the least width that meets every budget line"
    frontier.choose()
    what = ("per weight format and number of layers dropped, the least width pruning" if levers
            else "the least width pruning in the profile's dtype")
    Console(width=max(out.width, 120)).print(frontier_table(
        frontier, f"{'every lever' if levers else 'width only'} for {prof.name} ({prof.device.name} "
                  f"x{prof.device.count}, {prof.runtime}, {prof.dtype}): {what} that meets every budget line"))
    out.print(f"latency: {frontier.latency_source}", highlight=False)
    for n in frontier.notes:
        out.print(f"note: {n}", highlight=False)
    for fmt, why in frontier.skipped_formats.items():
        if not any(n.startswith(f"{fmt} not ") for n in frontier.notes):  # the table said it already
            out.print(f"note: {why}, so {fmt} is not a lever for this model", highlight=False)
    import shlex

    budget = "".join(f" {o} {v:g}" for o, v in (("--memory-gib", memory_gib), ("--ttft-ms", ttft_ms),
                                                  ("--tpot-ms", tpot_ms), ("--throughput", throughput)) if v is not None)
    run = f"compress --profile {shlex.quote(str(profile if profile != 'auto' else prof.name))}" + (
        f" {shlex.quote(str(model))}" if model else "") + budget
    c = frontier.chosen
    if c is not None and not levers and c.width:
        run += f" --ratio {c.width:.2f}"
    if json_out:
        _write_json(json_out, {"feasible": c is not None, "tensor_parallel": prof.tensor_parallel,
                               "plan": "every lever" if levers else "width only",
                               "command": run if c is not None else None, **frontier.as_dict()})
    if c is None:
        raise InfeasibleBudget(frontier.notes[-1] if frontier.notes else
                               f"The budget of profile '{prof.name}' is infeasible.")
    if c.removed == 0 and c.fmt == "none":
        out.print(f"[bold]choice[/]: {c.levers} (the dense model meets every budget line; nothing to prune)",
                  highlight=False)
        return
    out.print(f"[bold]choice[/]: {c.levers} ({frontier.rule})", highlight=False)
    how = ("measures each candidate's KL on the weights, then executes the best that meets the budget" if levers
           else "prunes that width")
    out.print(f"[bold]run it[/]: {run}   ({how})", highlight=False, soft_wrap=True)


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

