"""Perplexity on held-out token windows, with any model that maps input ids to logits."""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token negative log-likelihood) over all windows (each scored independently)."""
    model.eval()
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        target = batch[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                 reduction="sum")
        nll += float(loss)
        count += target.numel()
    return math.exp(nll / count)
