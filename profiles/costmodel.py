"""The analytic cost model: memory and latency of an architecture (per-layer widths) on a profile.

Memory (per the whole deployment, summed over tensor-parallel devices):
    weights + KV cache for the workload (max context x concurrent sequences) + runtime overhead.

Latency, a roofline per forward step with a fixed per-step overhead:
    prefill (compute-bound):  2 x params x prompt tokens (+ causal attention) / (peak FLOP/s x compute eff.)
    decode (bandwidth-bound): (weight bytes + KV bytes read) / (bandwidth x bandwidth eff.)
    each step also pays  step_overhead + layers x layer_overhead  (runtime, kernel launches, sampling)
    and, with tensor parallel over N devices, bytes and FLOPs split N ways plus 2 all-reduces per layer.

TTFT = one prefill of the prompt at batch 1; TPOT = one decode step at batch 1 (context = prompt +
half the output); throughput = concurrency x output tokens / (prefill of all prompts + the rest
of the decode steps at batch = concurrency), the way `runtimes.base.Runtime.measure` times it.

A weight format (`fmt`, default "none" = the profile's dtype; else exporters.quantize's schemes)
changes the decoder's bytes per weight (`weight_bytes`) in memory and in the bytes a step reads;
embeddings, the LM head and the KV cache stay in the profile's dtype, and FLOPs do not change.

The efficiency factors come from the profile (`efficiency:`), or from a measured dense run on the
device (see `compressor.budget.fitting.fit_cost_model`). This module knows architectures, not weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from .schema import Efficiency, Profile

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GIB = 2**30

# Bytes per decoder weight of each weight format (exporters/quantize.py's schemes and the kernel
# table's dense names): the stored weight plus its scales where a group of input channels shares
# one scale (scales are stored in the dense dtype). Per-output-channel scales add one scale per
# row of thousands of weights and are left out. None: the profile's dense dtype.
_FORMAT_BYTES = {"w8a8-int8": (1.0, None), "fp8": (1.0, None), "w8a16": (1.0, 128), "w4a16": (0.5, 128),
                 "bf16": (2.0, None), "fp16": (2.0, None), "fp32": (4.0, None)}


def weight_bytes(fmt: str, dtype_bytes: float) -> float:
    """Bytes one decoder weight takes in format `fmt` ("none": the dense dtype, `dtype_bytes`).
    Embeddings and the LM head are not quantized (exporters.quantize leaves lm_head dense), so
    callers price only decoder weights with this."""
    if fmt == "none":
        return float(dtype_bytes)
    try:
        size, group = _FORMAT_BYTES[fmt]
    except KeyError:
        raise ValueError(f"unknown weight format '{fmt}' (known: none, {', '.join(_FORMAT_BYTES)})") from None
    return size + (dtype_bytes / group if group else 0.0)


@dataclass(frozen=True)
class Arch:
    """A decoder-only transformer as the cost model sees it: shared sizes and per-layer widths."""

    hidden: int
    vocab: int
    head_dim: int
    q_heads: tuple[int, ...]
    kv_heads: tuple[int, ...]
    intermediate: tuple[int, ...]
    tied_embeddings: bool = True
    # the linear layers carry biases: a bias compensation's export turns on the config's bias switches
    # (Llama's attention_bias / mlp_bias). Negligible bytes, but not free everywhere: vLLM CPU's
    # int8 W8A8 kernel ran a 16-layer SmolLM2 shape at 0.95x of dense TPOT with biases, 0.71x without
    biased: bool = False

    @classmethod
    def from_config(cls, cfg) -> Arch:
        """From a transformers config (or its dict); per-layer widths when the config has them."""
        d = cfg if isinstance(cfg, dict) else cfg.to_dict()
        n = int(d["num_hidden_layers"])
        heads = int(d["num_attention_heads"])
        head_dim = int(d.get("head_dim") or d["hidden_size"] // heads)

        def per_layer(key: str, default: int) -> tuple[int, ...]:
            v = d.get(key)
            return tuple(int(x) for x in v) if isinstance(v, list) and len(v) == n else (default,) * n

        kv = int(d.get("num_key_value_heads") or heads)
        return cls(
            hidden=int(d["hidden_size"]), vocab=int(d["vocab_size"]), head_dim=head_dim,
            q_heads=per_layer("layer_num_attention_heads", heads),
            kv_heads=per_layer("layer_num_key_value_heads", kv),
            intermediate=per_layer("layer_intermediate_size", int(d["intermediate_size"])),
            tied_embeddings=bool(d.get("tie_word_embeddings", False)),
            biased=bool(d.get("attention_bias") or d.get("mlp_bias")),
        )

    @property
    def layers(self) -> int:
        return len(self.q_heads)

    def layer_params(self, i: int) -> int:
        """Weights of layer i's linear modules (norms and biases are negligible)."""
        attn = self.hidden * self.head_dim * (2 * self.q_heads[i] + 2 * self.kv_heads[i])
        return attn + 3 * self.hidden * self.intermediate[i]

    @property
    def decoder_params(self) -> int:
        return sum(self.layer_params(i) for i in range(self.layers))

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def lm_head_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def total_params(self) -> int:
        """Parameters stored (a tied LM head is stored once)."""
        return self.decoder_params + self.embedding_params * (1 if self.tied_embeddings else 2)

    @property
    def params_read_per_token(self) -> int:
        """Weights a decode step reads: every decoder layer and the LM head (not the embedding
        table, of which one row is read)."""
        return self.decoder_params + self.lm_head_params

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """KV cache bytes of one token of one sequence over all layers."""
        return 2 * sum(self.kv_heads) * self.head_dim * dtype_bytes


