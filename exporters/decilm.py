"""Stock vLLM's heterogeneous Llama: `DeciLMForCausalLM` (nemotron-nas `block_configs`), an
alternative to fitprune's per-layer format that vLLM serves without our plugin.

It expresses, per layer, the MLP width, the KV-head count (`n_heads_in_group`) and attention / MLP
no-ops, but one query-head count for all layers: it fits plans that keep every attention layer's
query heads equal (depth pruning, MLP-only width pruning). Wholly removed layers are left out as in
every export. The configuration class ships beside the weights (`configuration_decilm.py`,
`auto_map`), so vLLM needs `--trust-remote-code`; transformers has no modeling code for it.

Refused, each with one sentence: per-layer query-head counts, Qwen3's QK norm, sliding-window
attention, and a first layer without attention (vLLM 0.32's DeciLM then feeds a missing residual
into the MLP's fused norm and crashes; fitprune's own per-layer format handles that case).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from compressor.errors import UserError
from compressor.model import adapter_for
from compressor.model.adapters import Widths
from compressor.model.hf_arch import DECILM_CONFIG_FILE as CONFIG_FILE

from .hf import ExportResult, _state_dict, _write_weights, read_widths

ARCHITECTURE = "DeciLMForCausalLM"
_COPIED = ("vocab_size", "hidden_size", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
           "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "rope_parameters",
           "attention_dropout")


def decilm_config(config, w: Widths, qk_norm: bool = False):
    """The `DeciLMConfig` of a pruned model of widths `w` from `config`; UserError (one sentence) when
    the format cannot express it."""
    from compressor.model.hf_arch.configuration_decilm import DeciLMConfig

    if not w.kept_layers:
        raise UserError("Every decoder layer was removed: there is no model left to export.")
    w = w.without_dropped()
    heads = {h for h in w.heads if h}
    if len(heads) > 1:
        raise UserError(f"The DeciLM format has one query-head count for every layer, and this model's layers have "
                        f"{', '.join(map(str, sorted(heads)))}; export fitprune's per-layer format instead.")
    if w.heads[0] == 0:
        raise UserError("The first decoder layer has no attention block, which vLLM's DeciLM cannot serve (it "
                        "crashes); export fitprune's per-layer format instead.")
    if qk_norm:
        raise UserError("The DeciLM format has no per-head query/key norm (Qwen3's); export fitprune's per-layer "
                        "format instead.")
    sliding = "sliding_attention" in (getattr(config, "layer_types", None) or [])
    if sliding or (config.model_type == "mistral" and getattr(config, "sliding_window", None)):
        raise UserError("The DeciLM format has no sliding-window attention; export fitprune's per-layer format "
                        "instead.")
    (q,) = heads
    blocks = []
    for h, kv, m in zip(w.heads, w.kv_heads, w.intermediate, strict=True):
        attn = {"no_op": h == 0, "replace_with_linear": False, "n_heads_in_group": h // kv if h else None}
        ffn = {"no_op": m == 0, "replace_with_linear": False, "intermediate_size": m or None}
        blocks.append({"attention": attn, "ffn": ffn})
    d = config.to_dict()
    kw = {k: d[k] for k in _COPIED if k in d}
    cfg = DeciLMConfig(**kw, num_hidden_layers=len(blocks), num_attention_heads=q, head_dim=w.head_dim,
                       block_configs=blocks, attention_bias=w.o_bias or w.qkv_bias, mlp_bias=w.down_bias)
    cfg.architectures = [ARCHITECTURE]
    cfg.auto_map = {"AutoConfig": "configuration_decilm.DeciLMConfig"}
    return cfg


def export_decilm(model: nn.Module, tokenizer, out: Path, dtype: torch.dtype | None = None) -> ExportResult:
    """Write `model` (pruned in memory) as a `DeciLMForCausalLM` checkpoint into the existing directory `out`."""
    out = Path(out)
    dtype = dtype or next(model.parameters()).dtype
    w = read_widths(model)
    adapter = adapter_for(model)
    cfg = decilm_config(model.config, w, adapter.has_qk_norm(model.config.to_dict()))
    cfg.dtype = str(dtype).replace("torch.", "")
    sd = _state_dict(model, w, cfg.attention_bias, cfg.mlp_bias, bool(cfg.tie_word_embeddings), dtype)
    files = _write_weights(sd, out)
    cfg.save_pretrained(out)
    shutil.copy(CONFIG_FILE, out / CONFIG_FILE.name)
    files += ["config.json", CONFIG_FILE.name]
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(out)
        files.append("generation_config.json")
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return ExportResult(out, "decilm", ARCHITECTURE, files, w.dropped_layers)
