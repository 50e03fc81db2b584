"""vLLM plugin for fitprune's per-layer-width format (`FitPruneForCausalLM`, model_type "fitprune").

Installed through the `vllm.general_plugins` entry point (see pyproject.toml), which vLLM loads in
every process it starts (front end, engine core, workers), so a plain `vllm serve OUT_DIR` serves
an export once fitprune is installed next to vLLM. `register` is idempotent and cheap: it imports
no vLLM model code (the model class is registered by name and imported lazily by vLLM).

`check_checkpoint` verifies, without vLLM, that an export's weights hold every tensor its config
implies, biases included: vLLM reads a missing bias of a fused projection as uninitialized memory.
A quantized export (compressed-tensors, exporters/quantize.py) stores some weights under other
names: a packed int4/int8 weight is `*.weight_packed` (with its `weight_scale` and `weight_shape`),
which stands for the `*.weight` the config implies.
"""

from __future__ import annotations

import json
from pathlib import Path

ARCHITECTURE = "FitPruneForCausalLM"
MODEL_CLASS = "exporters.vllm_plugin.model:FitPruneForCausalLM"


def register() -> None:
    """Register the transformers config and the vLLM model class (safe to call many times)."""
    from compressor.model.hf_arch import register as register_hf

    register_hf()  # vLLM parses config.json with transformers' AutoConfig
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)


def _checkpoint_keys(path: Path) -> set[str]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    keys: set[str] = set()
    for f in sorted(path.glob("*.safetensors")):
        with f.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            keys.update(k for k in json.loads(fh.read(n)) if k != "__metadata__")
    return keys


# compressed-tensors' name of a packed weight (pack-quantized: w4a16, w8a16) -> the dense name it replaces
PACKED_SUFFIX, WEIGHT_SUFFIX = ".weight_packed", ".weight"


def stored_as(keys) -> set[str]:
    """The tensor names a checkpoint holds, with each packed weight counted as the weight it stores."""
    return {k[: -len(PACKED_SUFFIX)] + WEIGHT_SUFFIX if k.endswith(PACKED_SUFFIX) else k for k in keys}


def expected_keys(config: dict) -> set[str]:
    """Names of the tensors a checkpoint with this config must hold (the family adapter knows)."""
    from compressor.model import adapter_for_config

    return adapter_for_config(config).expected_keys(config)


def check_checkpoint(path: str | Path) -> None:
    """Raise ValueError (one sentence) when the export at `path` lacks a tensor its config implies."""
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} has no readable config.json ({exc}).") from exc
    missing = sorted(expected_keys(config) - stored_as(_checkpoint_keys(path)))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ValueError(f"The checkpoint in {path} lacks tensors its config implies: "
                         f"{', '.join(missing[:3])}{more}; vLLM would read them as uninitialized memory.")
