"""`compress container OUT_DIR`: a build context that serves an export in a container."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import UserError
from . import app


def default_context_dir(model_dir: Path) -> Path:
    model_dir = Path(model_dir)
    return model_dir.with_name(model_dir.name + "-container")


def write(model_dir: Path, out: Path | None = None, runtime: str = "vllm", profile: str | None = None,
          base_image: str | None = None, host: str | None = None, port: int | None = None,
          served_model_name: str | None = None, say=print) -> Path:
    """Write the context atomically (a temporary sibling renamed into place); returns its path."""
    import json

    from exporters.container import ContextError, from_profile, write_context
    from profiles import load_profile

    from ..output import atomic_dir

    model_dir = Path(model_dir)
    if model_dir.exists() and not model_dir.is_dir():
        raise UserError(f"{model_dir} is a file; container needs an export directory written by `compress`.")
    if not model_dir.is_dir():
        raise UserError(f"The export directory {model_dir} does not exist.")
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir} is not an exported model directory (no config.json in it).")
    from ..model.loading import check_checkpoint

    check_checkpoint(model_dir)  # a truncated or incomplete export never becomes an image (headers only)
    report = model_dir / "report.json"
    if profile is None and report.is_file():
        try:
            profile = json.loads(report.read_text()).get("profile")
        except (OSError, json.JSONDecodeError):
            profile = None
    prof = load_profile(profile or "cpu-2core")
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"The config.json in {model_dir} is not readable JSON.") from exc
    settings = from_profile(prof, config, runtime=runtime, base_image=base_image, host=host, port=port,
                            served_model_name=served_model_name or model_dir.resolve().name)
    if settings.runtime == "vllm":  # an image whose `vllm serve` would refuse the widths: refused now
        from ..prune.tensor_parallel import check_config

        check_config(config, settings.tensor_parallel, f"{model_dir} (profile {prof.name})")
    out = Path(out) if out else default_context_dir(model_dir)
    if out.resolve() == model_dir.resolve() or model_dir.resolve() in out.resolve().parents:
        raise UserError(f"The context directory {out} must not be inside the export {model_dir}.")
    from ..config import refuse_out_dir

    refuse_out_dir(out)
    try:
        with atomic_dir(out) as tmp:
            info = write_context(model_dir, tmp, settings)
    except (ContextError, ValueError) as exc:
        raise UserError(str(exc)) from exc
    say(f"container context for {model_dir} ({'fitprune plugin, ' if info['plugin'] else ''}base "
        f"{settings.base_image}, profile {prof.name}) written to {out}; build it with: "
        f"docker build -t fitprune-serve {out}")
    return out


@app.command("container")
def container_cmd(
    out_dir: Path = typer.Argument(..., help="An export written by `compress` (config.json + safetensors)."),
    runtime: str = typer.Option("vllm", "--runtime", help="Serving runtime: vllm (onnxruntime: not yet)."),
    profile: str = typer.Option(None, "--profile", "-p", help="Profile for the serving settings (default: the export's report.json, else cpu-2core)."),
    out: Path = typer.Option(None, "--out", "-o", help="Context directory to write (must not exist or be empty). Default: OUT_DIR-container."),
    base_image: str = typer.Option(None, "--base-image", help="Default BASE_IMAGE build argument (default: vLLM's official image for the profile's device)."),
    host: str = typer.Option(None, "--host", help="Address the server binds inside the container (default 0.0.0.0)."),
    port: int = typer.Option(None, "--port", help="Server port (default 8000)."),
    served_model_name: str = typer.Option(None, "--served-model-name", help="Model name clients send (default: the export's folder name)."),
):
    """Write a container build context (Dockerfile, model, entrypoint, healthcheck, README) that serves OUT_DIR."""
    from rich.console import Console

    from ..output import signals_as_errors

    console = Console(stderr=True)
    with signals_as_errors():
        write(out_dir, out, runtime, profile, base_image, host, port, served_model_name,
              say=lambda m: console.print(m, highlight=False, markup=False))
