"""Family adapters: the one place that knows a model family.

An `Adapter` says, for one `config.model_type`, where a decoder's layers and their linear modules
are, which per-layer widths they have, which biases and norms the family's config can express,
what a checkpoint of it must hold, and whether it exports to ONNX. The exporters, the vLLM
plugin's checkpoint check, the planner's random skeleton and parameter counting all ask it.

Pruning groups: a *head group* is a query head with its columns of `o_proj`; query heads share
key/value heads in GQA models, so a *KV group* is one KV head with the query heads that read it.
An *MLP channel* is one row of `gate_proj` and `up_proj` and one column of `down_proj`. Pruned
shapes stay valid GQA shapes: every kept KV head keeps the same number of query heads.

To add a family: one `Adapter(...)` below and its line in `compressor/model/__init__.py`
(`FAMILIES`). The families here share transformers' Llama module layout and differ only in
biases, per-head norms and whether their config accepts any head count.

This module imports no torch: it is read by `compress --help` and by the vLLM plugin.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

# config keys that describe a checkpoint rather than an architecture: never copied into a new config
NOT_ARCHITECTURE = ("architectures", "auto_map", "quantization_config", "transformers_version", "_name_or_path")


@dataclass(frozen=True)
class LayerShape:
    """The widths of one decoder layer, read from its weights (so it is right after pruning too)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int

    @property
    def heads_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class Widths:
    """Every layer's widths and which biases a (pruned) model carries: what an exporter needs."""

    heads: list[int]
    kv_heads: list[int]
    intermediate: list[int]
    head_dim: int
    o_bias: bool = False  # any layer has an o_proj bias
    down_bias: bool = False
    qkv_bias: bool = False  # q/k/v carry biases already (Qwen2, or a Llama with attention_bias)

    @property
    def uniform(self) -> bool:
        return len(set(self.heads)) == 1 and len(set(self.kv_heads)) == 1 and len(set(self.intermediate)) == 1


