"""Models: family adapters (the one authority on a model family) and loading."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import UserError
from ..registry import Registry

if TYPE_CHECKING:
    from .adapters import Adapter

_A = "compressor.model.adapters"
FAMILIES = Registry("model family", {
    "llama": f"{_A}:LLAMA",
    "mistral": f"{_A}:MISTRAL",
    "qwen2": f"{_A}:QWEN2",
    "qwen3": f"{_A}:QWEN3",
    "fitprune": f"{_A}:FITPRUNE",  # our per-layer-width format: a pruned model can be pruned again
})


def adapter_for_config(config: Any) -> Adapter:
    """The adapter of a config (a transformers config or its dict), or one sentence naming the supported families."""
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        known = ", ".join(n for n in FAMILIES.names() if n != "fitprune")
        raise UserError(f"The architecture '{model_type}' is not supported (supported: {known}).")
    return FAMILIES.get(model_type)


def adapter_for(model: Any) -> Adapter:
    """The adapter of a loaded model."""
    return adapter_for_config(model.config)


def base_adapter(config: dict) -> Adapter:
    """The adapter of the family a config was pruned from (itself unless it is fitprune's format)."""
    if config.get("model_type") == "fitprune":
        return adapter_for_config({"model_type": config.get("base_model_type", "llama")})
    return adapter_for_config(config)
