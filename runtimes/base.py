"""One interface for every serving runtime: load an exported directory, generate greedy token ids,
measure latency and throughput.

A runtime is a subclass of `Runtime` in a module of its own, listed by name in `RUNTIMES` (the
project's one lazy registry, `compressor.registry`), so that `get_runtime("name")` imports it only
when asked for (vLLM or onnxruntime are imported only then). Implementations:

- `torch`       runtimes/torch_runtime.py  (transformers + torch)
- `vllm`        runtimes/vllm_runtime.py   (vLLM offline engine)
- `onnxruntime` runtimes/onnx_runtime.py   (ONNX Runtime with KV cache)

A subclass implements `__init__` (load), `generate` and `device`; `measure` is shared and times
`generate` calls, which is fair across runtimes as long as `generate` does no work beyond decoding
(tokens in, tokens out). A runtime with a better clock (e.g. a streaming API) may override
`time_to_first_token` / `time_per_output_token` / `throughput`.
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class Measurement:
    """Medians over `runs` timed runs after `warmup` untimed ones.

    ttft_s: time to first token, batch 1, a prompt of `prompt_tokens` tokens.
    tpot_s: time per output token after the first, batch 1 (decode step latency).
    throughput_tok_s: output tokens per second with `concurrency` prompts of `prompt_tokens`
    tokens generating `output_tokens` tokens each at the same time.
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

    def as_dict(self) -> dict:
        return asdict(self)


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

    def _timed(self, prompts: list[list[int]], new_tokens: int) -> float:
        t0 = time.perf_counter()
        out = self.generate(prompts, new_tokens, ignore_eos=True)
        dt = time.perf_counter() - t0
        if any(len(g.token_ids) != new_tokens for g in out):
            raise RuntimeError(f"{self.name} did not generate the {new_tokens} tokens asked for.")
        return dt

    def time_to_first_token(self, prompt: list[int], runs: int) -> list[float]:
        return [self._timed([prompt], 1) for _ in range(runs)]

    def time_per_output_token(self, prompt: list[int], output_tokens: int, runs: int) -> list[float]:
        """Per run: (time for `output_tokens` tokens - time for 1 token) / (output_tokens - 1)."""
        out = []
        for _ in range(runs):
            first = self._timed([prompt], 1)
            full = self._timed([prompt], output_tokens)
            out.append(max(full - first, 0.0) / (output_tokens - 1))
        return out

    def throughput(self, prompts: list[list[int]], output_tokens: int, runs: int) -> list[float]:
        return [len(prompts) * output_tokens / self._timed(prompts, output_tokens) for _ in range(runs)]

    def measure(self, prompt_tokens: int = 128, output_tokens: int = 32, concurrency: int = 4, runs: int = 5,
                warmup: int = 1) -> Measurement:
        """TTFT and TPOT at batch 1 and throughput at `concurrency`, medians of `runs` after `warmup`."""
        if output_tokens < 2:
            raise ValueError("output_tokens must be at least 2 to measure time per output token.")
        prompt = benchmark_prompt(self.tokenizer, prompt_tokens)
        batch = [benchmark_prompt(self.tokenizer, prompt_tokens, seed=i) for i in range(concurrency)]
        for _ in range(warmup):
            self._timed([prompt], output_tokens)
            self._timed(batch, output_tokens)
        ttft = statistics.median(self.time_to_first_token(prompt, runs))
        tpot = statistics.median(self.time_per_output_token(prompt, output_tokens, runs))
        tput = statistics.median(self.throughput(batch, output_tokens, runs))
        return Measurement(runtime=self.name, device=self.device, dtype=self.dtype,
                           prompt_tokens=prompt_tokens, output_tokens=output_tokens, concurrency=concurrency,
                           ttft_s=ttft, tpot_s=tpot, throughput_tok_s=tput, runs=runs, warmup=warmup)


def load_runtime(name: str, path: str | Path, dtype: str = "float32", threads: int | None = None) -> Runtime:
    """Load the export at `path` in the runtime called `name`."""
    cls = get_runtime(name)
    cls.check_available()
    return cls(path, dtype=dtype, threads=threads)
