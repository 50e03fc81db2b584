"""The transformers/torch runtime: load an exported directory as any user would."""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .base import Generation, Runtime, TokenTimes, cpu_device, register

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load(path: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """Load an export with stock transformers. Our per-layer format resolves through fitprune's
    registered class when fitprune is installed, else through the modeling file beside the
    weights when `trust_remote_code` is set."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import compressor.model.hf_arch  # noqa: F401  (registers model_type "fitprune")
    except ImportError:
        pass
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=trust_remote_code)
    tok = AutoTokenizer.from_pretrained(str(path))
    return model.eval(), tok


class _ArrivalStreamer:
    """A transformers streamer (`put` / `end`) that notes when each generated token is on the host.
    `generate` first hands it the prompt, then every new token right after it was chosen (as a
    CPU tensor: on CUDA the copy waits for the step), so the arrival times are what a streaming
    client of `generate` sees."""

    def __init__(self) -> None:
        self.prompt_seen = False
        self.arrivals: list[float] = []
        self.tokens: list[int] = []

    def put(self, value) -> None:
        now = time.perf_counter()
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        ids = value.reshape(-1).tolist()
        self.tokens += ids
        self.arrivals += [now] * len(ids)

    def end(self) -> None:
        return None


@register("torch")
class TorchRuntime(Runtime):
    """transformers' `generate` (greedy, KV cache) on torch; CPU unless CUDA is available."""

    def __init__(self, path: str | Path, dtype: str = "float32", threads: int | None = None) -> None:
        super().__init__(path, dtype, threads)
        if dtype not in DTYPES:
            raise ValueError(f"Unsupported dtype '{dtype}' for torch; choose one of {', '.join(DTYPES)}.")
        if threads:
            torch.set_num_threads(threads)
        self.model, self._tokenizer = load(path, DTYPES[dtype])
        self._dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self._dev)

    @property
    def device(self) -> str:
        if self._dev.type == "cuda":
            return f"cuda: {torch.cuda.get_device_name(self._dev)}"
        return cpu_device(torch.get_num_threads())

    def _generation_config(self, max_new_tokens: int, ignore_eos: bool, pad: int, output_logits: bool):
        """Greedy decoding of `max_new_tokens` tokens; `ignore_eos` decodes on past EOS (as vLLM
        does), which does not forbid EOS as min_new_tokens would."""
        gen_cfg = copy.deepcopy(self.model.generation_config)
        if ignore_eos:
            gen_cfg.eos_token_id = []
        gen_cfg.update(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad, temperature=None,
                       top_p=None, top_k=None, return_dict_in_generate=True, output_logits=output_logits)
        return gen_cfg

    def _pad_id(self) -> int:
        pad = self.model.generation_config.pad_token_id
        if pad is None:
            eos = self.model.generation_config.eos_token_id
            pad = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
        return pad

    @torch.no_grad()
    def stream(self, prompt: Sequence[int], max_new_tokens: int) -> TokenTimes:
        """`generate` with KV cache on one prompt, every token timestamped by a streamer."""
        streamer = _ArrivalStreamer()
        gen_cfg = self._generation_config(max_new_tokens, True, self._pad_id(), False)
        start = time.perf_counter()
        ids = torch.tensor([list(prompt)], dtype=torch.long).to(self._dev)
        self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen_cfg,
                            streamer=streamer)
        return TokenTimes(start, tuple(streamer.arrivals), tuple(streamer.tokens))

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, ignore_eos: bool = False,
                 logprobs: int = 0) -> list[Generation]:
        width = max(len(p) for p in prompts)
        pad = self._pad_id()
        # left padding, so that every row's next token follows its own last prompt token
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[i, width - len(p):] = 1
        gen_cfg = self._generation_config(max_new_tokens, ignore_eos, pad, logprobs > 0)
        out = self.model.generate(input_ids=ids.to(self._dev), attention_mask=mask.to(self._dev),
                                  generation_config=gen_cfg)
        new = out.sequences[:, width:].tolist()
        gens = []
        eos_ids = self.model.generation_config.eos_token_id
        eos_set = set(eos_ids if isinstance(eos_ids, list) else [eos_ids] if eos_ids is not None else [])
        for i, row in enumerate(new):
            if not ignore_eos:  # drop the padding after an early EOS
                for j, t in enumerate(row):
                    if t in eos_set:
                        row = row[: j + 1]
                        break
            lps = None
            if logprobs > 0:
                lps = []
                for step in range(len(row)):
                    lp = torch.log_softmax(out.logits[step][i].float(), dim=-1)
                    v, k = lp.topk(logprobs)
                    lps.append(dict(zip(k.tolist(), v.tolist(), strict=True)))
            gens.append(Generation(row, lps))
        return gens

    def close(self) -> None:
        self.model = None
