"""One interface for every serving runtime: load an exported directory, generate greedy token ids,
measure latency and throughput.

A runtime is a subclass of `Runtime` in a module of its own, listed by name in `RUNTIMES` (the
project's one lazy registry, `compressor.registry`), so that `get_runtime("name")` imports it only
when asked for (vLLM or onnxruntime are imported only then). Implementations:

- `torch`       runtimes/torch_runtime.py  (transformers + torch)
- `vllm`        runtimes/vllm_runtime.py   (vLLM offline engine)
- `onnxruntime` runtimes/onnx_runtime.py   (ONNX Runtime with KV cache)

A subclass implements `__init__` (load), `generate`, `stream` and `device`; `measure` is shared.
Latency comes from `stream`: one greedy request whose every output token is timestamped when it
reaches the caller, so TTFT and TPOT of a run are two figures of the same request (not the
difference of two separate runs, whose noise can make it 0 or negative). Throughput times whole
batched `generate` calls, fair across runtimes as long as `generate` does no work beyond decoding.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

from compressor.registry import Registry

RUNTIMES = Registry("runtime", {
    "torch": "runtimes.torch_runtime:TorchRuntime",
    "vllm": "runtimes.vllm_runtime:VllmRuntime",
    "onnxruntime": "runtimes.onnx_runtime:OnnxRuntime",
})


TIMING = ("TTFT and TPOT from per-token arrival times of one streamed batch-1 generation per run; "
          "throughput = output tokens / wall time of one batched call per run")


class RuntimeUnavailable(RuntimeError):
    """The runtime (or its package) cannot be used here; the message is one sentence for the user."""


def register(name: str) -> Callable[[type[Runtime]], type[Runtime]]:
    """Name a runtime class (its entry in `RUNTIMES` points at it)."""
    def deco(cls: type[Runtime]) -> type[Runtime]:
        cls.name = name
        return cls

    return deco


def get_runtime(name: str) -> type[Runtime]:
    """The runtime class registered as `name`, importing its module on first use."""
    if name not in RUNTIMES:
        raise RuntimeUnavailable(f"Unknown runtime '{name}'; choose one of: {', '.join(RUNTIMES.names())}.")
    try:
        return RUNTIMES.get(name)
    except ImportError as exc:
        raise RuntimeUnavailable(f"The runtime '{name}' cannot be imported here: {exc}.") from exc


def available_runtimes() -> list[str]:
    """Names of the runtimes whose implementation and package import here."""
    names = []
    for name in RUNTIMES.names():
        try:
            get_runtime(name).check_available()
        except RuntimeUnavailable:
            continue
        names.append(name)
    return names


@dataclass(frozen=True)
class Generation:
    """Greedy output for one prompt: the new token ids (prompt excluded) and, when asked for,
    for every generated position the top-k log-probabilities {token id: logprob} of the model's
    raw next-token distribution (before any sampling processing)."""

    token_ids: list[int]
    logprobs: list[dict[int, float]] | None = None


class MeasurementError(RuntimeError):
    """A timing that cannot be a latency (non-finite, not positive, or a runtime that did not stream
    the tokens it was asked for). Never replaced by 0: a 0 ms TPOT would pass any budget."""


@dataclass(frozen=True)
class TokenTimes:
    """One streamed request at batch 1: `start` is when it was handed to the runtime and
    `arrivals[i]` when output token i (`token_ids[i]`) reached the caller (`time.perf_counter()` seconds).

    TTFT and TPOT come from the same request, the way vLLM's serving benchmark computes them
    from a stream (vllm/benchmarks/serve.py: TPOT = (latency - TTFT) / (output tokens - 1))."""

    start: float
    arrivals: tuple[float, ...]
    token_ids: tuple[int, ...] = ()

    @property
    def ttft_s(self) -> float:
        return self.arrivals[0] - self.start

    @property
    def tpot_s(self) -> float:
        return (self.arrivals[-1] - self.arrivals[0]) / (len(self.arrivals) - 1)


def _checked(what: str, runtime: str, values: Sequence[float]) -> list[float]:
    """`values` if every one is a finite positive number of seconds (or tokens/s), else MeasurementError."""
    bad = [v for v in values if not math.isfinite(v) or v <= 0]
    if bad:
        raise MeasurementError(f"{runtime} gave a {what} of {bad[0]!r}, which cannot be a real timing; "
                               "the measurement is refused rather than reported.")
    return list(values)


@dataclass(frozen=True)
class Measurement:
    """Medians (and per-run values) over `runs` timed runs after `warmup` untimed ones.

    ttft_s: time to first token, batch 1, a prompt of `prompt_tokens` tokens.
    tpot_s: time per output token after the first, batch 1 (decode step latency).
    Both come from one streamed generation per run: TTFT = first token's arrival - request start,
    TPOT = (last arrival - first arrival) / (output_tokens - 1) of that same request.
    throughput_tok_s: output tokens per second with `concurrency` prompts of `prompt_tokens`
    tokens generating `output_tokens` tokens each at the same time (tokens / wall time of the
    batched call).
    *_runs: the per-run values the medians are taken over (their spread is the noise).
    """

    runtime: str
    device: str
    dtype: str
    prompt_tokens: int
    output_tokens: int
    concurrency: int
    ttft_s: float
    tpot_s: float
    throughput_tok_s: float
    runs: int
    warmup: int
    extra: dict[str, float | str] = field(default_factory=dict)
    ttft_runs_s: tuple[float, ...] = ()
    tpot_runs_s: tuple[float, ...] = ()
    throughput_runs_tok_s: tuple[float, ...] = ()
    timing: str = TIMING

    def as_dict(self) -> dict:
        """The fields, plus each figure's spread as flat keys (`ttft_min_s`, `ttft_max_s`, ...)."""
        d = asdict(self)
        for key, runs in (("ttft", self.ttft_runs_s), ("tpot", self.tpot_runs_s),
                          ("throughput", self.throughput_runs_tok_s)):
            unit = "tok_s" if key == "throughput" else "s"
            d[f"{key}_runs_{unit}"] = list(runs)
            if runs:
                d[f"{key}_min_{unit}"], d[f"{key}_max_{unit}"] = min(runs), max(runs)
        return d


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_device(threads: int | None = None) -> str:
    n = threads or os.cpu_count() or 1
    return f"cpu: {cpu_name()} ({n} thread{'s' if n != 1 else ''})"


