"""Writing pruned models: standard Hugging Face checkpoints (the original architecture's own
config where it can express the pruned shape), fitprune's per-layer-width format, and ONNX with a
KV cache. Exporters are registered by name in `EXPORTERS` (lazily: a new exporter is one module
plus its line here); they know nothing of how the model was pruned."""

from compressor.registry import Registry

from .hf import ExportResult, export_hf

EXPORTERS = Registry("exporter", {"hf": "exporters.hf:export_hf", "onnx": "exporters.onnx:export_onnx"})


def __getattr__(name: str):
    if name == "export_onnx":  # imported on first use: it pulls in the ONNX exporter's helpers
        return EXPORTERS.get("onnx")
    raise AttributeError(name)


__all__ = ["EXPORTERS", "ExportResult", "export_hf", "export_onnx"]
