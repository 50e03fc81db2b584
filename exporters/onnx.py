"""ONNX export with a KV cache, for uniform and per-layer-width (fitprune) models.

The graph is the model's own transformers forward (so every family's details: biases, QK norm,
RoPE variants, come along) traced by `torch.onnx.export(..., dynamo=True)` through a small
wrapper that turns the flat ONNX inputs into a `DynamicCache` and back:

    inputs   input_ids        int64   [batch, seq]
             attention_mask   int64   [batch, past_seq + seq]   1 = token, 0 = padding (left)
             position_ids     int64   [batch, seq]
             logits_index     int64   [n]    positions (0..seq-1) whose logits are returned
             past_key_values.{i}.key / .value   [batch, kv_heads[i], past_seq, head_dim]
    outputs  logits           [batch, n, vocab]
             present.{i}.key / .value           [batch, kv_heads[i], past_seq + seq, head_dim]

Layer i's KV head count is its own (per-layer widths), so the cache tensors differ in shape from
layer to layer. A layer without an attention block (depth pruning: 0 heads) has no cache at all:
its `past_key_values.{i}.*` / `present.{i}.*` are absent, so the names skip its index, and the
manifest's `attention_layers` lists the indices that have them. A first call passes
`past_seq = 0` (empty tensors). `logits_index` = [seq - 1] computes the LM head for the last
position only (what generation needs; on a small model the head over a whole prompt costs a
quarter of the prefill), `arange(seq)` gives every position.
`fitprune_onnx.json` beside the model names all of this, so a runtime needs nothing else (see
`runtimes/onnx_runtime.py`).

Dtypes: float32, and float16 (ONNX Runtime's CPU provider runs it; softmax stays float32 inside).
bfloat16 is refused: ONNX Runtime's CPU provider has no bfloat16 kernels for the graph's ops
(`Where`, `MatMul`, ...), so the file would be written but could not be run.

Weights above `external_data_threshold` bytes (default 1 GiB, well under protobuf's 2 GiB limit)
go to one external data file `model.onnx.data`; the checker then runs on the path.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from .hf import ExportResult, read_widths

MODEL_FILE = "model.onnx"
MANIFEST_FILE = "fitprune_onnx.json"
EXTERNAL_DATA_THRESHOLD = 2**30  # bytes of weights; protobuf itself stops at 2 GiB
FORMAT_VERSION = 1
INPUT_NAMES = ("input_ids", "attention_mask", "position_ids", "logits_index")

ONNX_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16}
UNSUPPORTED_DTYPES: dict[str, str] = {
    "bfloat16": "ONNX Runtime's CPU provider has no bfloat16 kernels for this graph's operators "
                "(Where, MatMul, ...); export float32 or float16 instead",
}


def onnx_families() -> list[str]:
    """The model families whose adapter says ONNX export handles them."""
    from compressor.model import FAMILIES

    return [n for n in FAMILIES.names() if FAMILIES.get(n).onnx]


def _onnx_family(model_type: str) -> bool:
    return model_type in onnx_families()


def _layers(layers: int | list[int]) -> list[int]:
    return list(range(layers)) if isinstance(layers, int) else list(layers)


def past_names(layers: int | list[int]) -> list[str]:
    """Cache input names of `layers` (a count: every layer; a list: those indices, the attention layers)."""
    return [f"past_key_values.{i}.{kv}" for i in _layers(layers) for kv in ("key", "value")]


def present_names(layers: int | list[int]) -> list[str]:
    return [f"present.{i}.{kv}" for i in _layers(layers) for kv in ("key", "value")]


def attention_layers(kv_heads: list[int]) -> list[int]:
    """The layers that have an attention block, hence a KV cache."""
    return [i for i, kv in enumerate(kv_heads) if kv > 0]


def _sliding_window(config) -> int | None:
    """The one attention window every layer uses, or None for full attention. Mixed full and
    sliding layers are refused (the 4D mask built below is shared by all layers)."""
    layer_types = getattr(config, "layer_types", None) or []
    sliding = [t == "sliding_attention" for t in layer_types]
    window = getattr(config, "sliding_window", None)
    if any(sliding) and not all(sliding):
        raise ValueError("ONNX export does not support models mixing sliding-window and full-attention layers.")
    if config.model_type == "mistral" or (sliding and all(sliding)):
        return window
    return None


class KVCacheWrapper(nn.Module):
    """`(input_ids, attention_mask, position_ids, logits_index, *past) -> (logits, *present)` around a
    transformers causal LM. The 4D additive mask is built here from the 2D padding mask (causal,
    padding, optional sliding window), which keeps the traced graph small and the export fast;
    transformers passes a ready 4D mask through unchanged. `attn_layers`: the layers with a cache
    (the others are given none and their cache entry is not returned)."""

    def __init__(self, model: nn.Module, num_layers: int, sliding_window: int | None,
                 attn_layers: list[int] | None = None):
        super().__init__()
        self.model = model
        self.num_layers = num_layers
        self.sliding_window = sliding_window
        self.attn_layers = list(range(num_layers)) if attn_layers is None else list(attn_layers)

    def forward(self, input_ids, attention_mask, position_ids, logits_index, *past):
        from transformers import DynamicCache

        seq = input_ids.shape[1]
        total = attention_mask.shape[1]
        past_len = total - seq
        q_pos = torch.arange(seq, device=input_ids.device) + past_len  # absolute query slots
        k_pos = torch.arange(total, device=input_ids.device)
        allowed = k_pos[None, :] <= q_pos[:, None]
        if self.sliding_window is not None:
            allowed = allowed & (k_pos[None, :] > q_pos[:, None] - self.sliding_window)
        allowed = allowed[None, None] & attention_mask[:, None, None, :].bool()
        # a padded query still sees itself, so no softmax row is empty (no NaN in any dtype)
        allowed = allowed | (k_pos[None, :] == q_pos[:, None])[None, None]
        dtype = self.model.get_input_embeddings().weight.dtype
        zero = torch.zeros((), dtype=dtype, device=input_ids.device)
        mask = torch.where(allowed, zero, torch.finfo(dtype).min)

        slot = {layer: j for j, layer in enumerate(self.attn_layers)}
        cache = DynamicCache(ddp_cache_data=[
            (past[2 * slot[i]], past[2 * slot[i] + 1]) if i in slot else (None, None)
            for i in range(self.num_layers)])
        # explicit positions and a 4D mask: nothing reads the cached length of a layer without attention
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True, logits_to_keep=logits_index)
        present = []
        for i in self.attn_layers:
            layer = out.past_key_values.layers[i]
            present += [layer.keys, layer.values]
        return (out.logits, *present)


@contextlib.contextmanager
def _eager_attention(model: nn.Module) -> Iterator[None]:
    """Trace the plain matmul/softmax attention (every ONNX Runtime provider runs it)."""
    old = model.config._attn_implementation
    model.config._attn_implementation = "eager"
    try:
        yield
    finally:
        model.config._attn_implementation = old


def _sample_inputs(config, kv_heads: list[int], head_dim: int, dtype: torch.dtype):
    batch, seq, past = 2, 3, 4  # sizes only steer tracing; every axis is dynamic
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    pos = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    index = torch.tensor([0, seq - 1], dtype=torch.int64)
    cache = []
    for kv in kv_heads:
        if kv:  # a layer without attention has no cache
            cache += [torch.zeros(batch, kv, past, head_dim, dtype=dtype) for _ in range(2)]
    return ids, mask, pos, index, cache


def _eos_ids(config, generation_config) -> list[int]:
    """Every id that ends generation: the config's and the generation config's (chat models often
    add their end-of-turn token there)."""
    ids: list[int] = []
    for src in (config, generation_config):
        eos = getattr(src, "eos_token_id", None) if src is not None else None
        for t in eos if isinstance(eos, list) else [eos]:
            if t is not None and t not in ids:
                ids.append(int(t))
    return ids


def _manifest(config, generation_config, w, dtype_name: str, data_file: str | None, opset: int,
              seconds: float) -> dict:
    n = len(w.kv_heads)
    attn = attention_layers(w.kv_heads)
    cache_shape = ["batch", "num_key_value_heads[i]", "past_seq", "head_dim"]
    return {
        "format": "fitprune-onnx",
        "format_version": FORMAT_VERSION,
        "model_file": MODEL_FILE,
        "external_data_file": data_file,
        "dtype": dtype_name,
        "source_model_type": config.model_type if config.model_type != "fitprune" else config.base_model_type,
        "uniform": w.uniform and not w.dropped_layers,  # every layer of the graph has the same widths
        "num_layers": n,
        "attention_layers": attn,  # the layers with a KV cache (0 heads: no attention block)
        "num_attention_heads": w.heads,
        "num_key_value_heads": w.kv_heads,
        "intermediate_size": w.intermediate,
        "head_dim": w.head_dim,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": getattr(config, "max_position_embeddings", None),
        "bos_token_id": getattr(config, "bos_token_id", None),
        "eos_token_id": _eos_ids(config, generation_config),
        "pad_token_id": getattr(config, "pad_token_id", None),
        "inputs": {
            "input_ids": {"dtype": "int64", "shape": ["batch", "seq"]},
            "attention_mask": {"dtype": "int64", "shape": ["batch", "past_seq + seq"],
                               "meaning": "1 for a token, 0 for (left) padding; covers past and new tokens"},
            "position_ids": {"dtype": "int64", "shape": ["batch", "seq"]},
            "logits_index": {"dtype": "int64", "shape": ["n"],
                             "meaning": "positions 0..seq-1 whose logits are returned ([seq - 1] to generate)"},
            "past": {"names": past_names(attn), "dtype": dtype_name, "shape": cache_shape,
                     "first_call": "past_seq = 0 (empty tensors)"},
        },
        "outputs": {
            "logits": {"dtype": dtype_name, "shape": ["batch", "n", "vocab"]},
            "present": {"names": present_names(attn), "dtype": dtype_name,
                        "shape": ["batch", "num_key_value_heads[i]", "past_seq + seq", "head_dim"]},
        },
        "opset": opset,
        "exporter": {"torch": torch.__version__, "seconds": round(seconds, 2)},
    }


def export_onnx(model: nn.Module, tokenizer, out: Path, dtype: torch.dtype | str | None = None, *,
                external_data_threshold: int = EXTERNAL_DATA_THRESHOLD, optimize: bool = True) -> ExportResult:
    """Write `model` as `model.onnx` (+ `model.onnx.data` when large) with a KV cache into the
    existing directory `out`, check it with the ONNX checker, and write `fitprune_onnx.json` and
    the tokenizer beside it. `dtype`: float32 (default) or float16. `optimize` runs onnxscript's
    graph optimizer (about half the export time on a 30-layer model; ONNX Runtime optimizes the
    graph again when it loads it either way). Raises ValueError for a dtype or architecture the
    export cannot serve."""
    import onnx

    out = Path(out)
    dtype_name = str(dtype or "float32").replace("torch.", "")
    if dtype_name in UNSUPPORTED_DTYPES:
        raise ValueError(f"Cannot export ONNX in {dtype_name}: {UNSUPPORTED_DTYPES[dtype_name]}.")
    if dtype_name not in ONNX_DTYPES:
        raise ValueError(f"Unknown ONNX dtype '{dtype_name}' (use {' or '.join(ONNX_DTYPES)}).")
    tdtype = ONNX_DTYPES[dtype_name]
    config = model.config
    if not _onnx_family(config.model_type):
        raise ValueError(f"ONNX export supports the families {', '.join(onnx_families())}, "
                         f"not '{config.model_type}'.")
    window = _sliding_window(config)
    w = read_widths(model)
    if next(model.parameters()).dtype != tdtype:
        model = copy.deepcopy(model).to(tdtype)
    model.eval()

    start = time.perf_counter()
    n = len(w.kv_heads)
    attn = attention_layers(w.kv_heads)
    wrapper = KVCacheWrapper(model, n, window, attn).eval()
    args = _sample_inputs(config, w.kv_heads, w.head_dim, tdtype)
    batch, seq, keep = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("n")
    past_seq, total = torch.export.Dim("past_seq"), torch.export.Dim("total_seq")
    dynamic_shapes = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: seq},
        "logits_index": {0: keep},
        "past": tuple({0: batch, 2: past_seq} for _ in range(2 * len(attn))),
    }
    with _eager_attention(model), torch.no_grad():
        program = torch.onnx.export(
            wrapper, (*args[:4], *args[4]), dynamo=True, dynamic_shapes=dynamic_shapes,
            input_names=[*INPUT_NAMES, *past_names(attn)],
            output_names=["logits", *present_names(attn)], optimize=optimize, verbose=False,
        )
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    external = weight_bytes > external_data_threshold
    model_path = out / MODEL_FILE
    program.save(model_path, external_data=external)
    files = [MODEL_FILE]
    data_file = None
    if external:
        data_file = MODEL_FILE + ".data"
        if not (out / data_file).is_file():
            raise RuntimeError(f"expected the external data file {data_file} beside {MODEL_FILE}")
        files.append(data_file)
    onnx.checker.check_model(str(model_path))  # path-based: works with external data and > 2 GiB
    opset = next((o.version for o in onnx.load(str(model_path), load_external_data=False).opset_import
                  if o.domain in ("", "ai.onnx")), 0)
    seconds = time.perf_counter() - start

    gen = getattr(model, "generation_config", None)
    manifest = _manifest(config, gen, w, dtype_name, data_file, opset, seconds)
    manifest["exporter"]["onnxscript_optimizer"] = optimize
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    files.append(MANIFEST_FILE)
    if gen is not None:
        gen.save_pretrained(out)
        files.append("generation_config.json")
    if tokenizer is not None:
        files += [Path(f).name for f in tokenizer.save_pretrained(out)]
    arch = config.architectures[0] if getattr(config, "architectures", None) else type(model).__name__
    return ExportResult(out, "onnx", arch, files)