_PROMPT_TEXT = (
    "The history of computing is a story of making machines that follow instructions faster and "
    "more cheaply. Early mechanical calculators added and multiplied numbers; later, electronic "
    "computers stored programs in memory and ran them at millions of steps per second. Today a "
    "language model predicts the next word of a text, one token at a time, and the cost of every "
    "step depends on how many weights must be read from memory and multiplied. "
)


def benchmark_prompt(tokenizer, length: int, seed: int = 0) -> list[int]:
    """`length` token ids of ordinary English text (rotated by `seed` so prompts in a batch differ)."""
    ids = tokenizer(_PROMPT_TEXT, add_special_tokens=False)["input_ids"]
    ids = ids[seed % len(ids):] + ids[: seed % len(ids)]
    while len(ids) < length:
        ids = ids + ids
    return ids[:length]


class Runtime(ABC):
    """A loaded model in one runtime. Construct with the exported directory; use as a context
    manager (or call `close`) to free the runtime's memory and processes."""

    name: ClassVar[str] = "?"

    def __init__(self, path: str | Path, dtype: str = "float32", threads: int | None = None) -> None:
        """Load the export at `path` with weights/compute in `dtype` ("float32", "bfloat16",
        "float16") using `threads` CPU threads (None: the runtime's default)."""
        self.path = Path(path)
        self.dtype = dtype
        self.threads = threads
        self._tokenizer = None

    @classmethod
    def check_available(cls) -> None:
        """Raise RuntimeUnavailable when this runtime's package is missing or unusable here."""
        return None

    @property
    @abstractmethod
    def device(self) -> str:
        """Human-readable device the model runs on, e.g. 'cpu: Intel Xeon (2 threads)'."""

    @abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, ignore_eos: bool = False,
                 logprobs: int = 0) -> list[Generation]:
        """Greedy decoding for every prompt (token ids, no padding) at once. Stops at EOS unless
        `ignore_eos`, else after exactly `max_new_tokens` tokens. With `logprobs` > 0 every
        Generation carries the top-`logprobs` log-probabilities of each generated position."""

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.path))
        return self._tokenizer

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def close(self) -> None:
        """Free memory and stop helper processes (idempotent)."""
        return None

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- measurement -------------------------------------------------------------------------

    @abstractmethod
    def stream(self, prompt: Sequence[int], max_new_tokens: int) -> TokenTimes:
        """Greedy decoding of one prompt for exactly `max_new_tokens` tokens (EOS ignored), noting
        when the request started and when each output token reached the caller. A token counts as
        arrived when its id is on the host (a device runtime synchronises), as a streaming client
        would see it."""

    def timed_request(self, prompt: Sequence[int], output_tokens: int) -> tuple[float, float]:
        """(TTFT, TPOT) of one streamed request; MeasurementError if it did not stream
        `output_tokens` tokens or a figure is not a finite positive time."""
        t = self.stream(prompt, output_tokens)
        if len(t.arrivals) != output_tokens:
            raise MeasurementError(f"{self.name} streamed {len(t.arrivals)} tokens where {output_tokens} "
                                   "were asked for.")
        ttft, tpot = t.ttft_s, t.tpot_s
        _checked("time to first token", self.name, [ttft])
        _checked("time per output token", self.name, [tpot])
        return ttft, tpot

    def _timed(self, prompts: list[list[int]], new_tokens: int) -> float:
        t0 = time.perf_counter()
        out = self.generate(prompts, new_tokens, ignore_eos=True)
        dt = time.perf_counter() - t0
        if any(len(g.token_ids) != new_tokens for g in out):
            raise MeasurementError(f"{self.name} did not generate the {new_tokens} tokens asked for.")
        return dt

    def latency(self, prompt: list[int], output_tokens: int, runs: int) -> tuple[list[float], list[float]]:
        """Per-run TTFT and TPOT at batch 1, each pair from one streamed request."""
        pairs = [self.timed_request(prompt, output_tokens) for _ in range(runs)]
        return [a for a, _ in pairs], [b for _, b in pairs]

    def throughput(self, prompts: list[list[int]], output_tokens: int, runs: int) -> list[float]:
        """Per run: output tokens of all `prompts` generated at once / wall time of that call."""
        return _checked("throughput", self.name,
                        [len(prompts) * output_tokens / self._timed(prompts, output_tokens) for _ in range(runs)])

    def measure(self, prompt_tokens: int = 128, output_tokens: int = 32, concurrency: int = 4, runs: int = 5,
                warmup: int = 1) -> Measurement:
        """TTFT and TPOT at batch 1 and throughput at `concurrency`: medians and per-run values of
        `runs` timed runs after `warmup` untimed ones."""
        if output_tokens < 2:
            raise ValueError("output_tokens must be at least 2 to measure time per output token.")
        if runs < 1:
            raise ValueError("runs must be at least 1.")
        prompt = benchmark_prompt(self.tokenizer, prompt_tokens)
        batch = [benchmark_prompt(self.tokenizer, prompt_tokens, seed=i) for i in range(concurrency)]
        for _ in range(warmup):
            self.stream(prompt, output_tokens)
            self._timed(batch, output_tokens)
        ttfts, tpots = self.latency(prompt, output_tokens, runs)
        tputs = self.throughput(batch, output_tokens, runs)
        return Measurement(runtime=self.name, device=self.device, dtype=self.dtype,
                           prompt_tokens=prompt_tokens, output_tokens=output_tokens, concurrency=concurrency,
                           ttft_s=statistics.median(ttfts), tpot_s=statistics.median(tpots),
                           throughput_tok_s=statistics.median(tputs), runs=runs, warmup=warmup,
                           ttft_runs_s=tuple(ttfts), tpot_runs_s=tuple(tpots), throughput_runs_tok_s=tuple(tputs))


def load_runtime(name: str, path: str | Path, dtype: str = "float32", threads: int | None = None) -> Runtime:
    """Load the export at `path` in the runtime called `name`."""
    cls = get_runtime(name)
    cls.check_available()
    return cls(path, dtype=dtype, threads=threads)
