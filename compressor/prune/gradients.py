"""First-order Taylor importance (LLM-Pruner style) from a few calibration batches.

For a group of weights (a unit's rows/columns), removing it changes the loss by about
-sum(w * g). The *element-wise* estimate sums |w * g| over the group (fine-grained); the
*vector-wise* estimate takes |sum(w * g)| over the group (coarse-grained). Both are computed per
attention input channel (its q_proj row + o_proj column) and per MLP channel (gate/up rows +
down column), separately for each calibration batch so their stability can be measured.

Memory is bounded: only the decoder's linear weights take gradients, one batch of a few
sequences is in flight at a time, and per-batch results are reduced to per-channel vectors at once.
"""

from __future__ import annotations

import torch

from ..model.adapters import Adapter


def _channel_terms(adapter: Adapter, layer) -> dict[str, torch.Tensor]:
    """w * g for every weight, arranged [channel, weights of that channel] per module kind."""
    a, m = adapter.attention(layer), adapter.mlp(layer)

    def wg(lin):
        return (lin.weight.data * lin.weight.grad).double()

    return {
        "attn": torch.cat([wg(a.q_proj), wg(a.o_proj).T], dim=1),  # [H*hd, 2*hidden]
        "mlp": torch.cat([wg(m.gate_proj), wg(m.up_proj), wg(m.down_proj).T], dim=1),  # [I, 3*hidden]
    }


def taylor_batches(model, adapter: Adapter, samples: torch.Tensor, n_batches: int = 4,
                   device: str = "cpu") -> list[dict[str, torch.Tensor]]:
    """Per layer: {"attn_elem", "attn_vec", "mlp_elem", "mlp_vec"}, each [n_batches, channels]."""
    layers = adapter.layers(model)
    params = [p for layer in layers for mod in (adapter.attention(layer), adapter.mlp(layer))
              for p in mod.parameters() if p.dim() == 2]
    was = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    out = [{k: [] for k in ("attn_elem", "attn_vec", "mlp_elem", "mlp_vec")} for _ in layers]
    model.to(device)
    try:
        for batch in samples.split(max(1, samples.shape[0] // n_batches))[:n_batches]:
            for p in params:
                p.grad = None
            batch = batch.to(device)
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            loss.backward()
            with torch.no_grad():
                for i, layer in enumerate(layers):
                    for kind, t in _channel_terms(adapter, layer).items():
                        out[i][f"{kind}_elem"].append(t.abs().sum(1).cpu())
                        out[i][f"{kind}_vec"].append(t.sum(1).abs().cpu())
    finally:
        for p in params:
            p.grad = None
        for p, r in was.items():
            p.requires_grad_(r)
        model.to("cpu")
    return [{k: torch.stack(v) for k, v in d.items()} for d in out]
