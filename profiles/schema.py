"""The profile schema (pydantic, unknown keys refused) and loading by name or path."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from compressor.errors import UserError

HERE = Path(__file__).parent


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Device(_Strict):
    name: str
    kind: Literal["gpu", "cpu"] = "gpu"
    memory_gib: float = Field(gt=0, description="memory per device (GPU memory, or RAM for a CPU profile)")
    bandwidth_gbs: float = Field(gt=0, description="memory bandwidth, GB/s")
    peak_tflops: float = Field(gt=0, description="peak dense bf16/fp16 TFLOP/s (fp32 for CPU profiles)")
    count: int = Field(1, ge=1, description="number of devices (tensor parallel)")
    threads: int | None = Field(None, ge=1, description="CPU threads the runtime uses (CPU profiles)")


class Workload(_Strict):
    max_context: int = Field(gt=0, description="max tokens per sequence (prompt + output)")
    concurrency: int = Field(ge=1, description="concurrent sequences")
    prompt_tokens: int = Field(gt=0)
    output_tokens: int = Field(gt=0)


class Budget(_Strict):
    memory_headroom: float = Field(0.1, ge=0, lt=1, description="fraction of device memory left free")
    ttft_ms: float | None = Field(None, gt=0, description="time to first token target")
    tpot_ms: float | None = Field(None, gt=0, description="time per output token target (batch 1)")
    min_throughput_tok_s: float | None = Field(None, gt=0, description="output tokens/s at the workload's concurrency")
    latency_headroom: float = Field(0.0, ge=0, lt=0.5, description=(
        "fraction of the TTFT and TPOT lines the plan keeps in reserve: a candidate must be predicted (or "
        "measured at its exact shape) within (1 - headroom) x each line, so that its export still meets the "
        "line itself on a host whose speed swings between measurements. Where the plan's latency is measured "
        "on this machine, a better plan inside the reserve is kept only if its own export, measured beside "
        "the dense export, meets the line itself (compressor/budget/confirm.py)"))


class AccuracyFloor(_Strict):
    max_ppl_increase: float = Field(0.5, ge=0, description="max relative perplexity increase (0.5 = +50%)")
    min_task_accuracy: float = Field(0.9, gt=0, le=1, description="min task accuracy relative to dense")


class Efficiency(_Strict):
    """Fractions of the device's peak a runtime reaches, and its fixed costs per forward step.

    The cost model's defaults; on the device itself a measured dense run replaces them
    (`compressor.budget.fitting.fit_cost_model`)."""

    bandwidth: float = Field(gt=0, le=1, description="fraction of peak memory bandwidth reached in decode")
    compute: float = Field(gt=0, le=1, description="fraction of peak FLOP/s reached in prefill")
    step_overhead_ms: float = Field(ge=0, description="fixed time per decode step (scheduler, sampling)")
    prefill_overhead_ms: float = Field(ge=0, description="fixed time per prefill")
    layer_overhead_us: float = Field(ge=0, description="time per decoder layer per step besides the roofline")
    allreduce_us: float = Field(10.0, ge=0, description="latency of one tensor-parallel all-reduce")


DEFAULT_EFFICIENCY = {
    # vLLM with CUDA graphs: launch costs mostly hidden; ~75% of bandwidth in GEMV, ~50% of peak in GEMM
    "gpu": Efficiency(bandwidth=0.75, compute=0.5, step_overhead_ms=1.5, prefill_overhead_ms=3.0,
                      layer_overhead_us=10.0),
    # eager CPU runtimes: a few hundred microseconds of operator dispatch per layer and step
    "cpu": Efficiency(bandwidth=0.5, compute=0.3, step_overhead_ms=3.0, prefill_overhead_ms=5.0,
                      layer_overhead_us=300.0),
}


class Profile(_Strict):
    name: str
    description: str = ""
    device: Device
    runtime: Literal["vllm", "onnxruntime", "torch"] = "vllm"
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    round_to: int = Field(64, ge=1, description="kept MLP widths round to a multiple of this")
    runtime_overhead_gib: float = Field(1.0, ge=0, description="memory the runtime needs besides weights and KV")
    workload: Workload
    budget: Budget = Budget()
    accuracy: AccuracyFloor = AccuracyFloor()
    efficiency: Efficiency = Field(None, description="cost-model factors; default: by device kind")  # type: ignore[assignment]

    @property
    def tensor_parallel(self) -> int:
        """The tensor-parallel size the profile serves with: its device count. Pruning makes the
        widths split over it (compressor/prune/tensor_parallel.py) and the container passes it to
        `vllm serve --tensor-parallel-size`: the same N in both places."""
        return int(self.device.count)

    @model_validator(mode="after")
    def _defaults(self) -> Profile:
        if self.efficiency is None:
            self.efficiency = DEFAULT_EFFICIENCY[self.device.kind]
        w = self.workload
        if w.prompt_tokens + w.output_tokens > w.max_context:
            raise ValueError(f"workload: prompt_tokens + output_tokens ({w.prompt_tokens + w.output_tokens}) "
                             f"exceed max_context ({w.max_context})")
        if w.output_tokens < 2:
            raise ValueError("workload: output_tokens must be at least 2 (time per output token needs two)")
        return self


def with_budget(profile: Profile, memory_gib: float | None = None, ttft_ms: float | None = None,
                tpot_ms: float | None = None, throughput: float | None = None) -> tuple[Profile, list[str]]:
    """`profile` with the budget lines given on the command line in place of its own (validated as
    the YAML is), and a description of each change."""
    data = profile.model_dump()
    changed = []
    for value, (section, key), what in ((memory_gib, ("device", "memory_gib"), "memory GiB per device"),
                                        (ttft_ms, ("budget", "ttft_ms"), "TTFT ms"),
                                        (tpot_ms, ("budget", "tpot_ms"), "TPOT ms"),
                                        (throughput, ("budget", "min_throughput_tok_s"), "throughput tok/s")):
        if value is not None:
            changed.append(f"{what} {data[section][key]} -> {value:g}")
            data[section][key] = value
    if not changed:
        return profile, []
    try:
        return Profile.model_validate(data), changed
    except ValidationError as exc:
        e = exc.errors()[0]
        raise UserError(f"The budget given on the command line is not valid: {'.'.join(map(str, e['loc']))}: "
                        f"{e['msg']}.") from None


def list_profiles() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.yaml"))


def load_profile(name_or_path: str) -> Profile:
    path = Path(name_or_path).expanduser()
    if not (path.suffix in (".yaml", ".yml") or path.exists()):
        path = HERE / f"{name_or_path}.yaml"
        if not path.is_file():
            shipped = ", ".join(list_profiles())
            raise UserError(f"Unknown profile '{name_or_path}' (shipped: {shipped}; or give a path to a YAML file).")
    if path.is_dir():
        raise UserError(f"The profile path {path} is a directory; give a profile name or a YAML file.")
    if not path.exists():
        raise UserError(f"The profile file {path} does not exist.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise UserError(f"The profile {path} is not valid YAML{at}.") from exc
    if not isinstance(data, dict):
        raise UserError(f"The profile {path} must be a YAML mapping of keys to values.")
    try:
        return Profile.model_validate(data)
    except ValidationError as exc:
        raise UserError(f"The profile {path} is invalid: {_first_error(exc)}.") from exc


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    if err["type"] == "value_error":  # a whole-profile rule: its message names the keys
        return err["msg"].removeprefix("Value error, ")
    loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
    msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].lower()
    return f"{loc}: {msg}"
