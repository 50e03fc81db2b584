"""Streaming sharded export: finished decoder layers go to the output's safetensors shards as soon
as they are done, so the pruned model is never assembled in memory.

`ShardWriter` writes each finished layer as `part-0000k.safetensors` (or buffers whole layers until
`shard_bytes` are reached); `finish()` renames the parts to the hub's
`model-0000k-of-0000n.safetensors` (plus `model.safetensors.index.json`), or to
`model.safetensors` when there is one. Its `state()` lists the parts already on disk, so a resumed
run continues after them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

# 0: every layer is a shard of its own, written as soon as it is finished (memory: one layer, flat in
# depth; an 8B model gives 35 shards of ~0.4 GB, a 70B one ~80 of ~1.7 GB). A size groups layers
# into shards of about that many bytes, holding them in memory until the shard is full.
STREAM_SHARD_BYTES = 0


def layer_tensors(layer: nn.Module, index: int, expected: set[str], dtype: torch.dtype,
                  renumber: dict[int, int] | None = None) -> dict[str, torch.Tensor]:
    """One decoder layer's tensors under their checkpoint names, in `dtype`, on the CPU, with a zero
    bias wherever the target config implies one the layer does not have (`expected`: the names the
    whole checkpoint must hold). `renumber` ({pruned index: exported index}, `exporters.hf.layer_renumbering`)
    leaves out wholly removed layers (nothing returned) and renumbers the others."""
    if renumber is not None:
        if index not in renumber:
            return {}
        index = renumber[index]
    prefix = f"model.layers.{index}."
    sd = {prefix + k: v.detach().to("cpu", dtype).contiguous() for k, v in layer.state_dict().items()}
    for key in sorted(k for k in expected if k.startswith(prefix) and k not in sd):
        if not key.endswith(".bias"):
            raise KeyError(f"the pruned layer {index} has no tensor {key}")
        rows = sd[key[: -len(".bias")] + ".weight"].shape[0]
        sd[key] = torch.zeros(rows, dtype=dtype)
    return sd


class ShardWriter:
    def __init__(self, out: Path, shard_bytes: int = STREAM_SHARD_BYTES, parts: list[dict] | None = None):
        self.out = Path(out)
        self.shard_bytes = shard_bytes
        self.parts: list[dict] = list(parts or [])  # {"file", "keys", "bytes"} of the parts on disk
        self.buffer: dict[str, torch.Tensor] = {}
        self.size = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> bool:
        """Buffer `tensors`; write a part when the buffer is a shard's worth. True if a part was written."""
        self.buffer.update(tensors)
        self.size += sum(t.numel() * t.element_size() for t in tensors.values())
        if self.size >= self.shard_bytes:
            self.flush()
            return True
        return False

    def flush(self) -> None:
        if not self.buffer:
            return
        name = f"part-{len(self.parts) + 1:05d}.safetensors"
        tmp = self.out / (name + ".partial")
        save_file(self.buffer, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, self.out / name)  # a part on disk is always complete
        self.parts.append({"file": name, "keys": sorted(self.buffer), "bytes": self.size})
        self.buffer, self.size = {}, 0

    def state(self) -> list[dict]:
        return list(self.parts)

    def finish(self) -> list[str]:
        """Write what is buffered and give the parts their final names; returns the file names.
        Idempotent: a part already renamed (a run interrupted here and resumed) counts as done."""
        self.flush()
        n = len(self.parts)
        names = ["model.safetensors"] if n == 1 else [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
        for part, name in zip(self.parts, names, strict=True):
            src, dst = self.out / part["file"], self.out / name
            if src.is_file() or not dst.is_file():  # FileNotFoundError here: the part is truly lost
                os.replace(src, dst)
        if n == 1:
            return names
        weight_map = {key: name for part, name in zip(self.parts, names, strict=True) for key in part["keys"]}
        total = sum(p["bytes"] for p in self.parts)
        index = self.out / "model.safetensors.index.json"
        tmp = index.with_name(index.name + ".partial")
        tmp.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                                  indent=2))
        os.replace(tmp, index)
        return [*names, "model.safetensors.index.json"]
