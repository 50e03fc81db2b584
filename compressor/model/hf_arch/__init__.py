"""fitprune's per-layer-width architecture for transformers (`model_type: fitprune`).

`modeling_fitprune.py` is self-contained (it imports only torch and transformers) so that it can
also be copied beside exported weights and loaded with `trust_remote_code=True` by users who do
not have fitprune. Importing this package registers it with the transformers Auto classes.
"""

from pathlib import Path

from .modeling_fitprune import FitPruneConfig, FitPruneForCausalLM, FitPruneModel

MODELING_FILE = Path(__file__).with_name("modeling_fitprune.py")
DECILM_CONFIG_FILE = Path(__file__).with_name("configuration_decilm.py")  # shipped beside DeciLM exports


def register() -> None:
    """Register the architecture with transformers' Auto classes (idempotent)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register("fitprune", FitPruneConfig)
    except ValueError:
        pass  # already registered
    try:
        AutoModelForCausalLM.register(FitPruneConfig, FitPruneForCausalLM)
    except ValueError:
        pass


register()

__all__ = ["DECILM_CONFIG_FILE", "FitPruneConfig", "FitPruneForCausalLM", "FitPruneModel", "MODELING_FILE", "register"]