@dataclass(frozen=True)
class Memory:
    weights_gib: float
    kv_cache_gib: float
    overhead_gib: float
    available_gib: float  # the profile's memory over all devices, less the headroom

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.kv_cache_gib + self.overhead_gib

    @property
    def fits(self) -> bool:
        return self.total_gib <= self.available_gib


@dataclass(frozen=True)
class Prediction:
    memory: Memory
    ttft_s: float
    tpot_s: float
    throughput_tok_s: float
    efficiency: str  # where the efficiency factors came from

    def as_dict(self) -> dict:
        m = asdict(self.memory)
        m["total_gib"] = self.memory.total_gib
        return {"memory": m, "ttft_s": self.ttft_s, "tpot_s": self.tpot_s,
                "throughput_tok_s": self.throughput_tok_s, "efficiency": self.efficiency}


@dataclass(frozen=True)
class Violation:
    line: str  # memory | ttft | tpot | throughput
    predicted: float
    limit: float
    unit: str
    headroom: float = 0.0  # the line's fraction kept in reserve (`Budget.latency_headroom`): limit = line x (1 - it)

    @property
    def excess(self) -> float:
        """How far past the line, as a factor >= 1 (throughput: limit / predicted)."""
        if self.line == "throughput":
            return self.limit / max(self.predicted, 1e-12)
        return self.predicted / self.limit

    def sentence(self) -> str:
        names = {"memory": "memory", "ttft": "time to first token", "tpot": "time per output token",
                 "throughput": "throughput"}
        rel = "below the minimum" if self.line == "throughput" else "over the limit"
        reserve = (f" (the {self.limit / (1 - self.headroom):.4g} {self.unit} line less the profile's "
                   f"{self.headroom:.0%} latency headroom)") if self.headroom else ""
        return f"{names[self.line]} {self.predicted:.4g} {self.unit} is {rel} of {self.limit:.4g} {self.unit}{reserve}"


