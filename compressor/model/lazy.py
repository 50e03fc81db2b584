"""Out-of-core models: the skeleton lives on the meta device and the weights stay in the
checkpoint's safetensors files (memory-mapped) until a stage asks for one part of the model.

`LazyModel(path)` reads the config (and the shard index of a sharded checkpoint) and builds the
model without allocating any weight. `materialize(module, prefix, device)` reads that module's
tensors, in the checkpoint's dtype, onto the device; `release(module)` sends them back to the meta
device so the memory is freed. The layer-wise engine does this one decoder layer at a time, so
memory is one layer whatever the depth.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..errors import UserError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def weight_files(path: Path) -> dict[str, str]:
    """Tensor name -> safetensors file name, from the shard index or the single weights file."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as exc:
            raise UserError(f"The shard index {index} is not valid (no 'weight_map').") from exc
        missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if missing:
            raise UserError(f"The checkpoint {path} is incomplete: the shard {missing[0]} named in its index is "
                            "missing.")
        return dict(weight_map)
    files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise UserError(f"{path} holds no safetensors weights.")
    names: dict[str, str] = {}
    for f in files:
        with _open(path / f) as h:
            names.update({k: f for k in h.keys()})
    return names


def _open(file: Path):
    try:
        return safe_open(str(file), "pt")
    except (SafetensorError, OSError) as exc:
        raise UserError(f"The safetensors file {file} is corrupt or truncated ({str(exc).splitlines()[0]}).") from exc


def checkpoint_dtype(path: Path, config) -> torch.dtype:
    """The dtype the checkpoint's weights are stored in (config first, else the first tensor's)."""
    name = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "").replace("torch.", "")
    if name in _DTYPES:
        return _DTYPES[name]
    files = weight_files(path)
    with _open(path / next(iter(files.values()))) as h:
        first = next(iter(h.keys()))
        return _ST_DTYPES.get(h.get_slice(first).get_dtype(), torch.float32)


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


class LazyModel:
    """A causal LM whose weights are read from its safetensors files one module at a time."""

    def __init__(self, path: Path | str, dtype: torch.dtype | None = None, trust_remote_code: bool = False):
        from transformers import AutoConfig, AutoModelForCausalLM

        from .loading import _register_fitprune

        self.path = Path(path)
        _register_fitprune()
        try:
            self.config = AutoConfig.from_pretrained(self.path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"Could not read the config in {self.path}: {str(exc).splitlines()[0]}") from exc
        self.files = weight_files(self.path)
        self.dtype = dtype or checkpoint_dtype(self.path, self.config)
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=self.dtype,
                                                          trust_remote_code=trust_remote_code)
        _real_buffers(self.model, self.config)
        self.model.eval()
        self.tied = bool(getattr(self.config, "tie_word_embeddings", False))

    # ---- reading tensors ---------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self.files

    def tensor(self, name: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor of the checkpoint, checked to be finite."""
        return self.read([name], device, dtype)[name]

    def read(self, names: list[str], device: torch.device | str = "cpu", dtype: torch.dtype | None = None
             ) -> dict[str, torch.Tensor]:
        """Tensors of the checkpoint, each checked to be finite. Each file is mapped only while it is
        read, so pages of the checkpoint never linger in this process's resident memory."""
        missing = [n for n in names if n not in self.files]
        if missing:
            raise UserError(f"The checkpoint {self.path} is incomplete: it has no tensor '{missing[0]}'.")
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[n], []).append(n)
        out = {}
        for f, group in by_file.items():
            with _open(self.path / f) as h:
                for name in group:
                    try:
                        t = h.get_tensor(name)
                    except (SafetensorError, OSError) as exc:
                        raise UserError(f"The safetensors file {self.path / f} is corrupt or truncated "
                                        f"({exc}).") from exc
                    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
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

    def layer_prefix(self, i: int) -> str:
        return f"model.layers.{i}"

    def close(self) -> None:
        """Nothing stays open between reads (kept for callers that close what they open)."""

    def fp32_bytes(self) -> int:
        """What the whole model would take in memory in float32 (the in-memory path's cost)."""
        return 4 * sum(math.prod(p.shape) for p in self.model.parameters())
