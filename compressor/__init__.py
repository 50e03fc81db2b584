"""fitprune's pruning side: adapters, calibration engine, metrics, allocation, compensation,
surgery, the pipeline and the CLI."""

__version__ = "0.1.0"