@dataclass
class CostModel:
    profile: Profile
    efficiency: Efficiency = field(default=None)  # type: ignore[assignment]
    efficiency_source: str = "profile defaults"

    def __post_init__(self) -> None:
        if self.efficiency is None:
            self.efficiency = self.profile.efficiency

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.profile.dtype]

    def with_efficiency(self, eff: Efficiency, source: str) -> CostModel:
        return replace(self, efficiency=eff, efficiency_source=source)

    # ---- memory ------------------------------------------------------------------------------

    def weights_read_bytes(self, arch: Arch, fmt: str = "none") -> float:
        """Bytes of weights a decode step reads: the decoder in `fmt`, the LM head in the dense dtype."""
        return arch.decoder_params * weight_bytes(fmt, self.dtype_bytes) + arch.lm_head_params * self.dtype_bytes

    def memory(self, arch: Arch, fmt: str = "none") -> Memory:
        """Memory of the deployment; the decoder's weights in weight format `fmt` (embeddings, LM
        head and KV cache stay in the profile's dtype)."""
        p, w = self.profile, self.profile.workload
        stored = arch.decoder_params * weight_bytes(fmt, self.dtype_bytes) + arch.embedding_params * (
            1 if arch.tied_embeddings else 2) * self.dtype_bytes
        weights = stored / GIB
        kv = arch.kv_bytes_per_token(self.dtype_bytes) * w.max_context * w.concurrency / GIB
        overhead = p.runtime_overhead_gib * p.device.count
        available = p.device.memory_gib * p.device.count * (1 - p.budget.memory_headroom)
        return Memory(weights, kv, overhead, available)

    # ---- latency -----------------------------------------------------------------------------

    def _overhead_s(self, arch: Arch, prefill: bool) -> float:
        e, n = self.efficiency, self.profile.device.count
        fixed = (e.prefill_overhead_ms if prefill else e.step_overhead_ms) / 1e3
        per_layer = arch.layers * e.layer_overhead_us / 1e6
        allreduce = 2 * arch.layers * e.allreduce_us / 1e6 if n > 1 else 0.0
        return fixed + per_layer + allreduce  # a calibrated intercept may be negative (see planner.calibrate)

    def prefill_flops(self, arch: Arch, tokens: int, batch: int = 1) -> float:
        """Linear layers for every prompt token, causal attention, and the LM head for the last token."""
        attn = sum(4 * q * arch.head_dim * tokens * tokens / 2 for q in arch.q_heads)
        return batch * (2 * arch.decoder_params * tokens + attn + 2 * arch.lm_head_params)

    def prefill_s(self, arch: Arch, tokens: int, batch: int = 1, fmt: str = "none") -> float:
        """`fmt` changes the bytes read, not the FLOPs: the datasheet's peak is the dense dtype's."""
        d, e = self.profile.device, self.efficiency
        compute = self.prefill_flops(arch, tokens, batch) / (d.peak_tflops * 1e12 * e.compute * d.count)
        memory = self.weights_read_bytes(arch, fmt) / (d.bandwidth_gbs * 1e9 * e.bandwidth * d.count)
        return max(compute, memory) + self._overhead_s(arch, prefill=True)

    def decode_step_s(self, arch: Arch, context: int, batch: int = 1, fmt: str = "none") -> float:
        d, e = self.profile.device, self.efficiency
        read = self.weights_read_bytes(arch, fmt) + batch * context * arch.kv_bytes_per_token(self.dtype_bytes)
        memory = read / (d.bandwidth_gbs * 1e9 * e.bandwidth * d.count)
        flops = batch * (2 * arch.params_read_per_token + sum(4 * q * arch.head_dim * context for q in arch.q_heads))
        compute = flops / (d.peak_tflops * 1e12 * e.compute * d.count)
        return max(memory, compute) + self._overhead_s(arch, prefill=False)

    def predict(self, arch: Arch, fmt: str = "none") -> Prediction:
        w = self.profile.workload
        context = w.prompt_tokens + w.output_tokens // 2
        ttft = self.prefill_s(arch, w.prompt_tokens, fmt=fmt)
        tpot = self.decode_step_s(arch, context, fmt=fmt)
        c = w.concurrency
        total = self.prefill_s(arch, w.prompt_tokens, batch=c, fmt=fmt) + (w.output_tokens - 1) * self.decode_step_s(
            arch, context, batch=c, fmt=fmt)
        throughput = c * w.output_tokens / total
        return Prediction(self.memory(arch, fmt), ttft, tpot, throughput, self.efficiency_source)

    def violations(self, pred: Prediction, reserve: bool = True) -> list[Violation]:
        """The budget lines `pred` misses; `reserve` False judges the latency lines themselves, without
        the profile's latency headroom."""
        b = self.profile.budget
        out = []
        if not pred.memory.fits:
            out.append(Violation("memory", pred.memory.total_gib, pred.memory.available_gib, "GiB"))
        h = b.latency_headroom if reserve else 0.0
        keep = 1 - h  # the plan's reserve on the latency lines
        if b.ttft_ms is not None and pred.ttft_s * 1e3 > b.ttft_ms * keep:
            out.append(Violation("ttft", pred.ttft_s * 1e3, b.ttft_ms * keep, "ms", h))
        if b.tpot_ms is not None and pred.tpot_s * 1e3 > b.tpot_ms * keep:
            out.append(Violation("tpot", pred.tpot_s * 1e3, b.tpot_ms * keep, "ms", h))
        if b.min_throughput_tok_s is not None and pred.throughput_tok_s < b.min_throughput_tok_s:
            out.append(Violation("throughput", pred.throughput_tok_s, b.min_throughput_tok_s, "tok/s"))
        return out
