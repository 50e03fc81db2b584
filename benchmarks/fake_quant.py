"""How long one decoder layer of Llama-3.1-8B's shape (random bfloat16 weights) takes on a batch
of 4 x 256 tokens: as it is, in W8A8 as compressed-tensors simulates it with the weights rounded on
every forward pass (the library's own wrapper), and as `prune.planned.fake_quantized` runs it (the
weights rounded once). Medians of 3 runs each, and the largest output difference of the two W8A8
ways (0: the same outputs).

    PYTHONPATH=. python benchmarks/fake_quant.py
"""

from __future__ import annotations

import copy
import statistics
import time

import torch


def main() -> None:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from compressor.prune.planned import fake_quantized
    from exporters.quantize import apply_scheme

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                      num_hidden_layers=1)
    cfg._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(cfg, 0).to(torch.bfloat16).eval()
    x = torch.randn(4, 256, 4096, dtype=torch.bfloat16)
    pos = torch.arange(256)[None].expand(4, -1)
    pe = tuple(t.to(torch.bfloat16) for t in LlamaRotaryEmbedding(cfg)(x, pos))
    per_call = copy.deepcopy(layer)
    apply_scheme(per_call, "w8a8-int8")
    once = fake_quantized(layer, "w8a8-int8")

    @torch.no_grad()
    def run(m) -> torch.Tensor:
        y = m(x, position_embeddings=pe, position_ids=pos)
        return y[0] if isinstance(y, tuple) else y

    def seconds(m) -> float:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            run(m)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    print(f"bf16 {seconds(layer):.2f} s; w8a8 rounded per call {seconds(per_call):.2f} s; "
          f"w8a8 rounded once {seconds(once):.2f} s; max |difference| of the two w8a8 outputs "
          f"{float((run(per_call).float() - run(once).float()).abs().max())}")


if __name__ == "__main__":
    main()
