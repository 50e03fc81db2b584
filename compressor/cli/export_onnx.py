"""`compress export-onnx MODEL_DIR --out DIR [--dtype float32|float16]`: turn an exported
Hugging Face directory (the family's own format or fitprune's per-layer format) into an ONNX
model with a KV cache that ONNX Runtime serves, check it, and (by default) compare its logits
with transformers on a short sequence.

Importing this module stays light (torch, transformers and onnx are imported only when the
command runs).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from ..errors import UserError
from . import app

err = Console(stderr=True)
out_console = Console()

VERIFY_TOLERANCE = {"float32": 1e-3, "float16": 0.1}  # max |logit difference| on the check sequence


def _load(model_dir: Path, dtype_name: str):
    """The export as (model, tokenizer or None) through the one model loader."""
    import torch

    from ..model.loading import load

    _check_model_dir(model_dir)
    loaded = load(str(model_dir), getattr(torch, dtype_name), tokenizer_required=False)
    return loaded.model, loaded.tokenizer


def _check_model_dir(model_dir: Path) -> None:
    if model_dir.exists() and not model_dir.is_dir():
        raise UserError(f"{model_dir} is a file; export-onnx needs an exported model directory.")
    if not model_dir.is_dir():
        raise UserError(f"The model directory {model_dir} does not exist.")
    try:
        qc = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        qc = None  # the loader says what is wrong with the config
    if qc:
        how = qc.get("quant_method", "quantization_config") if isinstance(qc, dict) else "quantization_config"
        raise UserError(f"{model_dir} is quantized ({how}); export-onnx exports unquantized exports: run compress "
                        "without --quantize and export that.")


def _verify(model, path: Path, dtype_name: str) -> float:
    """Max |logit difference| between transformers (fp32) and ONNX Runtime on a short sequence."""
    import numpy as np
    import torch

    from runtimes.onnx_runtime import OnnxRuntime

    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model.float()(ids).logits.numpy()
    rt = OnnxRuntime(path)
    try:
        got = rt.logits(ids.numpy())
    finally:
        rt.close()
    return float(np.abs(got - ref).max())


@app.command("export-onnx")
def export_onnx_cmd(
    model_dir: Path = typer.Argument(..., help="An exported model directory (uniform or fitprune per-layer)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (must not exist or be empty)."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 or float16 (bfloat16 is refused: "
                              "ONNX Runtime's CPU provider cannot run it)."),
    external_data_threshold_mb: int = typer.Option(
        1024, "--external-data-threshold-mb", help="Weights above this many MiB go to model.onnx.data."),
    optimize: bool = typer.Option(True, "--optimize/--no-optimize", help="Run onnxscript's graph optimizer "
                                  "(about half the export time; ONNX Runtime optimizes at load either way)."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Compare ONNX Runtime with transformers "
                                "on a 16-token sequence after export."),
):
    """Export MODEL_DIR to ONNX with a KV cache (past key/values in, present out) for ONNX Runtime."""
    from ..config import refuse_out_dir
    from ..output import atomic_dir, signals_as_errors

    _check_model_dir(model_dir)  # the paths first: one sentence before the slow imports and the load
    refuse_out_dir(out)  # not empty, a file, under a file, unwritable
    try:
        from exporters.onnx import ONNX_DTYPES, UNSUPPORTED_DTYPES, export_onnx
    except ImportError as exc:  # pragma: no cover - torch missing
        raise UserError(f"The ONNX exporter cannot be imported: {exc}.") from exc
    if dtype in UNSUPPORTED_DTYPES:
        raise UserError(f"Cannot export ONNX in {dtype}: {UNSUPPORTED_DTYPES[dtype]}.")
    if dtype not in ONNX_DTYPES:
        raise UserError(f"Unknown --dtype '{dtype}' (use {' or '.join(ONNX_DTYPES)}).")
    if not 0 <= external_data_threshold_mb < 2048:
        raise UserError(f"--external-data-threshold-mb must be between 0 and 2047 (a single ONNX file holds at most "
                        f"2 GiB), got {external_data_threshold_mb}.")
    for pkg in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(pkg)
        except ImportError as exc:
            raise UserError(f"ONNX export needs the package '{pkg}': pip install 'fitprune[onnx]'.") from exc

    with signals_as_errors():
        with err.status(f"loading {model_dir}"):
            model, tokenizer = _load(model_dir, dtype)
        with atomic_dir(out) as tmp:
            with err.status(f"exporting to ONNX ({dtype}, KV cache)"):
                try:
                    res = export_onnx(model, tokenizer, tmp, dtype,
                                      external_data_threshold=external_data_threshold_mb * 2**20, optimize=optimize)
                except ValueError as exc:
                    raise UserError(str(exc)) from exc
            diff = None
            if verify:
                with err.status("comparing ONNX Runtime with transformers"):
                    diff = _verify(model, tmp, dtype)
                if diff > VERIFY_TOLERANCE[dtype]:
                    raise UserError(f"ONNX Runtime's logits differ from transformers' by {diff:.3g} "
                                    f"(> {VERIFY_TOLERANCE[dtype]:g}); nothing was written.")
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    out_console.print(f"wrote {out} ({size / 2**20:.1f} MiB: {', '.join(res.files)})")
    if diff is not None:
        out_console.print(f"ONNX Runtime vs transformers, max |logit diff| on 16 tokens: {diff:.2e}")
