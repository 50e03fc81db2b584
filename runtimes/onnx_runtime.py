"""The ONNX Runtime runtime: an export of `exporters/onnx.py` (model.onnx + fitprune_onnx.json)
on the CPU execution provider, with our own small greedy loop over the KV cache.

Batches are left-padded: every row's next token then sits in the last column, the attention mask
marks padding with 0 and position ids count real tokens only, so a padded row computes what it
would alone. The cache tensors returned by one step (`present.*`) are fed back as the next step's
`past_key_values.*`; each layer has its own KV head count, and a layer without attention (0 KV
heads, depth pruning) has no cache tensors at all.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .base import Generation, Runtime, RuntimeUnavailable, TokenTimes, cpu_device, register

MANIFEST_FILE = "fitprune_onnx.json"  # the exporter writes it; runtimes do not import exporters
_NP_DTYPES = {"float32": np.float32, "float16": np.float16}


@register("onnxruntime")
class OnnxRuntime(Runtime):
    """ONNX Runtime (CPUExecutionProvider) on a fitprune ONNX export."""

    def __init__(self, path: str | Path, dtype: str | None = None, threads: int | None = None) -> None:
        """`dtype` is the export's own (an ONNX file cannot change it at load): None takes it
        from the manifest, any other value must match it."""
        import onnxruntime as ort

        path = Path(path)
        manifest_path = path / MANIFEST_FILE
        if not manifest_path.is_file():
            raise ValueError(f"{path} is not a fitprune ONNX export (no {MANIFEST_FILE}); "
                             "write one with `compress export-onnx`.")
        self.manifest = json.loads(manifest_path.read_text())
        exported = self.manifest["dtype"]
        if dtype not in (None, exported):
            raise ValueError(f"This ONNX export is {exported}; ONNX Runtime cannot run it as {dtype} "
                             f"(export again with --dtype {dtype}).")
        super().__init__(path, exported, threads)
        self.np_dtype = _NP_DTYPES[exported]
        self.num_layers: int = self.manifest["num_layers"]
        self.kv_heads: list[int] = self.manifest["num_key_value_heads"]
        self.head_dim: int = self.manifest["head_dim"]
        self.past_names: list[str] = self.manifest["inputs"]["past"]["names"]
        self.present_names: list[str] = self.manifest["outputs"]["present"]["names"]
        eos = self.manifest.get("eos_token_id")
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        pad = self.manifest.get("pad_token_id")
        self.pad_id = pad if pad is not None else (min(self.eos_ids) if self.eos_ids else 0)

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.inter_op_num_threads = 1
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path / self.manifest["model_file"]), sess_options=opts,
                                            providers=["CPUExecutionProvider"])
        self._threads = threads

    @classmethod
    def check_available(cls) -> None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            raise RuntimeUnavailable("onnxruntime is not installed (pip install 'fitprune[onnx]').") from exc

    @property
    def device(self) -> str:
        return f"{cpu_device(self._threads)}, onnxruntime CPUExecutionProvider"

    # ---- one forward step ----------------------------------------------------------------------

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        cache = []
        for kv in self.kv_heads:
            if kv:  # the export has cache tensors for the attention layers only (in layer order)
                cache += [np.zeros((batch, kv, 0, self.head_dim), dtype=self.np_dtype) for _ in range(2)]
        return cache

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
             past: list[np.ndarray], logits_index: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """One forward pass: logits [batch, len(logits_index), vocab] (float32) and the new cache."""
        feed = {
            "input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
            "attention_mask": np.ascontiguousarray(attention_mask, dtype=np.int64),
            "position_ids": np.ascontiguousarray(position_ids, dtype=np.int64),
            "logits_index": np.ascontiguousarray(logits_index, dtype=np.int64),
        }
        feed.update(zip(self.past_names, past, strict=True))
        logits, *present = self.session.run(["logits", *self.present_names], feed)
        return logits.astype(np.float32, copy=False), present

    def logits(self, input_ids: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
        """Logits of every position, full recompute (no cache), for rows of equal length."""
        ids = np.asarray(input_ids, dtype=np.int64)
        batch, seq = ids.shape
        pos = np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq))
        logits, _ = self.step(ids, np.ones_like(ids), pos, self.empty_cache(batch), np.arange(seq))
        return logits

    # ---- generation ----------------------------------------------------------------------------

    def stream(self, prompt: Sequence[int], max_new_tokens: int) -> TokenTimes:
        """The greedy loop on one prompt, each token timestamped as soon as its argmax is known."""
        arrivals: list[float] = []
        start = time.perf_counter()
        (gen,) = self._greedy([prompt], max_new_tokens, ignore_eos=True, logprobs=0, arrivals=arrivals)
        return TokenTimes(start, tuple(arrivals), tuple(gen.token_ids))

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, ignore_eos: bool = False,
                 logprobs: int = 0) -> list[Generation]:
        return self._greedy(prompts, max_new_tokens, ignore_eos=ignore_eos, logprobs=logprobs)

    def _greedy(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, ignore_eos: bool, logprobs: int,
                arrivals: list[float] | None = None) -> list[Generation]:
        """Left-padded greedy decoding over the KV cache; with `arrivals`, the time each step's
        tokens are chosen is appended to it."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("Every prompt needs at least one token.")
        batch, width = len(prompts), max(len(p) for p in prompts)
        ids = np.full((batch, width), self.pad_id, dtype=np.int64)
        mask = np.zeros((batch, width), dtype=np.int64)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = p
            mask[i, width - len(p):] = 1
        pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        last = np.array([width - 1], dtype=np.int64)
        logits, past = self.step(ids, mask, pos, self.empty_cache(batch), last)

        tokens: list[list[int]] = [[] for _ in range(batch)]
        lps: list[list[dict[int, float]]] = [[] for _ in range(batch)]
        done = np.zeros(batch, dtype=bool)
        next_pos = pos[:, -1:] + 1
        zero = np.zeros(1, dtype=np.int64)
        for step in range(max_new_tokens):
            scores = logits[:, -1, :]
            nxt = scores.argmax(axis=-1)
            if arrivals is not None:
                arrivals.append(time.perf_counter())
            for i in range(batch):
                if done[i]:
                    continue
                tokens[i].append(int(nxt[i]))
                if logprobs > 0:
                    lps[i].append(_top_logprobs(scores[i], logprobs))
                if not ignore_eos and int(nxt[i]) in self.eos_ids:
                    done[i] = True
            if done.all() or step == max_new_tokens - 1:
                break
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
            logits, past = self.step(nxt[:, None], mask, next_pos, past, zero)
            next_pos = next_pos + 1
        return [Generation(t, lp if logprobs > 0 else None) for t, lp in zip(tokens, lps, strict=True)]

    def close(self) -> None:
        self.session = None


def _top_logprobs(scores: np.ndarray, k: int) -> dict[int, float]:
    s = scores.astype(np.float64)
    logz = s.max() + np.log(np.exp(s - s.max()).sum())
    top = np.argpartition(-s, k - 1)[:k]
    top = top[np.argsort(-s[top])]
    return {int(t): float(s[t] - logz) for t in top}
