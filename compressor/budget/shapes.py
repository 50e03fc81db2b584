"""Architectures as the plan prices and measures them: a model config's `Arch`, and a checkpoint of
an `Arch` with random weights (its time in a runtime does not depend on the weights' values)."""

from __future__ import annotations

from pathlib import Path

from profiles.costmodel import Arch

from ..errors import UserError


def arch_of(config: dict) -> Arch:
    try:
        return Arch.from_config(config)
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"The model config lacks what the cost model needs ({exc}); is it a decoder-only LM?") from exc


def write_random_model(config: dict, arch: Arch, tokenizer_dir: Path, dtype: str, out: Path) -> None:
    """A checkpoint with `arch`'s (uniform) widths and random weights, in the family's own config
    (with the bias switches on when `arch.biased`, as a bias compensation's export has them)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..model import base_adapter
    from ..model.adapters import Widths

    uniform = len(set(arch.q_heads)) == 1 and len(set(arch.kv_heads)) == 1 and len(set(arch.intermediate)) == 1
    if not uniform:
        raise ValueError("a random-weight checkpoint has uniform widths only")
    w = Widths([arch.q_heads[0]] * arch.layers, [arch.kv_heads[0]] * arch.layers, [arch.intermediate[0]] * arch.layers,
               arch.head_dim, o_bias=arch.biased, down_bias=arch.biased)
    native = base_adapter(config).native_config(config, w)
    if native is None:
        raise ValueError(f"the family '{config.get('model_type')}' cannot express the widths {w}")
    family, d = native
    d.pop("model_type")
    cfg = AutoConfig.for_model(family, **d)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(out)


class CalibrationFailed(UserError):
    """The runtime could not build or run an architecture of the model here, so no latency table was
    measured. One sentence, never the runtime's traceback; a caller that measures on its own
    initiative may catch it and plan from the datasheet, labelled so."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300].rstrip(".") if text else type(exc).__name__
