"""Recovery by distillation: after pruning, the pruned model (the student) learns the dense model's
(the teacher's) next-token distribution on a token budget.

Contract:
- `recovery_windows` picks the training text: the calibration sources' calibration region plus
  text the dense model samples itself, never the held-out region, the cross-domain texts or the
  lm-eval items (those come from the builtin text's test region and other files: `data.py`).
- `teacher_targets` runs the dense model once over those windows and keeps, per position, its
  top-k log-probabilities (float16) and their token ids: the teacher is not needed in memory
  afterwards, and a model that does not fit can produce them layer by layer.
- `distill` trains the student in place to minimise KL(teacher || student) over the teacher's
  top-k tokens plus one bucket for the rest of the vocabulary, with AdamW, a linear warm-up and a
  cosine decay, for `tokens` training tokens (the windows repeat when the budget exceeds them).
  Every decoder parameter trains (in float32, the model returned in its own dtype; the token
  embeddings and the LM head stay as they are: trained on the recovery text's narrow vocabulary,
  they lowered the model's perplexity on other domains less), or, with `lora_rank`,
  low-rank adapters (float32) on every decoder Linear that are merged back before it returns, so
  the exported architecture is the pruned one.
- Data parallel: where `torch.distributed` is initialised (torchrun) with several processes, each
  takes its share of every global batch of `batch_size` windows and torch's DistributedDataParallel
  averages the gradients, so N processes take the steps one process would (`recover/command.py`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..memory import peak_rss_mib, reset_peak

# AdamW's peak learning rates (docs/benchmarks.md, "Recovery by distillation"): every decoder parameter
# of a model that kept all its weights (`full_lr` scales it), and LoRA adapters (they start from zero
# and carry a fraction of the weights: a larger step)
LR_UNPRUNED = 1.6e-4
LORA_LR = 1e-3


def full_lr(kept: float) -> float:
    """The peak learning rate for every decoder parameter of a student that kept `kept` (0-1] of the
    dense decoder's weights: `LR_UNPRUNED / kept`, to two significant digits. The more pruning
    removed, the larger the step; a lightly pruned model, near the dense one, overfits the recovery
    text with larger steps."""
    return float(f"{LR_UNPRUNED / min(1.0, max(kept, 0.05)):.1e}")


@dataclass
class TeacherTargets:
    windows: torch.Tensor  # [n, L] token ids
    top_ids: torch.Tensor  # [n, L-1, k] int32: the teacher's k likeliest next tokens at each position
    top_logp: torch.Tensor  # [n, L-1, k] float16: their log-probabilities


def recovery_windows(calib: str, tokenizer, model, n_windows: int, seqlen: int, seed: int) -> torch.Tensor:
    """`n_windows` windows of `seqlen` tokens: `calib`'s sources (their calibration region) and the
    dense model's own samples, in equal shares (`data.calib_windows` with `+self`); with no `model`
    (one that does not fit in memory generates nothing), `calib`'s sources alone. A different seed
    from the calibration's, so the windows are not the calibration windows again."""
    from ..data import MIX, calib_parts, calib_windows

    spec = calib if model is None or "self" in calib_parts(calib) else f"{calib}{MIX}self"
    return calib_windows(spec, tokenizer, model, n_windows, seqlen, seed + 7919)


@torch.no_grad()
def teacher_targets(model, windows: torch.Tensor, k: int = 32, batch_size: int = 4) -> TeacherTargets:
    """The dense model's top-k next-token log-probabilities at every position of `windows`."""
    model.eval()
    device = next(model.parameters()).device
    ids, logp = [], []
    for batch in windows.split(batch_size):
        logits = model(input_ids=batch.to(device), use_cache=False).logits[:, :-1].float()
        top = torch.log_softmax(logits, dim=-1).topk(k, dim=-1)
        ids.append(top.indices.to(torch.int32).cpu())
        logp.append(top.values.to(torch.float16).cpu())
    return TeacherTargets(windows, torch.cat(ids), torch.cat(logp))


