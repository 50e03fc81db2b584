"""fitprune's per-layer-width Llama for vLLM, built from vLLM's own Llama layers.

Every decoder layer gets a view of the model config in which `num_attention_heads`,
`num_key_value_heads` and `intermediate_size` are that layer's (from `layer_num_attention_heads`,
`layer_num_key_value_heads`, `layer_intermediate_size`); `attention_bias` / `mlp_bias` switch on
the biases of q/k/v/o and gate/up/down as in vLLM's Llama; `qk_norm` adds Qwen3's per-head
RMSNorm on queries and keys. vLLM sizes the KV cache per attention layer, so layers with
different KV head counts need nothing else. Imported lazily by vLLM (see `register`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from vllm.config import VllmConfig
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.utils import extract_layer_index

from . import expected_keys


class LayerConfig:
    """The model config as one layer sees it: that layer's widths, everything else delegated."""

    def __init__(self, config: Any, layer: int) -> None:
        self._config = config
        self.num_attention_heads = config.layer_num_attention_heads[layer]
        self.num_key_value_heads = config.layer_num_key_value_heads[layer]
        self.intermediate_size = config.layer_intermediate_size[layer]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._config, name)


class QKNormLlamaAttention(LlamaAttention):
    """vLLM's Llama attention with Qwen3's per-head RMSNorm on queries and keys before RoPE."""

    def __init__(self, config: Any, **kwargs: Any) -> None:
        super().__init__(config=config, **kwargs)
        self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.q_norm(q.view(*q.shape[:-1], -1, self.head_dim)).view(q.shape)
        k = self.k_norm(k.view(*k.shape[:-1], -1, self.head_dim)).view(k.shape)
        q, k = self.rotary_emb(positions, q, k)
        out, _ = self.o_proj(self.attn(q, k, v))
        return out


class FitPruneDecoderLayer(LlamaDecoderLayer):
    def __init__(self, vllm_config: VllmConfig, prefix: str = "", **_: Any) -> None:
        config = vllm_config.model_config.hf_config
        layer = LayerConfig(config, extract_layer_index(prefix))
        attn = QKNormLlamaAttention if getattr(config, "qk_norm", False) else LlamaAttention
        super().__init__(vllm_config=vllm_config, prefix=prefix, config=layer, attn_layer_type=attn)


class FitPruneForCausalLM(LlamaForCausalLM):
    """`FitPruneForCausalLM` checkpoints (fitprune's per-layer format) in unmodified vLLM."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", **_: Any) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=FitPruneDecoderLayer)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        seen: set[str] = set()

        def tracked():
            for name, tensor in weights:
                seen.add(name)
                yield name, tensor

        loaded = super().load_weights(tracked())
        # vLLM fuses q/k/v and gate/up: one shard present marks the fused tensor loaded, so a
        # missing bias shard would pass its own check and be read as uninitialized memory.
        missing = sorted(expected_keys(self.config.to_dict()) - seen)
        if missing:
            raise ValueError(f"The checkpoint lacks tensors its config implies: {', '.join(missing[:5])}.")
        return loaded
