"""Recovery of an existing export, on one process or several: `compress recover PRUNED --teacher
DENSE --tokens N --out DIR`, or the same under `torchrun --nproc-per-node N -m compressor recover ...`.

Contract: the student is the export in PRUNED (either export shape), the teacher the dense model it
was pruned from (same tokenizer and vocabulary). Process 0 picks the recovery text and computes the
teacher's top-k targets (`distill.recovery_windows`, `distill.teacher_targets`) and sends them to
the others; every process trains its share of each global batch (`distill.distill`, torch's
DistributedDataParallel over gloo on CPUs, NCCL on GPUs); process 0 writes the recovered model in
PRUNED's architecture and dtype, with `recovery.json`, into DIR (complete or not at all).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import UserError


def _join_processes(device: str) -> tuple[int, int, str]:
    """(rank, world size, this process's device); joins the process group torchrun describes."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    rank = dist.get_rank()
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
        torch.cuda.set_device(device)
    return rank, world, device


def _from_process0(obj, rank: int, world: int):
    if world == 1:
        return obj
    import torch.distributed as dist

    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def recover_export(pruned: Path, teacher: str, tokens: int, out: Path, calib: str = "builtin", seqlen: int = 512,
                   lora_rank: int = 0, batch_size: int = 4, device: str = "cpu", seed: int = 0, say=print) -> dict:
    """Distil `teacher` into the export `pruned` for `tokens` tokens and write the result to `out`
    (process 0); returns the recovery figures (every process)."""
    import torch.distributed as dist

    from ..model import adapter_for
    from ..model.lazy import checkpoint_dtype
    from ..model.loading import load
    from ..output import atomic_dir
    from .distill import distill, recovery_windows, teacher_targets

    rank, world, device = _join_processes(device)
    try:
        student = load(str(pruned))
        dtype = checkpoint_dtype(Path(pruned), student.model.config)
        targets = None
        if rank == 0:
            dense = load(teacher)
            if dense.model.config.vocab_size != student.model.config.vocab_size:
                raise UserError(f"The teacher {teacher} has a vocabulary of {dense.model.config.vocab_size} tokens "
                                f"and the export {pruned} one of {student.model.config.vocab_size}: the teacher "
                                "must be the model the export was pruned from.")
            n = max(4, min(256, -(-tokens // seqlen)))
            windows = recovery_windows(calib, dense.tokenizer, dense.model, n, seqlen, seed)
            targets = teacher_targets(dense.model.to(device), windows)
            dense_decoder = adapter_for(dense.model).count_params(dense.model)["decoder"]
            del dense
        targets, dense_decoder = _from_process0((targets, dense_decoder) if rank == 0 else None, rank, world)
        model = student.model.to(device)
        kept = adapter_for(model).count_params(model)["decoder"] / dense_decoder
        res = distill(model, targets, tokens, lora_rank=lora_rank, decoder_layers=adapter_for(model).layers(model),
                      batch_size=batch_size, seed=seed, say=say if rank == 0 else None, kept=kept)
        figures = {**res.as_dict(), "processes": world, "teacher": teacher, "student": str(pruned),
                   "tokens_requested": tokens, "unique_tokens": int(targets.windows.numel())}
        if rank == 0:
            from exporters import export_hf

            with atomic_dir(out) as tmp:
                export_hf(model.to("cpu"), student.tokenizer, tmp, dtype=dtype)
                (tmp / "recovery.json").write_text(json.dumps(figures, indent=2))
        if world > 1:
            dist.barrier()
        return figures
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
