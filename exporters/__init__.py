"""Writing pruned models: standard Hugging Face checkpoints (the original architecture's own
config where it can express the pruned shape), fitprune's per-layer-width format, and ONNX with a
KV cache. Exporters are registered by name in `EXPORTERS` (lazily: a new exporter is one module
plus its line there); they know nothing of how the model was pruned. The per-layer format's
transformers classes live with the models (`compressor.model.hf_arch`), which load it too.

Importing this package imports nothing else."""

from __future__ import annotations

_LAZY = {"export_hf": "exporters.hf:export_hf", "ExportResult": "exporters.hf:ExportResult",
         "export_onnx": "exporters.onnx:export_onnx", "export_decilm": "exporters.decilm:export_decilm"}


def __getattr__(name: str):
    if name == "EXPORTERS":
        from compressor.registry import Registry

        registry = Registry("exporter", {"hf": _LAZY["export_hf"], "onnx": _LAZY["export_onnx"],
                                         "decilm": _LAZY["export_decilm"]})
        globals()["EXPORTERS"] = registry
        return registry
    if name in _LAZY:
        import importlib

        module, _, attr = _LAZY[name].partition(":")
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'exporters' has no attribute '{name}'")


__all__ = ["EXPORTERS", "ExportResult", "export_decilm", "export_hf", "export_onnx"]