def topk_kl(student_logits: torch.Tensor, top_ids: torch.Tensor, top_logp: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) on the teacher's top-k tokens plus one bucket
    holding the rest of the vocabulary's probability (the teacher's and the student's)."""
    s_logp = torch.log_softmax(student_logits.float(), dim=-1)
    s_top = s_logp.gather(-1, top_ids.long())
    t_logp = top_logp.float()
    t_top = t_logp.exp()
    t_rest = (1 - t_top.sum(-1)).clamp_min(1e-6)
    s_rest = (1 - s_top.exp().sum(-1)).clamp_min(1e-6)
    kl = (t_top * (t_logp - s_top)).sum(-1) + t_rest * (t_rest.log() - s_rest.log())
    return kl.mean()


class LoRALinear(torch.nn.Module):
    """A frozen Linear plus a trainable low-rank update B @ A (B starts at zero: the model is unchanged
    until it trains)."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float, a=None, b=None, device=None):
        """`a`, `b`: adapters trained before (a layer streamed in again), else new ones, drawn on the
        CPU (the same numbers on every device) and kept on `device` (default: the weight's)."""
        super().__init__()
        self.base, self.scale = base, alpha / rank
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        if a is None:
            device = device or base.weight.device
            a = torch.nn.Parameter((torch.randn(rank, base.in_features, dtype=torch.float32) / math.sqrt(rank))
                                   .to(device))
            b = torch.nn.Parameter(torch.zeros(base.out_features, rank, dtype=torch.float32, device=device))
        self.a, self.b = a, b

    def forward(self, x):
        return self.base(x) + (F.linear(F.linear(x.float(), self.a), self.b) * self.scale).to(x.dtype)

    def merged(self) -> torch.nn.Linear:
        with torch.no_grad():
            self.base.weight += (self.b @ self.a * self.scale).to(self.base.weight.dtype)
        self.base.weight.requires_grad_(True)
        if self.base.bias is not None:
            self.base.bias.requires_grad_(True)
        return self.base


def _swap_linears(module: torch.nn.Module, make) -> int:
    n = 0
    for name, child in list(module.named_children()):
        new = make(child)
        if new is not None:
            setattr(module, name, new)
            n += 1
        else:
            n += _swap_linears(child, make)
    return n


def add_lora(decoder_layers, rank: int, alpha: float | None = None) -> int:
    """Wrap every Linear of the decoder layers with a LoRA adapter; returns how many."""
    alpha = alpha if alpha is not None else 2.0 * rank
    return sum(_swap_linears(layer, lambda m: LoRALinear(m, rank, alpha)
                             if isinstance(m, torch.nn.Linear) and m.out_features > 0 and m.in_features > 0
                             else None)
               for layer in decoder_layers)


def merge_lora(decoder_layers) -> int:
    """Fold every adapter back into its Linear (the architecture is the pruned one again)."""
    return sum(_swap_linears(layer, lambda m: m.merged() if isinstance(m, LoRALinear) else None)
               for layer in decoder_layers)


def _parameters_to(model, dtype: torch.dtype) -> None:
    """The parameters (not the buffers: rotary frequencies stay float32) in `dtype`, in place."""
    for p in model.parameters():
        p.data = p.data.to(dtype)


def _world() -> tuple[int, int]:
    """(this process's rank, number of processes): (0, 1) unless torch.distributed is initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _mean_over_processes(loss: torch.Tensor, world: int) -> float:
    if world > 1:
        import torch.distributed as dist

        loss = loss.clone()
        dist.all_reduce(loss)
        loss /= world
    return float(loss)


class Schedule:
    """The training loop's arithmetic, shared by `distill` and the streamed recovery: AdamW over
    `params`, a linear warm-up then a cosine decay over the steps `tokens` takes in batches of
    `batch_size` windows, and which windows each step trains on (a seeded order, repeated)."""

    def __init__(self, params, lr: float, tokens: int, batch_size: int, targets: TeacherTargets, warmup: float,
                 seed: int):
        self.params, self.batch_size = params, batch_size
        self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
        self.per_step = batch_size * targets.top_ids.shape[1]
        self.steps = steps = max(1, math.ceil(tokens / self.per_step))
        warm = max(1, int(warmup * steps))

        def rate(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, rate)
        self.n = targets.windows.shape[0]
        self.order = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed))

    def batch(self, step: int) -> torch.Tensor:
        """The indices of the windows step `step` trains on (the whole global batch)."""
        pos = step * self.batch_size
        return torch.stack([self.order[(pos + i) % self.n] for i in range(self.batch_size)])

    def step(self) -> None:
        """Clip the gradients' norm to 1, step the optimizer and the learning rate."""
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.sched.step()


@dataclass
class RecoveryResult:
    tokens: int  # training tokens seen (positions with a target)
    steps: int
    seconds: float
    peak_rss_mib: float
    loss_first: float  # KL of the first step
    loss_last: float  # mean KL of the last 10% of steps
    mode: str  # "full, embeddings frozen", "full" (train_embeddings) or "lora (rank r)"
    lr: float  # AdamW's peak learning rate

    def as_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) and k != "lr" else v) for k, v in self.__dict__.items()}