@dataclass(frozen=True)
class Adapter:
    family: str  # the config.model_type it serves
    qkv_bias: str = "config"  # "config": the o-bias switch also gives q/k/v biases; "always": q/k/v have one
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3): shared across heads, never sliced
    # the family config's switch that gives o_proj (and, with qkv_bias "config", q/k/v) a bias; None: none
    o_bias_switch: str | None = "attention_bias"
    down_bias_switch: str | None = "mlp_bias"  # the switch that gives gate/up/down a bias; None: none
    # does the family's config accept num_attention_heads that does not divide hidden_size? If not,
    # a pruned uniform model with such a head count is written as `head_count_fallback` (no biases)
    free_head_count: bool = True
    head_count_fallback: str | None = None
    onnx: bool = True  # exporters/onnx.py handles it
    native: bool = True  # a uniform pruned model can be written in this family's own config

    # ---- where things are ------------------------------------------------------------------
    def decoder(self, model: nn.Module) -> nn.Module:
        return model.model

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return self.decoder(model).layers

    @staticmethod
    def attention(layer: nn.Module) -> nn.Module:
        return layer.self_attn

    @staticmethod
    def mlp(layer: nn.Module) -> nn.Module:
        return layer.mlp

    def shape(self, layer: nn.Module) -> LayerShape:
        attn, mlp = self.attention(layer), self.mlp(layer)
        head_dim = attn.head_dim
        return LayerShape(
            num_heads=attn.q_proj.out_features // head_dim,
            num_kv_heads=attn.k_proj.out_features // head_dim,
            head_dim=head_dim,
            intermediate_size=mlp.gate_proj.out_features,
        )

    def attention_modules(self, layer: nn.Module) -> dict[str, nn.Linear]:
        attn = self.attention(layer)
        return {"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj, "o": attn.o_proj}

    def mlp_modules(self, layer: nn.Module) -> dict[str, nn.Linear]:
        mlp = self.mlp(layer)
        return {"gate": mlp.gate_proj, "up": mlp.up_proj, "down": mlp.down_proj}

    # ---- widths and sizes ------------------------------------------------------------------
    def widths(self, model: nn.Module) -> Widths:
        layers = self.layers(model)
        shapes = [self.shape(layer) for layer in layers]
        return Widths(
            heads=[s.num_heads for s in shapes], kv_heads=[s.num_kv_heads for s in shapes],
            intermediate=[s.intermediate_size for s in shapes], head_dim=shapes[0].head_dim,
            o_bias=any(self.attention(layer).o_proj.bias is not None for layer in layers),
            down_bias=any(self.mlp(layer).down_proj.bias is not None for layer in layers),
            qkv_bias=any(self.attention(layer).q_proj.bias is not None for layer in layers),
        )

    def count_params(self, model: nn.Module) -> dict[str, int]:
        """Parameters in all, in the decoder layers, and outside the embeddings (decoder + final norm)."""
        total = sum(p.numel() for p in model.parameters())
        decoder = sum(p.numel() for p in self.layers(model).parameters())
        norm = sum(p.numel() for p in self.decoder(model).norm.parameters())
        return {"total": total, "decoder": decoder, "non_embedding": decoder + norm}

    @staticmethod
    def set_config_widths(config: Any, keeps: list) -> None:
        """After pruning (`keeps`: each layer's `prune.surgery.LayerKeep`): the config's global head counts
        and MLP width are the largest kept ones."""
        config.num_attention_heads = max(len(k.q_heads) for k in keeps)
        config.num_key_value_heads = max(len(k.kv_heads) for k in keeps)
        config.intermediate_size = max(len(k.channels) for k in keeps)

    # ---- configs and checkpoints -----------------------------------------------------------
    def native_config(self, config: dict, w: Widths) -> tuple[str, dict] | None:
        """(model_type, config dict) of this family's own config for a uniform model of widths `w`,
        with the bias switches the pruned weights need; None when the family cannot express it."""
        if not self.native or not w.uniform:
            return None
        d = {k: v for k, v in config.items() if k not in NOT_ARCHITECTURE}
        d.update(num_attention_heads=w.heads[0], num_key_value_heads=w.kv_heads[0],
                 intermediate_size=w.intermediate[0], head_dim=w.head_dim)
        for key in ("layer_num_attention_heads", "layer_num_key_value_heads", "layer_intermediate_size",
                    "base_model_type"):
            d.pop(key, None)
        family = self.family
        if w.o_bias or (w.qkv_bias and self.qkv_bias == "config"):
            if self.o_bias_switch is None:
                return None
            d[self.o_bias_switch] = True
        if w.down_bias:
            if self.down_bias_switch is None:
                return None
            d[self.down_bias_switch] = True
        if not self.free_head_count and d["hidden_size"] % w.heads[0] != 0:
            biased = any(d.get(s) for s in (self.o_bias_switch, self.down_bias_switch) if s)
            if biased or self.head_count_fallback is None:
                return None
            family = self.head_count_fallback
            d["sliding_window"] = None
        d["model_type"] = family
        return family, d

    def expected_keys(self, config: dict) -> set[str]:
        """Names of the tensors a checkpoint with this config must hold, every bias a switch turns on
        included (vLLM reads a missing bias of a fused projection as uninitialized memory)."""
        attn_bias = bool(config.get("attention_bias", False))
        qkv_bias = attn_bias or self.qkv_bias == "always"
        mlp_bias = bool(config.get("mlp_bias", False))
        qk_norm = self.qk_norm or bool(config.get("qk_norm", False))
        keys = {"model.embed_tokens.weight", "model.norm.weight"}
        if not config.get("tie_word_embeddings", False):
            keys.add("lm_head.weight")
        for i in range(int(config["num_hidden_layers"])):
            p = f"model.layers.{i}"
            keys |= {f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"}
            for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
                keys.add(f"{p}.self_attn.{n}.weight")
                if (qkv_bias and n != "o_proj") or (attn_bias and n == "o_proj"):
                    keys.add(f"{p}.self_attn.{n}.bias")
            for n in ("gate_proj", "up_proj", "down_proj"):
                keys.add(f"{p}.mlp.{n}.weight")
                if mlp_bias:
                    keys.add(f"{p}.mlp.{n}.bias")
            if qk_norm:
                keys |= {f"{p}.self_attn.q_norm.weight", f"{p}.self_attn.k_norm.weight"}
        return keys

    def has_qk_norm(self, config: dict) -> bool:
        return self.qk_norm or bool(config.get("qk_norm", False))


LLAMA = Adapter("llama", free_head_count=False, head_count_fallback="mistral")
MISTRAL = Adapter("mistral", o_bias_switch=None, down_bias_switch=None)
QWEN2 = Adapter("qwen2", qkv_bias="always", o_bias_switch=None, down_bias_switch=None)
QWEN3 = Adapter("qwen3", qk_norm=True, down_bias_switch=None)
# our own per-layer-width format (a pruned model can be pruned again); never written as "native"
FITPRUNE = Adapter("fitprune", o_bias_switch=None, down_bias_switch=None, native=False)
