"""The vLLM runtime: an export served by vLLM's offline engine (`vllm.LLM`), as `vllm serve` would.

fitprune's per-layer format resolves through the installed `vllm.general_plugins` entry point
(exporters.vllm_plugin), which vLLM loads in each of its processes. vLLM starts an engine process:
a script that creates a `VllmRuntime` needs an `if __name__ == "__main__":` guard.

On CPU, `VLLM_CPU_KVCACHE_SPACE` (GiB of KV cache) is `MEASURE_KVCACHE_GIB` in the engines fitprune
starts to measure, unless set (a server's: `exporters.container.SERVE_KVCACHE_GIB`).

`shutdown_llm` stops a `vllm.LLM` in vLLM's own order (what `VllmRuntime.close` does).

Latency (`VllmRuntime.stream`) is timed the way vLLM's serving benchmark times a streamed request
(vllm/benchmarks/lib/endpoint_request_func.py: a clock read when each chunk arrives), without the
HTTP server: the request goes into the offline engine with `output_kind=DELTA` and the engine is
stepped by hand (what `LLM.generate` does inside), so every `step()` hands back the tokens that the
engine core has just produced and each is stamped when it reaches this process.
"""

from __future__ import annotations

import gc
import itertools
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from compressor.output import quietly, run_log

from .base import Generation, Runtime, RuntimeUnavailable, TokenTimes, cpu_device, register

log = logging.getLogger(__name__)

MEASURE_KVCACHE_GIB = 1  # one request at a time, at most 1,024 tokens

# How long the EngineCore process may take to stop (it stops its workers first) before it is
# killed. vLLM's default, 5 s, is shorter than a CPU engine takes on 2 cores (about 6 s): the
# EngineCore is then SIGKILLed during its teardown and leaves its shared-memory queue behind.
ENGINE_SHUTDOWN_S = 60.0


def shutdown_llm(llm, timeout: float = ENGINE_SHUTDOWN_S) -> None:
    """Stop a `vllm.LLM` in the order vLLM stops its own engines: the renderer's thread pools, the
    engine core (SIGTERM to the EngineCore process, which stops its workers; SIGKILL only after
    `timeout` s), the client's output thread (told to stop by the engine core's shutdown, but not
    joined there: joined here, so that it is not still decoding tensors when the interpreter
    exits), then the distributed state of this process. Each step is tried even if an earlier
    one failed (failures are logged, never raised)."""
    engine = getattr(llm, "llm_engine", None)
    if engine is None:
        return
    client = getattr(engine, "engine_core", None)

    def stop_renderer():
        renderer = getattr(engine, "renderer", None)
        if renderer is not None:
            renderer.shutdown()

    def stop_engine_core():
        if client is not None:
            client.shutdown(timeout=timeout)

    def join_output_thread():
        t = getattr(client, "output_queue_thread", None)
        if isinstance(t, threading.Thread) and t is not threading.current_thread():
            t.join(timeout=10)
            if t.is_alive():
                log.debug("vLLM's output thread did not stop in 10 s")

    def cleanup_distributed():
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()

    for step in (stop_renderer, stop_engine_core, join_output_thread, cleanup_distributed):
        try:
            step()
        except Exception as exc:  # noqa: BLE001  (already stopped, or a step this vLLM lacks)
            log.debug("vLLM shutdown step %s failed: %r", step.__name__, exc)


def ci_env_note() -> str:
    """What a CPU engine's device string adds when vLLM's CI switch is set (VLLM_CPU_CI_ENV=1: dynamo
    traces the model but inductor does not compile it, and the warm-up is skipped): its timings are not
    those of vLLM's default engine, so they say so and are cached apart. Empty when it is not set."""
    if os.environ.get("VLLM_CPU_CI_ENV", "0").strip() in ("", "0"):
        return ""
    return " (VLLM_CPU_CI_ENV: not compiled by inductor)"


