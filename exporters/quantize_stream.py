"""Quantize an export one decoder layer at a time, so that exports larger than memory quantize too.

With the whole model in memory (`quantize.quantize_in_memory`) a 70B export needs 140 GB of RAM to
become a 35 GB W4A16 checkpoint. Here the model is a skeleton on the meta device (`LazyModel`: no
weight is allocated) and every step is still compressed-tensors' own code:

1. the library attaches the scheme to the skeleton (`apply_quantization_config`, through
   `quantize.attach_scheme`, which `quantize.quantize_export` passes in) and derives the checkpoint's
   `quantization_config` and storage format from it (`ModelCompressor.from_pretrained_model`),
   exactly as for the model in memory;
2. for each decoder layer: its tensors are read from the export's safetensors files, the weight
   scales are computed by the library's formula (`quantize.weight_qparams`), the layer is compressed
   by the library (`compress_module`, the per-module step of `ModelCompressor.compress_model`: int8,
   packed int4 or fp8 plus scales) and its tensors go to a shard of their own
   (`exporters.stream.ShardWriter`); then the layer goes back to the meta device;
3. the tensors outside the decoder layers (embeddings, final norm, the LM head, which stays dense)
   are copied one at a time in the export's dtype;
4. the new shards replace the dense ones, config.json is written as `save_pretrained` writes it and
   the library's `update_config` adds `quantization_config`.

Peak memory is one decoder layer (dense, a float32 copy of one matrix while its scales are computed,
and the compressed layer) or the largest non-decoder tensor, whichever is larger; not the model. The
result is the in-memory path's tensor for tensor, config.json included (tests/test_quantize_stream.py);
only the sharding differs (a shard per layer, as the out-of-core export writes).

The new shards are written into a hidden folder inside the export and moved into place only when
all are complete: a full disk or an unreadable shard leaves the export as it was, with one sentence.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from compressor.errors import UserError

WORK = ".fitprune-quantize"  # the folder inside the export the new shards are written to
DONE = "complete.json"  # in WORK once every quantized file is there: the files, and the dense ones they replace


def quantize_streaming(folder: Path, prepare: Callable[[nn.Module], None], qparams: Callable[[nn.Module], None],
                       shard_bytes: int | None = None) -> list[str]:
    """Quantize the export in `folder` (uniform or per-layer) in place, one decoder layer in memory at
    a time; returns the new weight files. `prepare(model)` attaches the scheme to the skeleton (and
    refuses it first where it cannot apply), `qparams(module)` fills one Linear's weight scales: both
    are `exporters.quantize`'s, which calls this (so the scheme is defined in one place)."""
    from compressor.model.safetensors_files import weight_files
    from compressor.output import _disk_full

    folder = Path(folder)
    work = folder / WORK
    done = work / DONE
    if done.is_file():  # a run interrupted while the quantized files replaced the dense ones: finish that
        plan = json.loads(done.read_text())
    else:
        if "quantization_config" in _config(folder):
            raise UserError(f"The export {folder} is quantized already (its config.json has a quantization_config).")
        shutil.rmtree(work, ignore_errors=True)  # left by a killed run
        try:
            work.mkdir()
            files = _quantize_into(folder, work, prepare, qparams, shard_bytes)
            plan = {"files": files, "new": sorted(f.name for f in work.iterdir()),
                    "old": sorted(set(weight_files(folder).values()) | {"model.safetensors.index.json"})}
            tmp = work / (DONE + ".partial")
            tmp.write_text(json.dumps(plan))
            os.replace(tmp, done)  # from here on the replacement can always be finished
        except BaseException as exc:
            shutil.rmtree(work, ignore_errors=True)
            if isinstance(exc, UserError) or not isinstance(exc, Exception):
                raise
            if _disk_full(exc):
                raise UserError(f"The disk holding {folder} is full; the export was not quantized.",
                                exit_code=28) from exc
            if isinstance(exc, OSError):
                raise UserError(f"Could not quantize {folder}: {exc.strerror or exc} ({exc.filename or folder}).") \
                    from exc
            raise
    _replace_shards(folder, work, plan["new"], plan["old"])
    shutil.rmtree(work, ignore_errors=True)
    return plan["files"]


