"""The transformers/torch runtime: load an exported directory as any user would."""

from __future__ import annotations

from pathlib import Path

import torch


def load(path: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """Load an export with stock transformers. Our per-layer format resolves through fitprune's
    registered class when fitprune is installed, else through the modeling file beside the
    weights when `trust_remote_code` is set."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import exporters.hf_arch  # noqa: F401  (registers model_type "fitprune")
    except ImportError:
        pass
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=trust_remote_code)
    tok = AutoTokenizer.from_pretrained(str(path))
    return model.eval(), tok
