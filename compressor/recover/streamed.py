"""Recovery for a model that does not fit in memory: the teacher's targets and the student's training
run one decoder layer at a time, the weights read from the checkpoints as the layer-wise engine
reads them (`model.lazy.LazyModel`; `Resident` for a model in memory gives the same result).

Contract:
- `streamed_teacher_targets`: `distill.teacher_targets` layer by layer, the LM head applied a slice
  of the vocabulary at a time (no full logits tensor of the batch is ever held).
- `distill_streamed`: `distill.distill` with LoRA adapters (the only mode that fits: the base
  weights stay frozen in the checkpoint's dtype, only the adapters and their optimizer state are in
  memory). Each step runs the layers forward keeping each layer's input, then backward in reverse,
  each layer read again and its forward recomputed (gradient checkpointing at layer granularity).
  Same adapters, same order of windows and same arithmetic as `distill`, so a model in memory
  recovers to the same weights either way (test). Returns the adapters' factors by weight name
  (`factors`: A and B of each weight, and the scale; a few hundred MiB where the deltas
  themselves would be the model's size).
- `merge_into_shards`: adds each weight's B @ A times the scale to the export's weights, one shard
  file at a time, each replaced atomically and marked, so a resumed run never adds a delta twice.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from ..memory import peak_rss_mib, reset_peak
from .distill import LORA_LR, LoRALinear, RecoveryResult, Schedule, TeacherTargets, _swap_linears, topk_kl

MERGED = "fitprune_recovered"  # a shard's metadata key: its deltas are added
SCALE = "lora_scale"  # the factors' key of the adapters' scale


@torch.no_grad()
def streamed_teacher_targets(lazy, adapter, windows: torch.Tensor, device: str = "cpu", k: int = 32,
                             batch_size: int = 4, vocab_chunk: int = 16384) -> TeacherTargets:
    """The dense model's top-k next-token log-probabilities at every position of `windows`."""
    from ..prune.engine import LayerwiseEngine

    model = lazy.model
    engine = LayerwiseEngine(model, adapter, windows, device=device, batch_size=batch_size, lazy=lazy, observe=False)
    engine.run(lambda *_: False)
    norm = lazy.materialize(adapter.decoder(model).norm, "model.norm", device)
    head = lazy.materialize(model.lm_head, "lm_head", device)
    ids, logp = [], []
    try:
        for start in range(0, windows.shape[0], batch_size):
            h = norm(engine.hidden[start: start + batch_size].to(device))[:, :-1]
            flat = h.reshape(-1, h.shape[-1])
            lse = torch.full((flat.shape[0],), -float("inf"), device=device)
            top_v = torch.empty(flat.shape[0], 0, device=device)
            top_i = torch.empty(flat.shape[0], 0, dtype=torch.long, device=device)
            for v0 in range(0, head.weight.shape[0], vocab_chunk):
                logits = (flat @ head.weight[v0: v0 + vocab_chunk].T).float()
                if head.bias is not None:
                    logits += head.bias[v0: v0 + vocab_chunk].float()
                lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=-1))
                v, i = logits.topk(min(k, logits.shape[1]), dim=-1)
                both_v, both_i = torch.cat([top_v, v], -1), torch.cat([top_i, i + v0], -1)
                keep = both_v.topk(min(k, both_v.shape[1]), dim=-1).indices
                top_v, top_i = both_v.gather(-1, keep), both_i.gather(-1, keep)
            ids.append(top_i.to(torch.int32).reshape(*h.shape[:2], -1).cpu())
            logp.append((top_v - lse[:, None]).to(torch.float16).reshape(*h.shape[:2], -1).cpu())
    finally:
        lazy.release(norm)
        lazy.release(head)
    return TeacherTargets(windows, torch.cat(ids), torch.cat(logp))


class _Adapters:
    """Every decoder Linear's LoRA adapters, kept in memory while the layers come and go."""

    def __init__(self, lazy, layers, rank: int, device):
        self.lazy, self.layers, self.rank, self.alpha, self.device = lazy, layers, rank, 2.0 * rank, device
        self.by_layer: list[dict[str, tuple]] = []
        for i, layer in enumerate(layers):  # made in `distill`'s order, from the same seed, on the skeleton
            self.by_layer.append({})
            _unwrap(self.attach(i, layer, new=True))

    def params(self) -> list[torch.nn.Parameter]:
        return [p for layer in self.by_layer for ab in layer.values() for p in ab]

    def attach(self, i: int, layer, new: bool = False):
        """Read layer `i` and wrap its Linears with their adapters (`new`: make them; nothing read)."""
        if not new:
            self.lazy.materialize(layer, f"model.layers.{i}", self.device)
        names = {id(m): n for n, m in layer.named_modules()}
        store = self.by_layer[i]

        def wrap(m):
            if not isinstance(m, torch.nn.Linear) or not (m.out_features and m.in_features):
                return None
            name = names[id(m)]
            if new:
                w = LoRALinear(m, self.rank, self.alpha, device=self.device)
                store[name] = (w.a, w.b)
                return w
            return LoRALinear(m, self.rank, self.alpha, *store[name])

        _swap_linears(layer, wrap)
        return layer

    def detach(self, layer) -> None:
        """Unwrap the layer's Linears (the adapters stay here) and drop its weights."""
        _unwrap(layer)
        self.lazy.release(layer)

    def factors(self, layer_names: list[str]) -> dict[str, torch.Tensor]:
        """Each adapted weight's A and B ("NAME.lora_a", "NAME.lora_b", NAME its name in the
        checkpoint) and the scale (SCALE): the weight's change is B @ A times the scale."""
        out = {SCALE: torch.tensor(self.alpha / self.rank)}
        for prefix, store in zip(layer_names, self.by_layer, strict=True):
            for name, (a, b) in store.items():
                out[f"{prefix}.{name}.weight.lora_a"] = a.detach().cpu()
                out[f"{prefix}.{name}.weight.lora_b"] = b.detach().cpu()
        return out


