"""fitprune's per-layer-width Llama for vLLM, built from vLLM's own Llama layers.

Every decoder layer gets a view of the model config in which `num_attention_heads`,
`num_key_value_heads` and `intermediate_size` are that layer's (from `layer_num_attention_heads`,
`layer_num_key_value_heads`, `layer_intermediate_size`); `attention_bias` / `mlp_bias` switch on
the biases of q/k/v/o and gate/up/down as in vLLM's Llama; `qk_norm` adds Qwen3's per-head
RMSNorm on queries and keys. vLLM sizes the KV cache per attention layer, so layers with
different KV head counts need nothing else. Imported lazily by vLLM (see `register`).

Quantized exports (compressed-tensors, `compress --quantize`): every Linear is built with vLLM's
`quant_config` and the prefix vLLM's Llama gives it, and weights load through vLLM's Llama
`load_weights` (q/k/v and gate/up stacked into qkv_proj and gate_up_proj, each scale and packed
weight through its parameter's own loader), so the per-layer widths quantize as a uniform model does.

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
from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP
from vllm.model_executor.models.utils import extract_layer_index

from . import expected_keys, stored_as


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


class FitPruneDecoderLayer(LlamaDecoderLayer):
    """vLLM's Llama decoder layer with this layer's widths, and only the blocks it has.

    Built as `LlamaDecoderLayer.__init__` (vllm/model_executor/models/llama.py) builds its blocks:
    the same classes, the same `prefix` names (`model.layers.N.self_attn.qkv_proj`, `.mlp.down_proj`,
    ...) and vLLM's `quant_config`, so a compressed-tensors export quantizes every per-layer width as
    vLLM's own Llama quantizes a uniform one (its `targets` / `ignore` match those names) and loads
    its scales and packed weights through each parameter's own weight loader. Not through
    `super().__init__`: that would build an MLP (and an attention) for a layer without one, and a
    placeholder width cannot satisfy every quantized kernel (vLLM CPU's int4 kernel takes only
    output widths that are multiples of 32).
    """

    def __init__(self, vllm_config: VllmConfig, prefix: str = "", **_: Any) -> None:
        nn.Module.__init__(self)
        config = vllm_config.model_config.hf_config
        layer = LayerConfig(config, extract_layer_index(prefix))
        quant_config = self.get_quant_config(vllm_config)
        self.hidden_size = config.hidden_size
        self.has_attention, self.has_mlp = layer.has_attention, layer.has_mlp
        self.self_attn = self.input_layernorm = self.mlp = self.post_attention_layernorm = None
        if layer.has_attention:  # else no vLLM Attention is created, so no KV cache is allocated
            attn = QKNormLlamaAttention if getattr(config, "qk_norm", False) else LlamaAttention
            bias = bool(getattr(config, "attention_bias", False))
            self.self_attn = attn(
                config=layer, hidden_size=self.hidden_size, num_heads=layer.num_attention_heads,
                num_kv_heads=layer.num_key_value_heads,
                max_position_embeddings=getattr(config, "max_position_embeddings", 8192), quant_config=quant_config,
                bias=bias, bias_o_proj=bias, cache_config=vllm_config.cache_config, prefix=f"{prefix}.self_attn",
            )
            self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if layer.has_mlp:
            self.mlp = LlamaMLP(
                hidden_size=self.hidden_size, intermediate_size=layer.intermediate_size, hidden_act=config.hidden_act,
                quant_config=quant_config, bias=bool(getattr(config, "mlp_bias", False)), prefix=f"{prefix}.mlp",
            )
            self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

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
        missing = sorted(expected_keys(self.config.to_dict()) - stored_as(seen))
        if missing:
            raise ValueError(f"The checkpoint lacks tensors its config implies: {', '.join(missing[:5])}.")
        return loaded
