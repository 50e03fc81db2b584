"""The `compress` command line: one module per command, each registering itself on `app`.

`compress --profile NAME [MODEL]` runs the whole job (`compress run`); sub-commands run single
steps. Every failure a user can cause ends in one sentence and a non-zero exit. Importing this
package imports no torch: command modules import the heavy stages inside the command body.
"""

from __future__ import annotations

import sys

import click
import typer
from rich.console import Console
from typer.core import TyperGroup

from ..errors import UserError

err = Console(stderr=True)


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
def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("fitprune")
        except PackageNotFoundError:
            v = "unknown (running from a checkout that is not installed)"
        print(f"fitprune {v}")
        raise typer.Exit(0)


@app.callback()
def _options(version: bool = typer.Option(False, "--version", is_eager=True, callback=_version,
                                          help="Print fitprune's version and exit.")) -> None:
    """Prune an LLM to fit a hardware budget, export it for vLLM / ONNX Runtime, and measure it."""


def choice(*values: str):
    """An option type of fixed string values: typer lists them in --help, completes them and refuses
    any other in one line (exit 2) before the command runs; the value stays a plain `str`."""
    from typing import Literal

    return Literal[values]


# each module registers its command(s) on `app` when imported
from . import container, export_onnx, gate, plan, profiles, recover, run  # noqa: E402,F401


def third_party_output(verbose: bool) -> None:
    """Quiet by default: vLLM's INFO and WARNING lines (one per weight it casts on load) and the
    progress bars of transformers, datasets and the hub stay off the console, so it holds fitprune's
    own stages and figures (the lm-eval child process writes to a log shown only when it fails, the
    in-process lm-eval to OUT/logs/: `QUIET`); `-v` leaves them on. Set before
    those libraries are imported (they read it then), and inherited by vLLM's engine processes.
    Not TQDM_DISABLE: vLLM's offline `generate` divides by a disabled bar's elapsed time (0)."""
    import os

    from ..output import QUIET

    if verbose:
        return
    for key, value in (("VLLM_LOGGING_LEVEL", "ERROR"), ("TRANSFORMERS_VERBOSITY", "error"),
                       ("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("HF_DATASETS_DISABLE_PROGRESS_BARS", "1"),
                       ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"), (QUIET, "1")):
        os.environ.setdefault(key, value)


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
    from ..tempdirs import sweep_stale

    sweep_stale(say=lambda msg: err.print(msg, highlight=False, soft_wrap=True))  # what killed runs left
    try:
        # click returns a command's `typer.Exit(code)` as the value (standalone_mode=False)
        rc = app(args=argv, standalone_mode=False)
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
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())