def distill_streamed(lazy, adapter, targets: TeacherTargets, tokens: int, lora_rank: int, lr: float = LORA_LR,
                     batch_size: int = 4, warmup: float = 0.05, device: str = "cpu", say=None,
                     seed: int = 0) -> tuple[RecoveryResult, dict[str, torch.Tensor]]:
    """Train LoRA adapters of `lazy`'s decoder towards `targets` for `tokens` training tokens (see the
    module doc); returns the figures and the adapters' factors (`_Adapters.factors`)."""
    from ..prune.engine import LayerwiseEngine

    torch.manual_seed(seed)
    reset_peak()
    model = lazy.model
    layers = adapter.layers(model)
    adapters = _Adapters(lazy, layers, lora_rank, device)
    params = adapters.params()
    if say:
        count = sum(p.numel() for p in params)
        say(f"recovery memory: {count:,} adapter parameters, {16 * count / 2**20:.0f} MiB with their gradients and "
            "optimizer state (float32), beside one layer's weights and every layer's inputs of one step")
    plan = Schedule(params, lr, tokens, batch_size, targets, warmup, seed)  # `distill`'s
    norm_mod, head_mod = adapter.decoder(model).norm, model.lm_head
    losses, start = [], time.monotonic()
    for step in range(plan.steps):
        idx = plan.batch(step)
        engine = LayerwiseEngine(model, adapter, targets.windows[idx], device=device, batch_size=batch_size,
                                 lazy=lazy, observe=False)
        h, by_batch = engine.capture_inputs()
        kw = by_batch[len(idx)]
        h = h.to(device)
        saved = []
        with torch.no_grad():
            for i, layer in enumerate(layers):
                saved.append(h)
                h = _out(adapters.attach(i, layer)(h, **kw))
                adapters.detach(layer)
        norm = lazy.materialize(norm_mod, "model.norm", device)
        head = lazy.materialize(head_mod, "lm_head", device)
        grad, loss = torch.zeros_like(h), 0.0
        try:
            for w in range(len(idx)):  # one window's logits at a time; the loss is the batch's mean
                x = h[w: w + 1].detach().requires_grad_()
                part = topk_kl(head(norm(x))[:, :-1], targets.top_ids[idx[w: w + 1]].to(device),
                               targets.top_logp[idx[w: w + 1]].to(device)) / len(idx)
                part.backward()
                grad[w] = x.grad[0]
                loss += float(part.detach())
        finally:
            lazy.release(norm)
            lazy.release(head)
        for i in reversed(range(len(layers))):
            layer = adapters.attach(i, layers[i])
            x = saved.pop().detach().requires_grad_()
            with torch.enable_grad():
                _out(layer(x, **kw)).backward(grad)
            grad = x.grad
            adapters.detach(layer)
        plan.step()
        plan.opt.zero_grad(set_to_none=True)
        losses.append(loss)
        if say and (step + 1) % max(1, plan.steps // 10) == 0:
            say(f"recovery: step {step + 1}/{plan.steps}, KL to the dense model {loss:.4f}")
    tail = losses[-max(1, len(losses) // 10):]
    res = RecoveryResult(plan.steps * plan.per_step, plan.steps, time.monotonic() - start, peak_rss_mib(), losses[0],
                         sum(tail) / len(tail), f"lora (rank {lora_rank}), streamed one layer at a time", lr)
    return res, adapters.factors([f"model.layers.{i}" for i in range(len(layers))])


def _out(y):
    return y[0] if isinstance(y, tuple) else y


def _unwrap(layer) -> None:
    _swap_linears(layer, lambda m: m.base if isinstance(m, LoRALinear) else None)


def delta(factors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The change of weight `name`: B @ A times the scale, as `LoRALinear.merged` adds it."""
    return factors[f"{name}.lora_b"] @ factors[f"{name}.lora_a"] * float(factors[SCALE])


def merge_into_shards(folder: Path, factors: dict[str, torch.Tensor]) -> int:
    """Add each adapted weight's `delta` to the export in `folder`, one shard file at a time (each
    rewritten beside itself and renamed into place, with the MERGED mark; one delta in memory at a
    time); shards already marked are left alone. Returns how many weights changed."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ..model.safetensors_files import weight_files

    changed = 0
    for name in sorted(set(weight_files(folder).values())):
        path = folder / name
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
            keys = list(f.keys())
            hit = [k for k in keys if f"{k}.lora_a" in factors]
            if not hit or meta.get(MERGED):
                changed += len(hit)
                continue
            tensors = {k: f.get_tensor(k) for k in keys}
        for k in hit:
            w = tensors[k]
            tensors[k] = (w.float() + delta(factors, k)).to(w.dtype)
        tmp = path.with_name(path.name + ".partial")
        save_file(tensors, str(tmp), metadata={**meta, MERGED: "1"})
        os.replace(tmp, path)
        changed += len(hit)
        del tensors
    return changed
