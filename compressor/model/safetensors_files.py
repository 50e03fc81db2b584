"""Reading a checkpoint's safetensors files without loading them: which file holds each tensor
(the shard index or the files' own headers) and a file's tensor table. Used by the up-front
checkpoint check (validate.py) and the out-of-core model (lazy.py)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError


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


def header(file: Path) -> tuple[dict, int]:
    """A safetensors file's tensor table (name -> dtype, shape, data_offsets) and where its data begins."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError("header length out of range")
            table = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"The safetensors file {file} is corrupt or truncated ({exc}).") from exc
    table.pop("__metadata__", None)
    end = max((t["data_offsets"][1] for t in table.values()), default=0)
    if 8 + n + end > size:
        raise UserError(f"The safetensors file {file} is corrupt or truncated ({size} bytes where its header "
                        f"needs {8 + n + end}).")
    return table, 8 + n
