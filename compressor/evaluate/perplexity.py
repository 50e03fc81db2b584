"""Perplexity on held-out token windows, with any model that maps input ids to logits."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import UserError


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


@torch.no_grad()
def layerwise_perplexity(lazy, adapter, windows: torch.Tensor, device: str = "cpu", batch_size: int = 4,
                         vocab_chunk: int = 16384, store: Path | None = None, simulate=None) -> float:
    """The same perplexity for a model too large for memory (`lazy`: `model.lazy.LazyModel`): the
    decoder runs one layer at a time through the layer-wise engine, then the final norm and the LM
    head score each window with the logits computed a slice of the vocabulary at a time, so neither
    the whole model nor a full logits tensor is ever in memory. `store`: a folder where each finished
    layer's outputs are kept, so that an interrupted evaluation continues after its last layer.
    `simulate(layer)`: the module run in each decoder layer's place (a weight format simulated)."""
    from ..prune.engine import LayerwiseEngine

    model = lazy.model
    saved = store / "acts.safetensors" if store is not None else None
    on_done = None
    if saved is not None:
        store.mkdir(parents=True, exist_ok=True)

        def on_done(i: int, _layer, acts: dict) -> None:
            tmp = saved.with_name(saved.name + ".partial")
            save_file({"inputs": acts["inputs"].contiguous(), "done": torch.tensor([i + 1])}, str(tmp))
            os.replace(tmp, saved)

    start, resume = 0, None
    if saved is not None and saved.is_file():
        resume = load_file(str(saved))
        start = int(resume["done"][0])
    engine = LayerwiseEngine(model, adapter, windows, device=device, batch_size=batch_size, lazy=lazy, observe=False,
                             on_done=on_done, simulate=simulate)
    engine.run(lambda *_: False, start=start, resume_inputs=resume)
    hidden = engine.hidden
    norm = lazy.materialize(adapter.decoder(model).norm, "model.norm", device)
    head = lazy.materialize(model.lm_head, "lm_head", device)
    nll, count = 0.0, 0
    try:
        for start in range(0, hidden.shape[0], batch_size):
            h = norm(hidden[start: start + batch_size].to(device))[:, :-1]
            target = windows[start: start + batch_size, 1:].to(device)
            h = h.reshape(-1, h.shape[-1])
            target = target.reshape(-1)
            lse = torch.full((h.shape[0],), -float("inf"), dtype=torch.float32, device=device)
            picked = torch.zeros(h.shape[0], dtype=torch.float32, device=device)
            for v0 in range(0, head.weight.shape[0], vocab_chunk):
                logits = (h @ head.weight[v0: v0 + vocab_chunk].T).float()
                if head.bias is not None:
                    logits += head.bias[v0: v0 + vocab_chunk].float()
                lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=-1))
                inside = (target >= v0) & (target < v0 + logits.shape[1])
                idx = (target - v0).clamp(0, logits.shape[1] - 1)
                picked += torch.where(inside, logits.gather(1, idx[:, None])[:, 0], 0.0)
            nll += float((lse - picked).sum())
            count += target.numel()
    finally:
        lazy.release(norm)
        lazy.release(head)
    return math.exp(nll / count)


def layerwise_domain_perplexities(lazy, adapter, domains, device: str = "cpu", store: Path | None = None,
                                  simulate=None) -> dict:
    """`domain_perplexities` for a model too large for memory (`layerwise_perplexity` per domain,
    each kept in `store`/DOMAIN as it goes)."""
    per = {d.name: layerwise_perplexity(lazy, adapter, d.windows, device, store=store / d.name if store else None,
                                        simulate=simulate)
           for d in domains}
    return {"domains": per, "geomean": geometric_mean(per.values()) if per else None}


def finite(value: float, what: str) -> float:
    """A measured perplexity that is NaN or infinite ends the run: the model produces non-finite
    outputs (weights that overflow, a broken checkpoint), and a report of it would pass for a result."""
    if value is None or not math.isfinite(float(value)):
        raise UserError(f"The {what} is {value} (not a finite number): the model produces non-finite outputs; "
                        "nothing was written.")
    return value


def finite_scores(scores, what: str) -> None:
    """The same for a nested dict of scores (lm-eval tasks): the first non-finite figure ends the run."""
    def walk(x, path):
        if isinstance(x, float) and not math.isfinite(x):
            raise UserError(f"The {what} '{path}' is {x} (not a finite number): the model produces non-finite "
                            "outputs; nothing was written.")
        if isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{path}.{k}" if path else str(k))
    walk(scores, "")


def geometric_mean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def domain_perplexities(model, domains, batch_size: int = 4) -> dict:
    """Perplexity on each of `domains` (`data.Domain`: text of other domains than the calibration
    text) and their geometric mean: {"domains": {name: ppl}, "geomean": ppl}."""
    per = {d.name: perplexity(model, d.windows, batch_size) for d in domains}
    return {"domains": per, "geomean": geometric_mean(per.values()) if per else None}
