"""The layer-wise calibration engine.

The decoder runs one layer at a time: the inputs of layer 0 are captured once, each layer is
moved to the compute device, run over all calibration samples in batches, and its outputs become
the next layer's inputs. Meanwhile hooks stream statistics of the inputs of `o_proj` and
`down_proj` (per-channel mean and variance merged batch by batch in float64 with Chan's
parallel update; optionally the Gram matrix: each sample's product in the activations' precision,
at least float32, summed in float64, since float64 products run at half float32's speed on CPUs
and far slower on most GPUs). Memory is one layer plus the calibration
activations (two buffers of N x L x hidden), whatever the model's depth.
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..model.adapters import Adapter
from ..model.lazy import Resident


def _rows(x: torch.Tensor) -> torch.Tensor:
    """`x` as a matrix of row vectors, in float32 or wider (half precisions are widened)."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _add_products(into: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """into += sum over samples of a_s^T b_s: `into` in float64, each sample's product in float32 (or
    wider), added in place (no float64 copy of it: a 14336-wide Gram is 1.6 GB). `a`, `b` of shape
    [samples, tokens, dim] (or [tokens, dim]). Per sample, so that the sum does not depend on how the
    samples were batched (in memory and out of core give the same re-fit)."""
    if a.dim() < 3:
        a, b = a[None], b[None]
    for sa, sb in zip(a, b, strict=True):
        into.add_(_rows(sa).T @ _rows(sb))


class RunningStats:
    """Per-channel count, mean, M2 (and optionally X^T X) of a stream of row vectors, in float64."""

    def __init__(self, dim: int, gram: bool = False, device: torch.device | str = "cpu", sample_rows: int = 0):
        self.n = 0
        self.mean = torch.zeros(dim, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(dim, dtype=torch.float64, device=device)
        self.gram = torch.zeros(dim, dim, dtype=torch.float64, device=device) if gram else None
        # with a reference stream (the dense model run alongside the pruned one): sum of x_ref x^T
        # over the same tokens, and sum of x_ref -- what a re-fit towards the dense outputs needs
        self.cross: torch.Tensor | None = None
        self.ref_sum: torch.Tensor | None = None
        # a strided subsample of raw rows, for estimators that need samples (mutual information)
        self.sample_rows = sample_rows
        self.samples: list[torch.Tensor] = []

    def update(self, x: torch.Tensor) -> None:
        batch = x
        x = _rows(x).to(torch.float64)
        nb = x.shape[0]
        if nb == 0:
            return
        mb = x.mean(0)
        m2b = ((x - mb) ** 2).sum(0)
        n = self.n + nb
        delta = mb - self.mean
        self.mean += delta * (nb / n)
        self.m2 += m2b + delta**2 * (self.n * nb / n)
        self.n = n
        if self.gram is not None:
            _add_products(self.gram, batch, batch)
        if self.sample_rows:
            have = sum(t.shape[0] for t in self.samples)
            if have < self.sample_rows:
                stride = max(1, nb // 256)
                self.samples.append(x[::stride][: self.sample_rows - have].float().cpu())

    def update_cross(self, x_ref: torch.Tensor, x: torch.Tensor) -> None:
        """Accumulate sum x_ref x^T for the same tokens seen by the reference (dense) model and this one."""
        if self.cross is None:
            self.cross = torch.zeros(x_ref.shape[-1], x.shape[-1], dtype=torch.float64, device=x.device)
            self.ref_sum = torch.zeros(x_ref.shape[-1], dtype=torch.float64, device=x.device)
        _add_products(self.cross, x_ref, x)
        self.ref_sum += _rows(x_ref).to(torch.float64).sum(0)

    @property
    def sample(self) -> torch.Tensor:
        return torch.cat(self.samples) if self.samples else torch.empty(0, self.mean.numel())

    def merge(self, other: RunningStats) -> RunningStats:
        """Combine the statistics of two disjoint streams (Chan et al.)."""
        out = RunningStats(self.mean.numel(), self.gram is not None and other.gram is not None, self.mean.device)
        n = self.n + other.n
        delta = other.mean - self.mean
        out.n = n
        out.mean = self.mean + delta * (other.n / max(n, 1))
        out.m2 = self.m2 + other.m2 + delta**2 * (self.n * other.n / max(n, 1))
        if out.gram is not None:
            out.gram = self.gram + other.gram
        return out

    @property
    def var(self) -> torch.Tensor:
        """Population variance of each channel over all calibration tokens."""
        return self.m2 / max(self.n, 1)

    @property
    def sq_norm(self) -> torch.Tensor:
        """Sum of squares of each channel over all tokens (= ||X_j||^2, what Wanda uses)."""
        return self.m2 + self.n * self.mean**2

    def to(self, device) -> RunningStats:
        self.mean, self.m2 = self.mean.to(device), self.m2.to(device)
        if self.gram is not None:
            self.gram = self.gram.to(device)
        if self.cross is not None:
            self.cross, self.ref_sum = self.cross.to(device), self.ref_sum.to(device)
        return self


@dataclass
class LayerStats:
    """What the engine measured at one layer: inputs of o_proj ("attn") and down_proj ("mlp")."""

    attn: RunningStats
    mlp: RunningStats
    extra: dict = field(default_factory=dict)  # what a metric precomputed for this layer (e.g. gradients)


@dataclass
class EngineReport:
    peak_rss_mib: float = 0.0
    peak_device_mib: float = 0.0


class _Observer:
    """Forward pre-hooks on o_proj ("attn") and down_proj ("mlp") of one layer: stream their inputs
    into the layer's statistics; inputs seen during a reference pass are held and paired with the
    next pruned-stream batch (cross statistics) instead."""

    def __init__(self, stats: LayerStats):
        self.stats = stats
        self.reference_pass = False
        self.held: dict[str, torch.Tensor] = {}

    def hook(self, name: str):
        return lambda _module, args: self.observe(name, args[0])

    def observe(self, name: str, x: torch.Tensor) -> None:
        if self.reference_pass:
            self.held[name] = x
            return
        st = getattr(self.stats, name)
        if name in self.held:
            st.update_cross(self.held.pop(name), x)
        st.update(x)


class _Captured(Exception):
    def __init__(self, hidden: torch.Tensor, kwargs: dict):
        self.hidden, self.kwargs = hidden, kwargs


def peak_rss_mib() -> float:
    """The process's peak RSS since start (or since the last `compressor.memory.reset_peak`)."""
    from ..memory import peak_rss_mib as peak

    return peak()


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


