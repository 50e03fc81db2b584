"""The `compress` command line.

`compress --profile NAME [MODEL]` runs the whole job; sub-commands run single steps
(`compress profiles ...`). Every failure a user can cause ends in one sentence and a non-zero exit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from .errors import UserError

err = Console(stderr=True)
out = Console()


class DefaultRunGroup(TyperGroup):
    """`compress [OPTIONS] [MODEL]` means `compress run [OPTIONS] [MODEL]` unless the first word is a
    sub-command (or a request for help)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ("--help", "-h", "--version")):
            args = ["run", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=DefaultRunGroup,
    help="Prune an LLM to fit a hardware budget, export it for vLLM / ONNX Runtime, and measure it.\n\n"
         "Usage: compress --profile a10g-24gb [MODEL]   (MODEL defaults to the embedded SmolLM2-135M-Instruct)",
    no_args_is_help=False,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
profiles_app = typer.Typer(help="List, show and validate hardware profiles.", no_args_is_help=True)
app.add_typer(profiles_app, name="profiles")

from .cli_budget import register as _register_budget  # noqa: E402  (plan, gate)

_register_budget(app)
app.command("export-onnx")(__import__("compressor.cli_onnx", fromlist=["export_onnx_cmd"]).export_onnx_cmd)
app.command("container")(__import__("compressor.cli_container", fromlist=["container_cmd"]).container_cmd)


def _choices(names) -> str:
    return ", ".join(sorted(names))


@app.command("run", help="Prune MODEL for the profile's budget, export it and measure it (the default command).")
def run_cmd(
    model: str = typer.Argument(None, help="Local HF directory, hub id, .gguf file; default: the embedded SmolLM2-135M-Instruct."),
    profile: str = typer.Option("cpu-2core", "--profile", "-p", help="Shipped profile name (see `compress profiles list`) or a path to a YAML profile."),
    ratio: float = typer.Option(None, "--ratio", "-r", help="Fraction of decoder weights to remove, in (0, 1); overrides the plan (default: the planner's choice for the profile)."),
    metric: str = typer.Option("auto", help="Importance metric: auto (the quality benchmark's winner), " + _choices(__import__("compressor.metrics", fromlist=["METRICS"]).METRICS) + "."),
    compensation: str = typer.Option("auto", help="Compensation: auto (the quality benchmark's winner), " + _choices(__import__("compressor.compensation", fromlist=["C"]).COMPENSATIONS) + "."),
    structure: str = typer.Option("auto", help="uniform (same widths in every layer), global (one threshold over all layers), or auto (the metric's default)."),
    attn_unit: str = typer.Option("auto", "--attn-unit", help="Attention pruning unit: kv (KV group with its query heads), query (query heads evenly from every KV group), auto (query for GQA, kv for MHA)."),
    round_to: int = typer.Option(None, "--round-to", help="Kept MLP widths round to a multiple of this (default: the profile's)."),
    calib: str = typer.Option("builtin", help="Calibration text: builtin, a .txt/.jsonl file, hf:NAME[:CONFIG[:SPLIT]], or self."),
    nsamples: int = typer.Option(128, help="Number of calibration windows."),
    seqlen: int = typer.Option(512, help="Tokens per calibration window (also the perplexity window)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Calibration batch size."),
    out: Path = typer.Option(None, "--out", "-o", help="Output directory (must not exist or be empty). Default: out/MODEL-METRIC-RATIO."),
    device: str = typer.Option("cpu", help="Compute device for the layer-wise engine (cpu, cuda, cuda:1...)."),
    seed: int = typer.Option(0, help="Seed for calibration sampling."),
    export_dtype: str = typer.Option("auto", "--export-dtype", help="auto (the loaded weights' dtype), float32, bfloat16 or float16."),
    threads: int = typer.Option(None, help="torch CPU threads (default: torch's choice)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the model's own Python code to run (off by default)."),
    checks: bool = typer.Option(True, "--checks/--no-checks", help="After export: measure latency in the profile's runtime, run the lm-eval tasks, judge the budget, write report.md and report.png."),
    lm_eval_backend: str = typer.Option("hf", "--lm-eval-backend", help="hf: lm-eval tasks on the in-memory model; vllm: also on the export as vLLM serves it (report: accuracy.lm_eval.pruned_vllm)."),
    search: bool = typer.Option(False, "--search", help="Bayesian search (Optuna) over the metric mixture, calibration subset and compensation, on validation text; overrides --metric/--compensation."),
    trials: int = typer.Option(20, "--trials", help="Trial budget for --search."),
):
    from .output import signals_as_errors
    from .pipeline import Options, run

    if lm_eval_backend not in ("hf", "vllm"):
        raise UserError(f"Unknown --lm-eval-backend '{lm_eval_backend}' (use hf or vllm).")
    if export_dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise UserError(f"Unknown --export-dtype '{export_dtype}' (use auto, float32, bfloat16 or float16).")
    opts = Options(model=model, profile=profile, ratio=ratio, metric=metric, compensation=compensation,
                   structure=structure, attn_unit=attn_unit, round_to=round_to, calib=calib, nsamples=nsamples,
                   seqlen=seqlen, batch_size=batch_size, device=device, seed=seed, out=out,
                   export_dtype=export_dtype, threads=threads, trust_remote_code=trust_remote_code, checks=checks,
                   lm_eval_backend=lm_eval_backend, search=search, trials=trials)
    with signals_as_errors():
        report = run(opts, console=err)
    print_report(report)


def print_report(r: dict) -> None:
    t = Table(title=f"fitprune: {r['output']}")
    t.add_column("")
    t.add_column("dense", justify="right")
    t.add_column("pruned", justify="right")
    p, ppl = r["params"], r["perplexity"]
    t.add_row("parameters (total)", f"{p['before']['total']:,}", f"{p['after']['total']:,}")
    t.add_row("parameters (non-embedding)", f"{p['before']['non_embedding']:,}", f"{p['after']['non_embedding']:,}")
    t.add_row("decoder weights removed", "", f"{p['achieved_ratio_decoder']:.1%}")
    t.add_row(f"held-out perplexity ({ppl['windows']}x{ppl['seqlen']} tok)", f"{ppl['dense']:.3f}", f"{ppl['pruned']:.3f}")
    t.add_row("export", "", f"{r['export']['format']} ({r['export']['architecture']})")
    t.add_row("pruning step (s)", "", f"{r['seconds']['pruning_step']:.1f}")
    t.add_row("peak memory (RSS MiB)", "", f"{r['peak_rss_mib_total']:.0f}")
    out.print(t)
    out.print("seconds per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in r["seconds"].items()))


@profiles_app.command("list", help="List the shipped profiles.")
def profiles_list():
    from profiles import list_profiles, load_profile

    t = Table(title="shipped profiles")
    for c in ("name", "device", "memory GiB", "runtime", "dtype", "round_to"):
        t.add_column(c)
    for name in list_profiles():
        p = load_profile(name)
        t.add_row(p.name, p.device.name, f"{p.device.memory_gib:g} x {p.device.count}", p.runtime, p.dtype, str(p.round_to))
    out.print(t)


@profiles_app.command("show", help="Print a profile (a name or a path) as validated YAML.")
def profiles_show(name: str):
    import yaml

    from profiles import load_profile

    out.print(yaml.safe_dump(load_profile(name).model_dump(), sort_keys=False), markup=False, highlight=False)


@profiles_app.command("validate", help="Validate a profile YAML file; exit 0 when valid.")
def profiles_validate(path: str):
    from profiles import load_profile

    p = load_profile(path)
    out.print(f"{path}: valid profile '{p.name}'")


def _exception_types(name: str) -> tuple[type, ...]:
    """The click exception class `name` as click itself and as Typer's vendored copy define it."""
    import importlib

    found = []
    for mod in ("click.exceptions", "typer.exceptions", "typer._click.exceptions"):
        try:
            cls = getattr(importlib.import_module(mod), name, None)
        except ImportError:
            continue
        if isinstance(cls, type) and cls not in found:
            found.append(cls)
    return tuple(found)


def main(argv: list[str] | None = None) -> int:
    try:
        app(args=argv, standalone_mode=False)
    except UserError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        return exc.exit_code
    except _exception_types("Abort"):
        err.print("[bold red]error:[/] Interrupted; nothing was written.")
        return 130
    except _exception_types("ClickException") as exc:
        # usage errors (missing argument, unknown option): one line, exit 2
        err.print(f"[bold red]error:[/] {exc.format_message()}", highlight=False)
        return exc.exit_code
    except _exception_types("Exit") as exc:
        return getattr(exc, "exit_code", 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())
