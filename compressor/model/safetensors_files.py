"""Reading a checkpoint's safetensors files without loading them: which file holds each tensor
(the shard index or the files' own headers) and a file's tensor table. Used by the up-front
checkpoint check (validate.py) and the out-of-core model (lazy.py), and the dtype the weights are stored in."""

from __future__ import annotations

import json
import math
from pathlib import Path, PurePosixPath

import torch

from ..errors import UserError


def weight_files(path: Path) -> dict[str, str]:
    """Tensor name -> safetensors file name, from the shard index or the single weights file. An
    index is trusted for nothing: it must map names to plain file names inside `path` (symlinked
    shards, as in the Hugging Face cache, are fine: the name is confined, not the link's target)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as exc:
            raise UserError(f"The shard index {index} is not valid (no 'weight_map').") from exc
        if not isinstance(weight_map, dict) or not weight_map or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise UserError(f"The shard index {index} is not valid: its 'weight_map' must map tensor names to file "
                            "names.")
        outside = sorted({f for f in weight_map.values() if not _inside(f)})
        if outside:
            raise UserError(f"The shard index {index} names a file outside the checkpoint's folder ({outside[0]!r}); "
                            "shards must be plain file names in that folder.")
        missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if missing:
            raise UserError(f"The checkpoint {path} is incomplete: the shard {missing[0]} named in its index is "
                            "missing.")
        return dict(weight_map)
    # transformers reads model.safetensors alone when it is there (a repository may also ship other
    # weights files, e.g. Mistral's consolidated.safetensors, in another layout)
    files = ["model.safetensors"] if (path / "model.safetensors").is_file() else sorted(
        p.name for p in path.glob("*.safetensors") if p.is_file())
    if not files:
        raise UserError(f"{path} holds no safetensors weights.")
    names: dict[str, str] = {}
    for f in files:
        names.update({k: f for k in header(path / f)[0]})
    return names


def _inside(name: str) -> bool:
    """A shard name that stays in its folder: relative, no `..`, no drive or backslash tricks."""
    p = PurePosixPath(name)
    return bool(name) and not p.is_absolute() and ".." not in p.parts and "\\" not in name and ":" not in name \
        and p.suffix == ".safetensors"


def header(file: Path) -> tuple[dict, int]:
    """A safetensors file's tensor table (name -> dtype, shape, data_offsets) and where its data
    begins. Refused in one sentence: a header that is not an object of tensor entries, and data
    ranges that do not tile the data section (the format forbids holes and overlaps) or do not
    match their tensor's dtype and shape."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError("header length out of range")
            table = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise UserError(f"The safetensors file {file} is corrupt or truncated ({exc}).") from exc
    if not isinstance(table, dict):
        raise UserError(f"The safetensors file {file} is corrupt: its header is not a table of tensors.")
    table.pop("__metadata__", None)
    spans = []
    for name, t in table.items():
        why = _bad_entry(t)
        if why:
            raise UserError(f"The safetensors file {file} is corrupt: tensor '{name}' {why}.")
        spans.append((t["data_offsets"][0], t["data_offsets"][1], name))
    at = 0
    for begin, end, name in sorted(spans):
        if begin != at:
            raise UserError(f"The safetensors file {file} is corrupt: tensor '{name}' "
                            f"{'overlaps another' if begin < at else 'leaves a hole before it'} in the data section.")
        at = end
    if 8 + n + at > size:
        raise UserError(f"The safetensors file {file} is corrupt or truncated ({size} bytes where its header "
                        f"needs {8 + n + at}).")
    return table, 8 + n


_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
          "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def _bad_entry(t) -> str | None:
    """Why a header entry is not a tensor (None when it is one)."""
    if not isinstance(t, dict):
        return "is not an entry of dtype, shape and data_offsets"
    dtype, shape, offsets = t.get("dtype"), t.get("shape"), t.get("data_offsets")
    if dtype not in _BYTES:
        return f"has an unknown dtype {str(dtype)[:20]!r}"
    if not (isinstance(shape, list) and all(type(d) is int and 0 <= d < 2**40 for d in shape)):
        return "has no valid shape"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and 0 <= o < 2**50 for o in offsets)
            and offsets[0] <= offsets[1]):
        return "has no valid data_offsets"
    need = math.prod(shape) * _BYTES[dtype]
    if offsets[1] - offsets[0] != need:
        return f"has {offsets[1] - offsets[0]} bytes of data where its dtype and shape need {need}"
    return None


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def checkpoint_dtype(path: Path, config) -> torch.dtype:
    """The dtype the checkpoint's weights are stored in: the config's (an object or a dict), else the
    first tensor's."""
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    name = str(get("dtype") or get("torch_dtype") or "").replace("torch.", "")
    if name in _DTYPES:
        return _DTYPES[name]
    table, _ = header(path / next(iter(weight_files(path).values())))
    return next((_ST_DTYPES[t["dtype"]] for t in table.values() if t["dtype"] in _ST_DTYPES), torch.float32)
