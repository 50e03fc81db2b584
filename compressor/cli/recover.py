"""`compress recover PRUNED --teacher DENSE --tokens N --out DIR`: recover an existing export by
distillation from the dense model (`compressor/recover/standalone.py`); under
`torchrun --nproc-per-node N -m compressor recover ...` data parallel over N processes.

Importing this module stays light (torch is imported only when the command runs).
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from ..errors import UserError
from . import app

err = Console(stderr=True)


@app.command("recover")
def recover_cmd(
    pruned: Path = typer.Argument(..., help="An export of compress (uniform or fitprune per-layer), unquantized."),
    teacher: str = typer.Option(..., "--teacher", help="The dense model it was pruned from (a directory, a hub "
                                "id, a .gguf file, or 'embedded' for the embedded SmolLM2)."),
    tokens: int = typer.Option(..., "--tokens", help="Training tokens (global, over every process)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (must not exist or be empty)."),
    lora: int = typer.Option(0, "--lora", help="LoRA rank (0: every weight trains); merged back before export."),
    calib: str = typer.Option("builtin", "--calib", help="Recovery text sources, as --calib of the main command; "
                              "the dense model's own samples are always half of it."),
    seqlen: int = typer.Option(512, "--seqlen", help="Tokens per training window."),
    batch_size: int = typer.Option(4, "--batch-size", help="Windows per step (global: split over the processes)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda (under torchrun: cuda:LOCAL_RANK)."),
    seed: int = typer.Option(0, "--seed"),
):
    """Recover an export by distillation from its dense model (one process, or N under torchrun)."""
    from ..config import check_device, refuse_out_dir
    from ..output import signals_as_errors
    from . import third_party_output

    third_party_output(False)
    if not pruned.is_dir() or not (pruned / "config.json").is_file():
        raise UserError(f"{pruned} is not an exported model directory (no config.json).")
    if "quantization_config" in (pruned / "config.json").read_text(encoding="utf-8", errors="replace"):
        raise UserError(f"{pruned} is quantized; recovery trains unquantized weights: recover the export of a run "
                        "without --quantize.")
    if tokens < 1:
        raise UserError(f"--tokens must be at least 1, got {tokens}.")
    if lora < 0:
        raise UserError(f"--lora must be 0 (every weight) or a positive rank, got {lora}.")
    if seqlen < 16 or batch_size < 1:
        raise UserError(f"--seqlen must be at least 16 and --batch-size at least 1 (got {seqlen} and {batch_size}).")
    try:
        check_device(device)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    refuse_out_dir(out)
    from ..recover.standalone import recover_export

    with signals_as_errors():
        res = recover_export(pruned, None if teacher == "embedded" else teacher, tokens, out, calib=calib,
                             seqlen=seqlen, lora_rank=lora, batch_size=batch_size, device=device, seed=seed,
                             say=err.print)
    err.print(f"recovery: {res['tokens']:,} tokens in {res['seconds']:.0f} s ({res['mode']}, {res['processes']} "
              f"process{'es' if res['processes'] > 1 else ''}), KL to the dense model {res['loss_first']:.4f} -> "
              f"{res['loss_last']:.4f}; wrote {out}")