def distill(model, targets: TeacherTargets, tokens: int, lr: float | None = None, batch_size: int = 4,
            lora_rank: int = 0, decoder_layers=None, warmup: float = 0.05, say=None, seed: int = 0,
            train_embeddings: bool = False, kept: float | None = None) -> RecoveryResult:
    """Train `model` in place towards `targets` for `tokens` training tokens (see the module doc);
    `train_embeddings` True trains the token embeddings and the LM head too. `lr` None: `full_lr(kept)`
    (`kept`: the share of the dense decoder's weights the model has; required then), or `LORA_LR` with
    `lora_rank`."""
    torch.manual_seed(seed)
    reset_peak()
    held = next(model.parameters()).dtype
    if not lora_rank and held != torch.float32:
        _parameters_to(model, torch.float32)  # a bfloat16 step would round small updates away
    if not train_embeddings:
        for m in (model.get_input_embeddings(), model.get_output_embeddings()):
            for p in (m.parameters() if m is not None else ()):
                p.requires_grad_(False)
    if lora_rank:
        if decoder_layers is None:
            raise ValueError("LoRA recovery needs the decoder layers to wrap")
        for p in model.parameters():
            p.requires_grad_(False)
        add_lora(decoder_layers, lora_rank)
    if lr is None and not lora_rank and kept is None:
        raise ValueError("full-parameter recovery without `lr` needs `kept` (the share of the decoder kept)")
    if lr is None:
        lr = LORA_LR if lora_rank else full_lr(kept)
    params = [p for p in model.parameters() if p.requires_grad]
    rank, world = _world()
    if batch_size % world:
        raise UserError(f"The recovery batch ({batch_size} windows) must split evenly over {world} processes.")
    share = batch_size // world
    student = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        student = DistributedDataParallel(model)
    plan = Schedule(params, lr, tokens, batch_size, targets, warmup, seed)
    opt, steps, per_step = plan.opt, plan.steps, plan.per_step
    device = next(model.parameters()).device
    model.train()
    losses, start = [], time.monotonic()
    try:
        for step in range(steps):
            idx = plan.batch(step)[rank * share: (rank + 1) * share]
            logits = student(input_ids=targets.windows[idx].to(device), use_cache=False).logits[:, :-1]
            loss = topk_kl(logits, targets.top_ids[idx].to(device), targets.top_logp[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()  # with several processes, DDP averages the gradients: the global batch's mean
            plan.step()
            losses.append(_mean_over_processes(loss.detach(), world))
            if say and (step + 1) % max(1, steps // 10) == 0:
                say(f"recovery: step {step + 1}/{steps}, KL to the dense model {losses[-1]:.4f}")
    finally:
        model.eval()
        if lora_rank:
            merge_lora(decoder_layers)
        _parameters_to(model, held)
        for p in model.parameters():
            p.requires_grad_(True)
        opt.zero_grad(set_to_none=True)
    tail = losses[-max(1, len(losses) // 10):]
    return RecoveryResult(steps * per_step, steps, time.monotonic() - start, peak_rss_mib(), losses[0],
                          sum(tail) / len(tail), (f"lora (rank {lora_rank})" if lora_rank else
                          "full" if train_embeddings else "full, embeddings frozen")
                          + (f", data parallel over {world} processes" if world > 1 else ""), lr)
