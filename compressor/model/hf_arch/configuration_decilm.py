"""The configuration of NVIDIA's heterogeneous Llama (`DeciLMForCausalLM`, model_type `nemotron-nas`),
as stock vLLM's `nemotron_nas` model reads it: `block_configs`, one per decoder layer, each with
`attention` (`no_op`, `n_heads_in_group` = query heads per KV head) and `ffn` (`no_op`,
`intermediate_size`). Query heads (`num_attention_heads`) are the same in every layer.

transformers has no class for this model type, so fitprune writes this file beside the weights
with an `auto_map` entry: vLLM loads it with `--trust-remote-code`. It imports only transformers.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig


class _Section(dict):
    """A JSON-serialisable dict whose keys read as attributes (`block.attention.no_op`), and whose
    missing keys are missing attributes (vLLM asks `hasattr(block.ffn, "ffn_mult")`)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _block(d: dict) -> _Section:
    return _Section({k: _Section(v) if isinstance(v, dict) else v for k, v in d.items()})


class DeciLMConfig(PreTrainedConfig):
    model_type = "nemotron-nas"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 32000
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    head_dim: int = 128
    block_configs: list | None = None
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
    attention_dropout: float = 0.0

    def __post_init__(self, **kwargs):
        if self.block_configs is None:
            self.block_configs = [{"attention": {"no_op": False, "n_heads_in_group": 1},
                                   "ffn": {"no_op": False, "intermediate_size": 4 * self.hidden_size}}
                                  ] * self.num_hidden_layers
        self.block_configs = [_block(b) for b in self.block_configs]
        if self.rope_parameters is None:
            self.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
        super().__post_init__(**kwargs)


__all__ = ["DeciLMConfig"]
