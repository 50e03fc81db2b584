"""Writing pruned models: standard Hugging Face checkpoints (the original architecture's own
config where it can express the pruned shape) and fitprune's per-layer-width format. Exporters
are registered by name in `EXPORTERS`; they know nothing of how the model was pruned."""

from .hf import EXPORTERS, ExportResult, export_hf

__all__ = ["EXPORTERS", "ExportResult", "export_hf"]
