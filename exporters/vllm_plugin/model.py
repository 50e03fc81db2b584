"""fitprune's per-layer-width Llama for vLLM, built from vLLM's own Llama layers.

Every decoder layer gets a view of the model config in which `num_attention_heads`,
`num_key_value_heads` and `intermediate_size` are that layer's (from `layer_num_attention_heads`,
`layer_num_key_value_heads`, `layer_intermediate_size`); `attention_bias` / `mlp_bias` switch on
the biases of q/k/v/o and gate/up/down as in vLLM's Llama; `qk_norm` adds Qwen3's per-head
RMSNorm on queries and keys. vLLM sizes the KV cache per attention layer, so layers with
different KV head counts need nothing else. Imported lazily by vLLM (see `register`).

Depth: a layer with 0 heads has no attention module at all, so vLLM registers no attention
layer for it and gives it no KV cache; a layer with 0 MLP channels has no MLP. vLLM's layers
pass (pending output, residual) pairs and fuse the residual add into the next norm; a layer
without attention skips that norm and lets its MLP's norm do the add, and when that is layer 0
(no residual yet) the residual starts there. (vLLM's own DeciLM crashes in exactly that case.)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
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
        self.has_attention = self.num_attention_heads > 0
        self.has_mlp = self.intermediate_size > 0

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


class _NoBlock(nn.Module):
    """Stands in for a removed block while vLLM's Llama layer is built (it registers nothing)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()


class FitPruneDecoderLayer(LlamaDecoderLayer):
    def __init__(self, vllm_config: VllmConfig, prefix: str = "", **_: Any) -> None:
        config = vllm_config.model_config.hf_config
        layer = LayerConfig(config, extract_layer_index(prefix))
        attn = QKNormLlamaAttention if getattr(config, "qk_norm", False) else LlamaAttention
        if not layer.has_attention:
            attn = _NoBlock  # no vLLM Attention is created, so no KV cache is allocated
        if not layer.has_mlp:
            layer.intermediate_size = 1  # a throw-away 1-channel MLP, deleted below
        super().__init__(vllm_config=vllm_config, prefix=prefix, config=layer, attn_layer_type=attn)
        self.has_attention, self.has_mlp = layer.has_attention, layer.has_mlp
        if not self.has_attention:
            self.self_attn = self.input_layernorm = None
        if not self.has_mlp:
            self.mlp = self.post_attention_layernorm = None

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        # the stream is hidden_states + residual (residual None: hidden_states is all of it)
        if self.has_attention:
            if residual is None:
                residual = hidden_states
                hidden_states = self.input_layernorm(hidden_states)
            else:
                hidden_states, residual = self.input_layernorm(hidden_states, residual)
            hidden_states = self.self_attn(positions=positions, hidden_states=hidden_states)
        if self.has_mlp:
            if residual is None:
                residual = hidden_states
                hidden_states = self.post_attention_layernorm(hidden_states)
            else:
                hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
            hidden_states = self.mlp(hidden_states)
        if residual is None:  # neither block (the exporter drops such layers): the stream passes
            residual, hidden_states = hidden_states, torch.zeros_like(hidden_states)
        return hidden_states, residual


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