def _quantize_into(folder: Path, work: Path, prepare, qparams, shard_bytes: int | None):
    """Write the quantized shards and config.json of the export in `folder` into `work`; returns the
    weight files."""
    from compressed_tensors.compressors import ModelCompressor, compress_module
    from compressed_tensors.quantization import QuantizationStatus

    from compressor.model import adapter_for
    from compressor.model.lazy import LazyModel

    from .stream import STREAM_SHARD_BYTES, ShardWriter

    # the skeleton on the meta device, in the export's dtype, names and shapes checked against the
    # files; a per-layer export builds as fitprune's architecture (LazyModel registers it)
    lazy = LazyModel(folder, own_export=True)
    model = lazy.model
    prepare(model)
    compressor = ModelCompressor.from_pretrained_model(model)
    writer = ShardWriter(work, STREAM_SHARD_BYTES if shard_bytes is None else shard_bytes)
    for i, layer in enumerate(adapter_for(model).layers(model)):
        prefix = f"model.layers.{i}"
        _materialize(lazy, layer, prefix)
        with torch.no_grad():
            for module in layer.modules():
                if getattr(module, "quantization_scheme", None) is not None:
                    qparams(module)
            for module in layer.modules():  # the library's per-module compression (compress_model's loop)
                compress_module(module, compressor.force_compression_format)
        writer.add({f"{prefix}.{k}": v.contiguous() for k, v in layer.state_dict().items()})
        _release(layer)
    # what save_pretrained writes outside the layers: the model's own tensors (a tied head is left out)
    keep = set(model.state_dict()) - ({"lm_head.weight"} if lazy.tied else set())
    rest = [k for k in sorted(lazy.files) if not k.startswith("model.layers.") and k in keep]
    small = [k for k in rest if "embed" not in k and not k.startswith("lm_head")]
    for group in [small, *[[k] for k in rest if k not in small]]:  # the large ones one at a time
        writer.add(lazy.read(group))
    files = writer.finish()
    # config.json as save_pretrained writes it for the model in memory (its dtype and class named)
    model.config.dtype = str(lazy.dtype).removeprefix("torch.")
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(work)
    compressor.quantization_config.quantization_status = QuantizationStatus.COMPRESSED  # as compress_model sets it
    compressor.update_config(str(work))  # the library writes quantization_config, still in the work folder
    return files


def _materialize(lazy, layer: nn.Module, prefix: str) -> None:
    """Give `layer` its tensors from the export; the parameters the scheme added (scales, zero points:
    not in the export) become zeros on the CPU, to be filled by `weight_qparams` as the in-memory path
    fills the ones `apply_quantization_config` created."""
    names = {name: f"{prefix}.{name}" for name, _ in layer.named_parameters()}
    tensors = lazy.read(sorted(k for k in names.values() if lazy.has(k)))
    for name, p in list(layer.named_parameters()):
        owner_name, _, attr = name.rpartition(".")
        owner = layer.get_submodule(owner_name) if owner_name else layer
        t = tensors.get(names[name])
        owner._parameters[attr] = nn.Parameter(torch.zeros(p.shape, dtype=p.dtype) if t is None else t,
                                               requires_grad=False)
    for name, b in list(layer.named_buffers()):
        if b.is_meta:
            raise UserError(f"The layer {prefix} has a buffer '{name}' the export does not hold.")


def _release(layer: nn.Module) -> None:
    """Every tensor of the layer back to the meta device: the memory is freed."""
    for sub in layer.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and not p.is_meta:
                sub._parameters[name] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)


def _replace_shards(folder: Path, work: Path, new: list[str], old: list[str]) -> None:
    """The quantized files `new` come in from `work` (each rename replaces a file of the same name at
    once), then the dense shards (and index) in `old` they did not replace go. Idempotent: a file
    already moved is done, so an interrupted replacement finishes on the next call."""
    for name in new:
        if (work / name).is_file():
            os.replace(work / name, folder / name)
    for name in set(old) - set(new):
        (folder / name).unlink(missing_ok=True)


def _config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"The export {folder} has no readable config.json ({exc}).") from exc
