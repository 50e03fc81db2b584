"""Running a model's forward passes in a precision other than its weights' (autocast)."""

from __future__ import annotations

import torch


def autocast_to(device: str | torch.device, precision: str | None):
    """A context in which forward passes on `device` run under autocast to `precision` ("bfloat16",
    "float16"); None: off, the passes run as the weights are."""
    return torch.autocast(torch.device(device).type, dtype=getattr(torch, precision or "bfloat16"),
                          enabled=precision is not None)
