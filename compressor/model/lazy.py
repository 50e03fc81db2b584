"""Out-of-core models: the skeleton lives on the meta device and the weights stay in the
checkpoint's safetensors files (memory-mapped) until a stage asks for one part of the model.

`LazyModel(path)` reads the config (and the shard index of a sharded checkpoint) and builds the
model without allocating any weight. `materialize(module, prefix, device)` reads that module's
tensors, in the checkpoint's dtype, onto the device; `release(module)` sends them back to the meta
device so the memory is freed. The layer-wise engine does this one decoder layer at a time, so
memory is one layer whatever the depth.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from .safetensors_files import _ST_DTYPES, checkpoint_dtype, header, weight_files
from .validate import _finite

_ALL_DTYPES = {**_ST_DTYPES, "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
               "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _read(f, base: int, entry: dict, file: Path) -> torch.Tensor:
    """One tensor, read with plain file reads: no memory map, so the checkpoint's pages are page
    cache (reclaimable) rather than this process's resident memory."""
    dtype = _ALL_DTYPES.get(entry["dtype"])
    if dtype is None:
        raise UserError(f"The safetensors file {file} holds a tensor of unsupported dtype {entry['dtype']}.")
    start, end = entry["data_offsets"]
    buf = torch.empty(end - start, dtype=torch.uint8)
    f.seek(base + start)
    if f.readinto(buf.numpy()) != end - start:
        raise UserError(f"The safetensors file {file} is truncated.")
    return buf.view(dtype).reshape(entry["shape"])


def checkpoint_bytes(path: Path) -> int:
    return sum((path / f).stat().st_size for f in set(weight_files(path).values()))


def _real_buffers(model: nn.Module, config) -> None:
    """Modules whose buffers are computed at construction (rotary embeddings' inverse frequencies)
    are rebuilt on the CPU: built on the meta device they hold no values, and no checkpoint has them."""
    for name, mod in list(model.named_modules()):
        if not any(b.is_meta for b in mod.buffers(recurse=False)):
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, type(mod)(config=getattr(mod, "config", config)))


class Resident:
    """Weights already in memory, seen through `LazyModel`'s interface: loading a layer moves it to the
    compute device and releasing it moves it back to the CPU, so one layer-wise driver serves both."""

    def __init__(self, model: nn.Module):
        self.model = model

    def materialize(self, module: nn.Module, prefix: str, device: torch.device | str) -> nn.Module:
        return module.to(device)

    def release(self, module: nn.Module) -> None:
        module.to("cpu")


class LazyModel:
    """A causal LM whose weights are read from its safetensors files one module at a time."""

    def __init__(self, path: Path | str, dtype: torch.dtype | None = None, trust_remote_code: bool = False,
                 own_export: bool = False):
        """`own_export`: `path` is an export this tool wrote, read as it is: its per-layer format marks a
        removed block with 0 heads or channels, which the check of an input model's config refuses, and
        its weights were checked finite before they were written (the check costs a pass over them)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        from ..memory import return_freed_memory_to_the_os
        from .loading import _register_fitprune, read_config_file
        from .validate import check_tensors

        return_freed_memory_to_the_os()
        self.path = Path(path)
        _register_fitprune()
        if not own_export:
            read_config_file(self.path)  # the size keys, before transformers fills them with a 7B default
        try:
            self.config = AutoConfig.from_pretrained(self.path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"Could not read the config in {self.path}: {str(exc).splitlines()[0]}") from exc
        self.files = weight_files(self.path)
        self.dtype = dtype or checkpoint_dtype(self.path, self.config)
        self._headers: dict[str, tuple[dict, int]] = {}
        try:
            with torch.device("meta"):
                self.model = AutoModelForCausalLM.from_config(self.config, dtype=self.dtype,
                                                              trust_remote_code=trust_remote_code)
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"The config in {self.path} does not describe a valid model: "
                            f"{str(exc).splitlines()[0]}") from exc
        check_tensors(self.path, self.model)  # names and shapes, from the headers, before any weight is read
        _real_buffers(self.model, self.config)
        self.model.eval()
        self.tied = bool(getattr(self.config, "tie_word_embeddings", False))
        self.check_finite = not own_export

    # ---- reading tensors ---------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self.files

    def tensor(self, name: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor of the checkpoint, checked to be finite."""
        return self.read([name], device, dtype)[name]

    def read(self, names: list[str], device: torch.device | str = "cpu", dtype: torch.dtype | None = None
             ) -> dict[str, torch.Tensor]:
        """Tensors of the checkpoint, each checked to be finite."""
        missing = [n for n in names if n not in self.files]
        if missing:
            raise UserError(f"The checkpoint {self.path} is incomplete: it has no tensor '{missing[0]}'.")
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[n], []).append(n)
        out = {}
        for f, group in by_file.items():
            file = self.path / f
            if f not in self._headers:
                self._headers[f] = header(file)
            table, base = self._headers[f]
            with open(file, "rb") as fh:
                for name in group:
                    t = _read(fh, base, table[name], file)
                    if self.check_finite and t.is_floating_point() and not _finite(t):
                        raise UserError(f"The checkpoint {self.path} has non-finite values (NaN or inf) in '{name}'.")
                    out[name] = t.to(device=device, dtype=dtype or self.dtype)
                    del t
        return out

    def materialize(self, module: nn.Module, prefix: str, device: torch.device | str) -> nn.Module:
        """Give `module` (named `prefix` in the checkpoint) its weights, on `device`."""
        keys = {}
        for name, _ in module.named_parameters():
            key = f"{prefix}.{name}"
            if self.tied and key == "lm_head.weight" and not self.has(key):
                key = "model.embed_tokens.weight"
            keys[name] = key
        tensors = self.read(sorted(set(keys.values())), device)
        for name, key in keys.items():
            owner_name, _, attr = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            owner._parameters[attr] = nn.Parameter(tensors[key], requires_grad=False)
        for name, b in list(module.named_buffers()):
            if b.device != torch.device(device):
                owner_name, _, attr = name.rpartition(".")
                owner = module.get_submodule(owner_name) if owner_name else module
                owner._buffers[attr] = b.to(device)
        return module

    def release(self, module: nn.Module) -> None:
        """Drop the module's weights (back to the meta device); buffers (small, and some computed at
        construction rather than read from the checkpoint) go back to the CPU."""
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None and not p.is_meta:
                    sub._parameters[name] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
            for name, b in list(sub._buffers.items()):
                if b is not None and not b.is_meta:
                    sub._buffers[name] = b.to("cpu")
        if self.tied:  # the skeleton's tied LM head is the embedding again (parameter counts, exports)
            self.model.get_output_embeddings().weight = self.model.get_input_embeddings().weight
