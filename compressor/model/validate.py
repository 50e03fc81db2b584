"""Checks on a checkpoint before any weight is allocated: one sentence instead of a 7B default model,
random weights in place of a missing tensor, or a traceback from deep inside transformers.

`check_config` looks at config.json as written (transformers fills a missing key with its default,
so a config without `hidden_size` would silently describe a 4096-wide model). `check_tensors`
compares the checkpoint's tensor names and shapes, read from the safetensors headers only, with the
model the config describes, built on the meta device. `check_finite` refuses NaN or infinity in
loaded weights. The in-memory loader (`loading.load`) and the out-of-core skeleton
(`lazy.LazyModel`) both call them, so the two paths refuse the same inputs with the same sentence.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError

# the keys that fix a model's size; transformers' defaults for them are a 7B-size model
SIZE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
# positive integers when present (absent: derived from the keys above)
OPTIONAL_SIZE_KEYS = ("num_key_value_heads", "head_dim", "max_position_embeddings")
# per-layer widths of fitprune's own format (lists of positive integers, one per layer)
LAYER_KEYS = ("layer_num_attention_heads", "layer_num_key_value_heads", "layer_intermediate_size")
# checkpoint tensors transformers ignores on load: rotary inverse frequencies that older versions saved
_IGNORED_EXTRA = (re.compile(r"(^|\.)rotary_emb\.(original_)?inv_freq$"),)


# what a config may ask for: beyond every released model, far below what would hang building it
MAX_SIZES = {"num_hidden_layers": 1024, "hidden_size": 1 << 17, "intermediate_size": 1 << 20, "vocab_size": 1 << 22,
             "num_attention_heads": 4096, "num_key_value_heads": 4096, "head_dim": 4096,
             "max_position_embeddings": 1 << 27}


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def check_config(config: dict, where: Path | str) -> None:
    """Refuse a config.json whose size keys are missing, of the wrong type or inconsistent (one
    sentence naming the first offender), before transformers builds a model from its defaults."""
    if not isinstance(config, dict):
        raise UserError(f"The config {where} is not a JSON object.")
    if not isinstance(config.get("model_type"), str) or not config.get("model_type"):
        raise UserError(f"The config {where} has no 'model_type', so the model's architecture is unknown.")
    from . import FAMILIES

    if config["model_type"] not in FAMILIES:
        return  # another family names its sizes otherwise; the adapter lookup refuses it by name
    missing = [k for k in SIZE_KEYS if k not in config]
    if missing:
        more = f" (and {len(missing) - 1} more size key{'s' if len(missing) > 2 else ''}: " \
               f"{', '.join(missing[1:])})" if len(missing) > 1 else ""
        raise UserError(f"The config {where} has no '{missing[0]}'{more}; without it transformers would build "
                        "a model of its default size instead of this checkpoint's.")
    for k in (*SIZE_KEYS, *OPTIONAL_SIZE_KEYS):
        if k in config and config[k] is not None and not _positive_int(config[k]):
            raise UserError(f"'{k}' in the config {where} must be a positive integer, got {config[k]!r}.")
        if k in config and config[k] is not None and config[k] > MAX_SIZES[k]:
            raise UserError(f"'{k}' in the config {where} is {config[k]}, beyond what any model fitprune handles asks "
                            f"for (at most {MAX_SIZES[k]}); is this config.json the checkpoint's own?")
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    if heads % kv:
        raise UserError(f"The config {where} has {heads} attention heads, not a multiple of its {kv} key-value "
                        "heads.")
    if not config.get("head_dim") and config["hidden_size"] % heads:
        raise UserError(f"The config {where} has hidden_size {config['hidden_size']}, not divisible by its {heads} "
                        "attention heads, and no 'head_dim'.")
    layers = config["num_hidden_layers"]
    for k in LAYER_KEYS:
        v = config.get(k)
        if v is None:
            continue
        # 0: the layer's block was removed (depth pruning's per-layer format)
        if not isinstance(v, list) or len(v) != layers or not all(_positive_int(x) or x == 0 for x in v):
            raise UserError(f"'{k}' in the config {where} must list one non-negative integer per layer ({layers}), "
                            f"got {v!r}.")
    q, kv = config.get("layer_num_attention_heads"), config.get("layer_num_key_value_heads")
    if q is not None and kv is not None:
        for i, (h, g) in enumerate(zip(q, kv, strict=True)):
            if (h == 0) != (g == 0) or (g and h % g):
                raise UserError(f"Layer {i} of the config {where} has {h} attention heads and {g} key-value heads: "
                                "the first must be a multiple of the second (both 0 where attention was removed).")


_NOT_FLOAT = {"BOOL", "I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64"}  # safetensors dtypes of no weight


def checkpoint_tensors(path: Path) -> dict[str, tuple[str, list[int]]]:
    """Tensor name -> (dtype, shape) of a local checkpoint, from the safetensors headers only (a
    shard index's names are checked against the shards it points to)."""
    from .safetensors_files import header, weight_files

    files = weight_files(path)
    tables = {f: header(path / f)[0] for f in sorted(set(files.values()))}
    out = {}
    for name, f in files.items():
        entry = tables[f].get(name)
        if entry is None:
            raise UserError(f"The checkpoint {path} is incomplete: its shard index puts '{name}' in {f}, which does "
                            "not hold it.")
        out[name] = (entry["dtype"], list(entry["shape"]))
    return out


def expected_tensors(model: nn.Module) -> tuple[dict[str, list[int]], set[str], set[str]]:
    """What a checkpoint of `model` (built on the meta device) holds: name -> shape of its state
    dict; the names it may omit (tied weights, stored once under their source); and its buffer
    names (a checkpoint that stores them anyway is fine)."""
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    if not tied and getattr(model.config, "tie_word_embeddings", False):  # older transformers
        tied = set(getattr(model, "_tied_weights_keys", None) or ())
    buffers = {n for n, _ in model.named_buffers()}
    return shapes, tied, buffers


def check_tensors(path: Path, model: nn.Module) -> None:
    """The checkpoint in `path` holds exactly the tensors `model` (its config's model, on the meta
    device) has, in the same shapes: a missing tensor would be left random (in memory) or fail deep
    in the work (out of core); an extra one means the config describes another model; a wrong shape
    ends in a traceback. One sentence per kind, naming the first offender and the count."""
    config = model.config
    if getattr(config, "quantization_config", None):
        return  # packed weights and scales under other names: transformers' quantizer checks them
    have = checkpoint_tensors(path)
    want, tied, buffers = expected_tensors(model)
    missing = [k for k in want if k not in have and k not in tied and k not in buffers]
    if missing:
        n = len(missing)
        raise UserError(f"The checkpoint {path} is incomplete: it has no tensor '{missing[0]}' "
                        f"({n} of the {len(want)} tensors its config describes {'are' if n > 1 else 'is'} missing).")
    wrong = [k for k in want if k in have and have[k][1] != want[k]]
    if wrong:
        k, n = wrong[0], len(wrong)
        raise UserError(f"The checkpoint {path} does not match its config: '{k}' has shape {have[k][1]} where the "
                        f"config implies {want[k]} ({n} tensor{'s' if n > 1 else ''} of the wrong shape).")
    ints = [k for k in want if k in have and k not in buffers and have[k][0] in _NOT_FLOAT]
    if ints:
        k, n = ints[0], len(ints)
        raise UserError(f"The checkpoint {path} does not match its config: '{k}' is stored as {have[k][0]}, not as "
                        f"floating-point weights, and the config names no quantization ({n} such tensor"
                        f"{'s' if n > 1 else ''}).")
    extra = [k for k in sorted(have) if k not in want and not any(p.search(k) for p in _IGNORED_EXTRA)]
    if extra:
        n = len(extra)
        raise UserError(f"The checkpoint {path} holds {n} tensor{'s' if n > 1 else ''} its config does not describe, "
                        f"the first '{extra[0]}' (is the config.json from another model?).")


def meta_model(config, trust_remote_code: bool = False) -> nn.Module:
    """The model a config describes, on the meta device: names and shapes, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def _finite(t: torch.Tensor, chunk: int = 2**24) -> bool:
    """No NaN or inf in `t`, checked a slice at a time (a whole-tensor check of a 1 GB embedding
    would take several GB of temporaries)."""
    return all(bool(torch.isfinite(c).all()) for c in t.detach().reshape(-1).split(chunk))


def check_finite(model: nn.Module, where: str) -> None:
    """Refuse a loaded model with NaN or infinity in any floating-point weight (such a model prunes
    into NaN weights and a NaN perplexity; nothing it produced would mean anything)."""
    seen: set[int] = set()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if id(t) in seen or t.is_meta or not t.is_floating_point():
            continue
        seen.add(id(t))
        if not _finite(t):
            raise UserError(f"The checkpoint {where} has non-finite values (NaN or inf) in '{name}'.")
