"""Family adapters: the one place that knows a model family.

An `Adapter` says, for one `config.model_type`, where a decoder's layers and their linear modules
are, which per-layer widths they have, which biases and norms the family's config can express,
what a checkpoint of it must hold, and whether it exports to ONNX. The exporters, the vLLM
plugin's checkpoint check, the planner's random skeleton and parameter counting all ask it.

Pruning groups: a *head group* is a query head with its columns of `o_proj`; query heads share
key/value heads in GQA models, so a *KV group* is one KV head with the query heads that read it.
An *MLP channel* is one row of `gate_proj` and `up_proj` and one column of `down_proj`. Pruned
shapes stay valid GQA shapes: every kept KV head keeps the same number of query heads.

Depth: a removed attention block (`prune.surgery.NoAttention`, no `q_proj`) has 0 query and 0 KV
heads, a removed MLP block (`NoMLP`, no `gate_proj`) 0 channels; a layer with both removed is
dropped from exports (`Widths.kept_layers`). In fitprune's per-layer config a 0 in
`layer_num_attention_heads` / `layer_intermediate_size` is a block no-op.

To add a family: one `Adapter(...)` below and its line in `compressor/model/__init__.py`
(`FAMILIES`). The families here share transformers' Llama module layout and differ only in
biases, per-head norms and whether their config accepts any head count.

This module imports no torch: it is read by `compress --help` and by the vLLM plugin.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

# config keys that describe a checkpoint rather than an architecture: never copied into a new config
NOT_ARCHITECTURE = ("architectures", "auto_map", "quantization_config", "transformers_version", "_name_or_path")
# config lists with one entry per decoder layer: trimmed when layers are dropped
PER_LAYER_KEYS = ("layer_types", "layer_num_attention_heads", "layer_num_key_value_heads", "layer_intermediate_size")


@dataclass(frozen=True)
class LayerShape:
    """The widths of one decoder layer, read from its weights (so it is right after pruning too)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int

    @property
    def heads_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads if self.num_kv_heads else 0

    @property
    def attention_removed(self) -> bool:
        return self.num_heads == 0

    @property
    def mlp_removed(self) -> bool:
        return self.intermediate_size == 0


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
    def kept_layers(self) -> list[int]:
        """Indices of the layers that keep a block (a layer with neither is dropped from exports)."""
        return [i for i, (h, m) in enumerate(zip(self.heads, self.intermediate, strict=True)) if h or m]

    @property
    def dropped_layers(self) -> list[int]:
        return [i for i in range(len(self.heads)) if i not in set(self.kept_layers)]

    def without_dropped(self) -> Widths:
        """The widths of the exported model: wholly removed layers left out, the rest renumbered."""
        keep = self.kept_layers
        return replace(self, heads=[self.heads[i] for i in keep], kv_heads=[self.kv_heads[i] for i in keep],
                       intermediate=[self.intermediate[i] for i in keep])

    @property
    def has_block_noops(self) -> bool:
        """Does a kept layer lack its attention or its MLP block?"""
        return any(self.heads[i] == 0 or self.intermediate[i] == 0 for i in self.kept_layers)

    @property
    def uniform(self) -> bool:
        """Every kept layer has the same widths and both blocks (dropped layers aside)."""
        keep = self.kept_layers
        return (bool(keep) and not self.has_block_noops and len({self.heads[i] for i in keep}) == 1
                and len({self.kv_heads[i] for i in keep}) == 1 and len({self.intermediate[i] for i in keep}) == 1)


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

    def has_attention(self, layer: nn.Module) -> bool:
        """False once the layer's attention block was removed (a `NoAttention` has no projections)."""
        return hasattr(self.attention(layer), "q_proj")

    def has_mlp(self, layer: nn.Module) -> bool:
        return hasattr(self.mlp(layer), "gate_proj")

    def shape(self, layer: nn.Module) -> LayerShape:
        """Widths read from the weights; a removed block has 0 heads / 0 channels."""
        attn, mlp = self.attention(layer), self.mlp(layer)
        head_dim = attn.head_dim
        has_attn = self.has_attention(layer)
        return LayerShape(
            num_heads=attn.q_proj.out_features // head_dim if has_attn else 0,
            num_kv_heads=attn.k_proj.out_features // head_dim if has_attn else 0,
            head_dim=head_dim,
            intermediate_size=mlp.gate_proj.out_features if self.has_mlp(layer) else 0,
        )

    def attention_modules(self, layer: nn.Module) -> dict[str, nn.Linear]:
        """The attention block's projections ({} when the block was removed)."""
        if not self.has_attention(layer):
            return {}
        attn = self.attention(layer)
        return {"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj, "o": attn.o_proj}

    def mlp_modules(self, layer: nn.Module) -> dict[str, nn.Linear]:
        """The MLP block's projections ({} when the block was removed)."""
        if not self.has_mlp(layer):
            return {}
        mlp = self.mlp(layer)
        return {"gate": mlp.gate_proj, "up": mlp.up_proj, "down": mlp.down_proj}

    # ---- widths and sizes ------------------------------------------------------------------
    def widths(self, model: nn.Module) -> Widths:
        layers = self.layers(model)
        shapes = [self.shape(layer) for layer in layers]
        attns = [self.attention(layer) for layer in layers if self.has_attention(layer)]
        mlps = [self.mlp(layer) for layer in layers if self.has_mlp(layer)]
        return Widths(
            heads=[s.num_heads for s in shapes], kv_heads=[s.num_kv_heads for s in shapes],
            intermediate=[s.intermediate_size for s in shapes], head_dim=shapes[0].head_dim,
            o_bias=any(a.o_proj.bias is not None for a in attns),
            down_bias=any(m.down_proj.bias is not None for m in mlps),
            qkv_bias=any(a.q_proj.bias is not None for a in attns),
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
        and MLP width are the largest kept ones (unchanged where every layer lost that block: the
        config must stay loadable). `num_hidden_layers` stays: removed layers are still in the
        model, as identities, until an exporter drops them."""
        heads = max(len(k.q_heads) for k in keeps)
        if heads:
            config.num_attention_heads = heads
            config.num_key_value_heads = max(len(k.kv_heads) for k in keeps)
        width = max(len(k.channels) for k in keeps)
        if width:
            config.intermediate_size = width

    # ---- configs and checkpoints -----------------------------------------------------------
    def native_config(self, config: dict, w: Widths) -> tuple[str, dict] | None:
        """(model_type, config dict) of this family's own config for a uniform model of widths `w`,
        with the bias switches the pruned weights need; None when the family cannot express it.
        Wholly removed layers are left out: fewer `num_hidden_layers`, per-layer lists trimmed."""
        if not self.native or not w.uniform:
            return None
        d = {k: v for k, v in config.items() if k not in NOT_ARCHITECTURE}
        kept = w.kept_layers
        for key in PER_LAYER_KEYS:
            if isinstance(d.get(key), list) and len(d[key]) == len(w.heads):
                d[key] = [d[key][i] for i in kept]
        w = w.without_dropped()
        d.update(num_attention_heads=w.heads[0], num_key_value_heads=w.kv_heads[0],
                 intermediate_size=w.intermediate[0], head_dim=w.head_dim, num_hidden_layers=len(kept))
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
        n_layers = int(config["num_hidden_layers"])
        heads = config.get("layer_num_attention_heads") or [1] * n_layers  # 0: no attention block
        width = config.get("layer_intermediate_size") or [1] * n_layers  # 0: no MLP block
        for i in range(n_layers):
            p = f"model.layers.{i}"
            if heads[i]:
                keys.add(f"{p}.input_layernorm.weight")
                for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
                    keys.add(f"{p}.self_attn.{n}.weight")
                    if (qkv_bias and n != "o_proj") or (attn_bias and n == "o_proj"):
                        keys.add(f"{p}.self_attn.{n}.bias")
                if qk_norm:
                    keys |= {f"{p}.self_attn.q_norm.weight", f"{p}.self_attn.k_norm.weight"}
            if width[i]:
                keys.add(f"{p}.post_attention_layernorm.weight")
                for n in ("gate_proj", "up_proj", "down_proj"):
                    keys.add(f"{p}.mlp.{n}.weight")
                    if mlp_bias:
                        keys.add(f"{p}.mlp.{n}.bias")
        return keys

    def has_qk_norm(self, config: dict) -> bool:
        return self.qk_norm or bool(config.get("qk_norm", False))


LLAMA = Adapter("llama", free_head_count=False, head_count_fallback="mistral")
MISTRAL = Adapter("mistral", o_bias_switch=None, down_bias_switch=None)
QWEN2 = Adapter("qwen2", qkv_bias="always", o_bias_switch=None, down_bias_switch=None)
QWEN3 = Adapter("qwen3", qk_norm=True, down_bias_switch=None)
# our own per-layer-width format (a pruned model can be pruned again); never written as "native"
FITPRUNE = Adapter("fitprune", o_bias_switch=None, down_bias_switch=None, native=False)