def _check_cpu_head_size(config: dict) -> None:
    """vLLM's CPU attention kernels exist for a fixed set of head sizes, and vLLM finds out only
    in its worker at the first forward pass (a C++ error and a dead engine). Ask its CPU backend
    first and refuse in one sentence."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    try:
        head_dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return  # vLLM's own config validation says what is missing
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    sizes = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim not in sizes:
        raise RuntimeUnavailable(f"vLLM's CPU attention has no kernel for head size {head_dim} (it supports "
                                 f"{', '.join(map(str, sizes))}).")


@register("vllm")
class VllmRuntime(Runtime):
    """vLLM offline engine, greedy (temperature 0), prefix caching off so that repeated timing
    runs do not skip the prefill."""

    def __init__(self, path: str | Path, dtype: str = "float32", threads: int | None = None,
                 max_model_len: int = 1024, max_num_seqs: int = 16) -> None:
        super().__init__(path, dtype, threads)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(MEASURE_KVCACHE_GIB))
        # vLLM reads its CPU thread binding from the environment when the engine starts; it is set for
        # that start only, so that it does not leak into later engines of this process (a TP=2 engine
        # refuses a one-range binding)
        self.bind = (f"0-{threads - 1}" if threads > 1 else "0") if threads else \
            os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto")
        config = json.loads((self.path / "config.json").read_text())
        if config.get("model_type") == "fitprune":
            from importlib.metadata import entry_points

            if not any(ep.name == "fitprune" for ep in entry_points(group="vllm.general_plugins")):
                raise RuntimeUnavailable("fitprune's vLLM plugin is not installed (pip install -e . next to "
                                         "vLLM) so vLLM cannot load the per-layer format.")
        from exporters.vllm_plugin import check_checkpoint

        check_checkpoint(self.path)
        quietly(run_log("vllm.log"), lambda: _check_cpu_head_size(config))  # its vLLM import prints
        max_model_len = min(max_model_len, int(config.get("max_position_embeddings") or max_model_len))

        previous = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
        if threads:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = self.bind
        def start():
            from vllm import LLM  # its import prints too ("Triton is installed, but ...")

            return LLM(model=str(self.path), dtype=dtype, max_model_len=max_model_len, seed=0,
                       max_num_seqs=max_num_seqs, enable_prefix_caching=False, trust_remote_code=False)

        try:  # in a quiet run, the engine's start-up output (and its processes' for life) goes to the run's log
            self.llm = quietly(run_log("vllm.log"), start)
        finally:
            if previous is None:
                os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
            else:
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = previous
        self._stream_ids = itertools.count()

    @classmethod
    def check_available(cls) -> None:
        try:
            import vllm  # noqa: F401
        except ImportError as exc:
            raise RuntimeUnavailable(f"vLLM is not installed here ({exc}).") from exc

    @property
    def device(self) -> str:
        import torch

        if torch.cuda.is_available():
            return f"cuda: {torch.cuda.get_device_name()}"
        return cpu_device(self.threads) + ("" if self.bind == "auto" else f" bound {self.bind}") + ci_env_note()

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, ignore_eos: bool = False,
                 logprobs: int = 0) -> list[Generation]:
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, ignore_eos=ignore_eos,
                                logprobs=logprobs or None, detokenize=False)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                                 use_tqdm=False)
        gens = []
        for o in outs:
            c = o.outputs[0]
            lps = None
            if logprobs:
                lps = [{t: lp.logprob for t, lp in step.items()} for step in c.logprobs]
            gens.append(Generation(list(c.token_ids), lps))
        return gens

    def stream(self, prompt: Sequence[int], max_new_tokens: int) -> TokenTimes:
        """One greedy request, streamed out of the offline engine token by token (DELTA outputs),
        each token stamped when `step()` returns it to this process."""
        from vllm import SamplingParams, TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        engine = self.llm.llm_engine
        if engine.has_unfinished_requests():
            raise RuntimeError("the vLLM engine is busy with other requests; a timed request must run alone")
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, ignore_eos=True, detokenize=False,
                                output_kind=RequestOutputKind.DELTA)
        start = time.perf_counter()
        prompt_in = TokensPrompt(prompt_token_ids=list(prompt))
        # rendered as `LLM.generate` renders a prompt (its own `_add_request` would force FINAL_ONLY);
        # a vLLM without that helper takes the raw prompt (deprecated there, same request)
        render = getattr(self.llm, "_preprocess_cmpl_one", None)
        request = render(prompt_in) if render is not None else prompt_in
        req_id = engine.add_request(f"fitprune-stream-{next(self._stream_ids)}", request, params)
        arrivals: list[float] = []
        tokens: list[int] = []
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    now = time.perf_counter()
                    for c in out.outputs:
                        tokens += c.token_ids
                        arrivals += [now] * len(c.token_ids)
        except BaseException:
            # leave the engine idle for the next request (an interrupt, or an error of this one)
            try:
                engine.abort_request([req_id], internal=True)
            except Exception as exc:  # noqa: BLE001  (the engine may be dead already)
                log.debug("aborting the timed request failed: %r", exc)
            raise
        return TokenTimes(start, tuple(arrivals), tuple(tokens))

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        shutdown_llm(llm)
        del llm
        gc.collect()
