"""A Llama-family decoder whose layers each have their own widths (written by fitprune).

Per layer i: `layer_num_attention_heads[i]` query heads, `layer_num_key_value_heads[i]` KV heads
(GQA), `layer_intermediate_size[i]` MLP channels. `attention_bias` gives q/k/v/o a bias,
`mlp_bias` gives gate/up/down one (zeros where the original model had none), `qk_norm` adds the
per-head RMSNorm on queries and keys (Qwen3). Everything else is the Llama architecture.

Depth: 0 query and 0 KV heads in a layer mean it has no attention block (and no input norm), 0
MLP channels that it has no MLP block (and no post-attention norm); the residual stream passes
that block unchanged. (Wholly removed layers are left out of the checkpoint by the exporter.) A
layer without attention keeps a one-number-per-token placeholder in the KV cache, because
transformers reads the cached length from layer 0 for positions and masks.

This file imports only torch and transformers: it works as remote code (`trust_remote_code=True`)
beside the weights, and fitprune registers it with the Auto classes when installed.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)


class FitPruneConfig(PreTrainedConfig):
    model_type = "fitprune"
    keys_to_ignore_at_inference = ["past_key_values"]

    base_model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008  # the widest layer's; per-layer widths below
    num_hidden_layers: int = 32
    num_attention_heads: int = 32  # the widest layer's
    num_key_value_heads: int | None = None
    head_dim: int = 128
    layer_num_attention_heads: list[int] | None = None
    layer_num_key_value_heads: list[int] | None = None
    layer_intermediate_size: list[int] | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    attention_dropout: float = 0.0

    def __post_init__(self, **kwargs):
        n = self.num_hidden_layers
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.layer_num_attention_heads is None:
            self.layer_num_attention_heads = [self.num_attention_heads] * n
        if self.layer_num_key_value_heads is None:
            self.layer_num_key_value_heads = [self.num_key_value_heads] * n
        if self.layer_intermediate_size is None:
            self.layer_intermediate_size = [self.intermediate_size] * n
        if self.rope_parameters is None:
            self.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
        super().__post_init__(**kwargs)
        # transformers' class validators are the base class's own list, which misses this override
        self.validate_architecture()

    def validate_architecture(self):
        n = self.num_hidden_layers
        for name in ("layer_num_attention_heads", "layer_num_key_value_heads", "layer_intermediate_size"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} must have one entry per layer ({n}).")
        for i, (q, kv) in enumerate(zip(self.layer_num_attention_heads, self.layer_num_key_value_heads, strict=True)):
            if q == kv == 0:
                continue  # no attention block in this layer
            if kv < 1 or q % kv != 0:
                raise ValueError(f"layer {i}: {q} query heads cannot share {kv} KV heads evenly.")


class FitPruneAttention(nn.Module):
    def __init__(self, config: FitPruneConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.layer_num_attention_heads[layer_idx]
        self.num_key_value_heads = config.layer_num_key_value_heads[layer_idx]
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        if config.qk_norm:
            self.q_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, past_key_values=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape)
        k = self.k_proj(hidden_states).view(hidden_shape)
        if self.config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        out, weights = attention_interface(
            self, q, k, v, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling, **kwargs,
        )
        out = out.reshape(*input_shape, -1).contiguous()
        return self.o_proj(out), weights


class FitPruneNoAttention(nn.Module):
    """A layer without attention: adds nothing, caches a placeholder so the cached length stays right."""

    def __init__(self, config: FitPruneConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim

    def forward(self, hidden_states, past_key_values=None, **kwargs):
        if past_key_values is not None:
            b, t = hidden_states.shape[:2]
            placeholder = hidden_states.new_zeros(b, 1, t, 1)
            past_key_values.update(placeholder, placeholder, self.layer_idx)
        return torch.zeros_like(hidden_states), None


class FitPruneNoMLP(nn.Module):
    """A layer without an MLP block: adds nothing."""

    intermediate_size = 0

    def forward(self, x):
        return torch.zeros_like(x)


class FitPruneMLP(nn.Module):
    def __init__(self, config: FitPruneConfig, layer_idx: int):
        super().__init__()
        width = config.layer_intermediate_size[layer_idx]
        self.intermediate_size = width
        self.gate_proj = nn.Linear(config.hidden_size, width, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, width, bias=config.mlp_bias)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class FitPruneDecoderLayer(nn.Module):
    def __init__(self, config: FitPruneConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.has_attention = config.layer_num_attention_heads[layer_idx] > 0
        self.has_mlp = config.layer_intermediate_size[layer_idx] > 0
        if self.has_attention:
            self.self_attn = FitPruneAttention(config, layer_idx)
            self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        else:
            self.self_attn = FitPruneNoAttention(config, layer_idx)
        if self.has_mlp:
            self.mlp = FitPruneMLP(config, layer_idx)
            self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        else:
            self.mlp = FitPruneNoMLP()

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False, position_embeddings=None, **kwargs):
        if self.has_attention:
            h, _ = self.self_attn(
                self.input_layernorm(hidden_states), position_embeddings=position_embeddings,
                attention_mask=attention_mask, past_key_values=past_key_values, **kwargs,
            )
            hidden_states = hidden_states + h
        else:
            self.self_attn(hidden_states, past_key_values=past_key_values)
        if self.has_mlp:
            hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states


class FitPrunePreTrainedModel(PreTrainedModel):
    config_class = FitPruneConfig
    config: FitPruneConfig
    base_model_prefix = "model"
    _no_split_modules = ["FitPruneDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True


class FitPruneModel(FitPrunePreTrainedModel):
    def __init__(self, config: FitPruneConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([FitPruneDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, **kwargs) -> BaseModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past).unsqueeze(0)
        mask = create_causal_mask(
            config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
            past_key_values=past_key_values, position_ids=position_ids,
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        for layer in self.layers:
            hidden_states = layer(
                hidden_states, attention_mask=mask, position_embeddings=position_embeddings,
                position_ids=position_ids, past_key_values=past_key_values, use_cache=use_cache, **kwargs,
            )
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), past_key_values=past_key_values)


class FitPruneForCausalLM(FitPrunePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: FitPruneConfig):
        super().__init__(config)
        self.model = FitPruneModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs,
        )
        hidden = out.last_hidden_state
        sl = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, sl, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)


__all__ = ["FitPruneConfig", "FitPruneModel", "FitPruneForCausalLM"]
