"""Fitting the cost model on the device at hand: measure the dense architecture and a skeleton of
it (random weights, the profile's dtype and workload) in the profile's runtime and fit the
efficiency factors to the two measurements, so the plan predicts this device, not a datasheet."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from profiles import Efficiency, Profile
from profiles.costmodel import Arch, CostModel

from .. import tempdirs
from ..errors import UserError
from .device import measure_batch1, open_runtime

if TYPE_CHECKING:
    from runtimes.base import Measurement


def arch_of(config: dict) -> Arch:
    try:
        return Arch.from_config(config)
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"The model config lacks what the cost model needs ({exc}); is it a decoder-only LM?") from exc


def skeleton(arch: Arch, round_to: int) -> Arch:
    """The same depth, hidden size and embeddings with one head and one MLP channel group per layer."""
    n = arch.layers
    return Arch(arch.hidden, arch.vocab, arch.head_dim, (1,) * n, (1,) * n,
                (min(round_to, min(arch.intermediate)),) * n, arch.tied_embeddings)


def _write_random_model(config: dict, arch: Arch, tokenizer_dir: Path, dtype: str, out: Path) -> None:
    """A checkpoint with `arch`'s (uniform) widths and random weights, in the family's own config
    (with the bias switches on when `arch.biased`, as a bias compensation's export has them)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..model import base_adapter
    from ..model.adapters import Widths

    uniform = len(set(arch.q_heads)) == 1 and len(set(arch.kv_heads)) == 1 and len(set(arch.intermediate)) == 1
    if not uniform:
        raise ValueError("cost-model fitting measures uniform widths only")
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
    """The runtime could not build or run an architecture of the model here, so no cost model was
    fitted. One sentence, never the runtime's traceback; a caller that calibrates on its own
    initiative may catch it and plan with the profile's factors, labelled so."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300].rstrip(".") if text else type(exc).__name__


def _measure_arch(name: str, config: dict, arch: Arch, tokenizer_dir: Path, profile: Profile, runtime: str,
                  path: Path, runs: int, say) -> Measurement:
    """Write `arch` with random weights to `path` and measure it at batch 1 in `runtime`. Any
    failure of the runtime (it cannot load or run this architecture, it dies, its timings are not
    real) becomes CalibrationFailed."""
    w = profile.workload
    threads = profile.device.threads if profile.device.kind == "cpu" else None
    try:
        _write_random_model(config, arch, tokenizer_dir, profile.dtype, path)
    except ValueError as exc:
        raise CalibrationFailed(f"The cost model cannot be fitted: the {name} architecture of this model cannot be "
                                f"written for measuring ({_first_line(exc)}); plan without fitting (--no-fit).",
                                ) from exc
    say(f"fitting the cost model: measuring the {name} architecture in {runtime} "
        f"({w.prompt_tokens} prompt + {w.output_tokens} output tokens, batch 1)")
    try:
        with open_runtime(runtime, path, profile.dtype, threads) as rt:
            return measure_batch1(rt, w.prompt_tokens, w.output_tokens, runs)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001  (a third-party runtime: RuntimeUnavailable, MeasurementError, its own)
        raise CalibrationFailed(
            f"The cost model cannot be fitted on this machine: {runtime} cannot run the {name} architecture of "
            f"this model ({_first_line(exc)}); plan without fitting (--no-fit) to use the profile's efficiency "
            "factors, or pass --ratio to prune without a plan.") from exc


@dataclass
class CostFit:
    efficiency: Efficiency
    source: str
    details: dict


def fit_cost_model(profile: Profile, config: dict, tokenizer_dir: Path, runtime: str, runs: int = 3,
              say=print) -> CostFit:
    """Measure the dense architecture and its skeleton (random weights, the profile's dtype and
    workload) in `runtime`; fit decode = overhead + bytes / bandwidth and prefill = overhead +
    FLOPs / compute to the two points. The weights' values do not change the time. CalibrationFailed
    (one sentence) when the runtime cannot run either architecture here."""
    dense = arch_of(config)
    skel = skeleton(dense, profile.round_to)
    cost = CostModel(profile)
    w = profile.workload
    meas = {}
    tmp = tempdirs.make("fitprune-calib-")
    try:
        for name, arch in (("dense", dense), ("skeleton", skel)):
            path = tmp / name
            meas[name] = _measure_arch(name, config, arch, tokenizer_dir, profile, runtime, path, runs, say)
            shutil.rmtree(path, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    d, s = meas["dense"], meas["skeleton"]
    dev, nb = profile.device, cost.dtype_bytes
    ctx = w.prompt_tokens + w.output_tokens // 2
    bytes_d = dense.params_read_per_token * nb + ctx * dense.kv_bytes_per_token(nb)
    bytes_s = skel.params_read_per_token * nb + ctx * skel.kv_bytes_per_token(nb)
    sec_per_byte = (d.tpot_s - s.tpot_s) / (bytes_d - bytes_s)
    flops_d, flops_s = cost.prefill_flops(dense, w.prompt_tokens), cost.prefill_flops(skel, w.prompt_tokens)
    sec_per_flop = (d.ttft_s - s.ttft_s) / (flops_d - flops_s)
    notes = []
    if sec_per_byte <= 0 or sec_per_flop <= 0:
        # noise swamped the difference: keep the profile's factors, fit only the overheads
        notes.append("the dense and skeleton runs were too close to separate; bandwidth/compute factors "
                     "kept from the profile")
        base = profile.efficiency
        sec_per_byte = 1 / (dev.bandwidth_gbs * 1e9 * base.bandwidth * dev.count)
        sec_per_flop = 1 / (dev.peak_tflops * 1e12 * base.compute * dev.count)
    bandwidth = 1 / (sec_per_byte * dev.bandwidth_gbs * 1e9 * dev.count)
    compute = 1 / (sec_per_flop * dev.peak_tflops * 1e12 * dev.count)
    # The intercepts are fitted, not clamped: they hold the fixed cost per step *and* the
    # difference between how fast the LM head (one large matrix, never pruned) and the decoder's
    # small matrices stream, so on CPUs they can come out negative. Pruned models lie between the
    # two measured points, where the fitted line is what was measured.
    step = d.tpot_s - bytes_d * sec_per_byte
    prefill = d.ttft_s - flops_d * sec_per_flop
    # measured factors may exceed 1 where the profile's nominal peak understates the device (caches)
    eff = Efficiency.model_construct(bandwidth=bandwidth, compute=compute, step_overhead_ms=step * 1e3,
                                     prefill_overhead_ms=prefill * 1e3, layer_overhead_us=0.0,
                                     allreduce_us=profile.efficiency.allreduce_us)
    source = f"fitted: dense + skeleton measured in {runtime} on {d.device}"
    return CostFit(eff, source, {
        "runtime": runtime, "device": d.device, "dtype": profile.dtype, "notes": notes,
        "measured": {k: m.as_dict() for k, m in meas.items()},
        "fit": {"seconds_per_gb_read": sec_per_byte * 1e9, "effective_gb_s": 1e-9 / sec_per_byte,
                "effective_tflops": 1e-12 / sec_per_flop, "decode_overhead_ms": step * 1e3,
                "prefill_overhead_ms": prefill * 1e3},
    })


