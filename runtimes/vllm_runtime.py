"""The vLLM runtime: an export served by vLLM's offline engine (`vllm.LLM`), as `vllm serve` would.

fitprune's per-layer format resolves through the installed `vllm.general_plugins` entry point
(exporters.vllm_plugin), which vLLM loads in each of its processes. vLLM starts an engine process:
a script that creates a `VllmRuntime` needs an `if __name__ == "__main__":` guard.

On CPU, `VLLM_CPU_KVCACHE_SPACE` (GiB of KV cache) defaults to 1 here unless set.
"""

from __future__ import annotations

import gc
import json
import os
from collections.abc import Sequence
from pathlib import Path

from .base import Generation, Runtime, RuntimeUnavailable, cpu_device, register


@register("vllm")
class VllmRuntime(Runtime):
    """vLLM offline engine, greedy (temperature 0), prefix caching off so that repeated timing
    runs do not skip the prefill."""

    def __init__(self, path: str | Path, dtype: str = "float32", threads: int | None = None,
                 max_model_len: int = 1024, max_num_seqs: int = 16) -> None:
        super().__init__(path, dtype, threads)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        if threads:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{threads - 1}" if threads > 1 else "0"
        config = json.loads((self.path / "config.json").read_text())
        if config.get("model_type") == "fitprune":
            from importlib.metadata import entry_points

            if not any(ep.name == "fitprune" for ep in entry_points(group="vllm.general_plugins")):
                raise RuntimeUnavailable("fitprune's vLLM plugin is not installed (pip install -e . next to "
                                         "vLLM) so vLLM cannot load the per-layer format.")
        from exporters.vllm_plugin import check_checkpoint

        check_checkpoint(self.path)
        from vllm import LLM

        max_model_len = min(max_model_len, int(config.get("max_position_embeddings") or max_model_len))

        self.llm = LLM(model=str(self.path), dtype=dtype, max_model_len=max_model_len, seed=0,
                       max_num_seqs=max_num_seqs, enable_prefix_caching=False, trust_remote_code=False)

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
        bind = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto")
        return cpu_device(self.threads) + ("" if bind == "auto" else f" bound {bind}")

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

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        self.llm = None
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001  (already stopped)
            pass
        del llm
        gc.collect()
