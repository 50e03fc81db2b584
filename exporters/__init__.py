"""Writing pruned models: standard Hugging Face checkpoints (the original architecture's own
config where it can express the pruned shape), fitprune's per-layer-width format, and ONNX with a
KV cache. Exporters are registered by name in `EXPORTERS`; they know nothing of how the model was
pruned."""

from .hf import EXPORTERS, ExportResult, export_hf
from .onnx import export_onnx

EXPORTERS["onnx"] = export_onnx

__all__ = ["EXPORTERS", "ExportResult", "export_hf", "export_onnx"]