Visitor = Callable[[int, nn.Module, LayerStats], bool]


class LayerwiseEngine:
    def __init__(
        self,
        model: nn.Module,
        adapter: Adapter,
        samples: torch.Tensor,
        device: str | torch.device = "cpu",
        batch_size: int = 8,
        gram: bool = False,
        sample_rows: int = 0,
        progress: Callable[[int, int], None] | None = None,
        reference: bool = False,
        lazy=None,
        observe: bool = True,
        on_done: Callable[[int, nn.Module, torch.Tensor], None] | None = None,
        simulate: Callable[[nn.Module], nn.Module] | None = None,
    ):
        self.model, self.adapter = model, adapter
        self.samples = samples
        self.device = torch.device(device)
        self.batch_size = max(1, batch_size)
        self.gram = gram
        self.sample_rows = sample_rows
        self.progress = progress
        # also carry the dense model's activations (each layer run on them before it is pruned) and
        # stream cross statistics between the dense and the pruned inputs of o_proj / down_proj
        self.reference = reference
        # where the layers' weights come from: out of core (`model.lazy.LazyModel`) each is read from the
        # checkpoint when the engine reaches it and dropped after `on_done` (the model is a meta-device
        # skeleton); None: resident in memory (`model.lazy.Resident`)
        self.lazy = lazy if lazy is not None else Resident(model)
        self.observe = observe  # False: only run the layers (evaluation), no statistics
        # on_done(index, layer, outputs): the layer is finished (visited, outputs recomputed if it
        # changed); `outputs` are the next layer's inputs (what a resumable run saves)
        self.on_done = on_done
        # observe=False: the module run in a layer's place (e.g. its weight format simulated), the layer
        # itself left as it is
        self.simulate = simulate
        self.report = EngineReport()
        self.hidden: torch.Tensor | None = None  # the last layer's outputs, after `run`

    def _load(self, module: nn.Module, prefix: str) -> None:
        self.lazy.materialize(module, prefix, self.device)

    def _unload(self, module: nn.Module) -> None:
        self.lazy.release(module)

    @torch.no_grad()
    def capture_inputs(self) -> tuple[torch.Tensor, dict[int, dict]]:
        """Run embeddings and whatever precedes layer 0; keep layer 0's inputs and kwargs."""
        decoder = self.adapter.decoder(self.model)
        layers = self.adapter.layers(self.model)
        first = layers[0]

        def hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            raise _Captured(hidden, kwargs)

        embed_parts = [(n, m) for n, m in decoder.named_children() if n != "layers"]
        for n, m in embed_parts:
            self._load(m, f"model.{n}")
        handle = first.register_forward_pre_hook(hook, with_kwargs=True)
        hidden_all, kwargs_by_bs = [], {}
        try:
            for batch in self.samples.split(self.batch_size):
                try:
                    decoder(input_ids=batch.to(self.device), use_cache=False)
                except _Captured as cap:
                    hidden_all.append(cap.hidden.to("cpu"))
                    kw = {k: v for k, v in cap.kwargs.items() if k not in ("past_key_values", "use_cache")}
                    kwargs_by_bs.setdefault(batch.shape[0], _to(kw, "cpu"))
        finally:
            handle.remove()
            for _, m in embed_parts:
                self._unload(m)
        return torch.cat(hidden_all), kwargs_by_bs

    @torch.no_grad()
    def _forward(self, layer: nn.Module, inputs: torch.Tensor, outputs: torch.Tensor, kwargs_by_bs,
                 before_batch: Callable[[int, int], None] | None = None) -> None:
        for start in range(0, inputs.shape[0], self.batch_size):
            x = inputs[start: start + self.batch_size].to(self.device)
            if before_batch:
                before_batch(start, x.shape[0])
            kw = _to(kwargs_by_bs[x.shape[0]], self.device)
            y = layer(x, **kw)
            if isinstance(y, tuple):
                y = y[0]
            outputs[start: start + x.shape[0]] = y.to(outputs.device)

    @torch.no_grad()
    def _reference_batch(self, obs: _Observer, layer, ref_in, ref_out, kwargs_by_bs, start: int, nb: int) -> None:
        """Run the (still dense) layer on the dense stream's rows [start, start + nb) first, so the
        observer pairs their o_proj / down_proj inputs with the pruned stream's for the same tokens."""
        obs.reference_pass = True
        try:
            self._forward(layer, ref_in[start: start + nb], ref_out[start: start + nb], kwargs_by_bs)
        finally:
            obs.reference_pass = False

    def run(self, visit: Visitor, start: int = 0, resume_inputs: dict[str, torch.Tensor] | None = None) -> EngineReport:
        """For each layer: stream statistics over all calibration samples, then call
        `visit(index, layer, stats)`. If the visitor changed the layer (returns True), the layer's
        outputs are recomputed so later layers see the pruned model's activations.

        A resumed run starts at layer `start` with the saved inputs of that layer
        (`resume_inputs`: "inputs", and "reference" with a reference stream)."""
        inputs, kwargs_by_bs = self.capture_inputs()
        if resume_inputs is not None:
            inputs = resume_inputs["inputs"].to(inputs.dtype)
        outputs = torch.empty_like(inputs)
        if self.reference:
            ref_in = resume_inputs["reference"].to(inputs.dtype) if resume_inputs is not None else inputs.clone()
            ref_out = torch.empty_like(inputs)
        layers = self.adapter.layers(self.model)
        for i, layer in enumerate(layers):
            if i < start:
                continue
            self._load(layer, f"model.layers.{i}")
            if not self.observe:
                if self.simulate is None:
                    self._forward(layer, inputs, outputs, kwargs_by_bs)
                else:
                    sim = self.simulate(layer)
                    self._forward(sim, inputs, outputs, kwargs_by_bs)
                    # free the copy and whatever cyclic garbage its run left now, not at the next full
                    # collection: an 8B run's resident memory grew into its 8 GiB limit without this
                    del sim
                    gc.collect()
                if self.on_done is not None:
                    self.on_done(i, layer, {"inputs": outputs})
                self._unload(layer)
                inputs, outputs = outputs, inputs
                if self.progress:
                    self.progress(i + 1, len(layers))
                continue
            shape = self.adapter.shape(layer)
            attn_in = self.adapter.attention(layer).o_proj
            mlp_in = self.adapter.mlp(layer).down_proj
            stats = LayerStats(
                attn=RunningStats(attn_in.in_features, self.gram, self.device),
                mlp=RunningStats(mlp_in.in_features, self.gram, self.device, self.sample_rows),
            )
            assert shape.num_heads * shape.head_dim == attn_in.in_features
            obs = _Observer(stats)
            before_batch = None
            if self.reference:
                before_batch = functools.partial(self._reference_batch, obs, layer, ref_in, ref_out, kwargs_by_bs)
            hooks = [attn_in.register_forward_pre_hook(obs.hook("attn")),
                     mlp_in.register_forward_pre_hook(obs.hook("mlp"))]
            try:
                self._forward(layer, inputs, outputs, kwargs_by_bs, before_batch)
            finally:
                for h in hooks:
                    h.remove()
            if visit(i, layer, stats):
                self._forward(layer, inputs, outputs, kwargs_by_bs)
            del stats, obs, before_batch  # free this layer's statistics before the next layer's
            if self.on_done is not None:
                self.on_done(i, layer, {"inputs": outputs, **({"reference": ref_out} if self.reference else {})})
            if self.device.type == "cuda":
                self.report.peak_device_mib = max(
                    self.report.peak_device_mib, torch.cuda.max_memory_allocated(self.device) / 2**20
                )
            self._unload(layer)
            inputs, outputs = outputs, inputs
            if self.reference:
                ref_in, ref_out = ref_out, ref_in
            if self.progress:
                self.progress(i + 1, len(layers))
        self.hidden = inputs
        self.report.peak_rss_mib = peak_rss_mib()
        return self.report
