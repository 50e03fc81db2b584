"""The profile schema (pydantic, unknown keys refused) and loading by name or path."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

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


class AccuracyFloor(_Strict):
    max_ppl_increase: float = Field(0.5, ge=0, description="max relative perplexity increase (0.5 = +50%)")
    min_task_accuracy: float = Field(0.9, gt=0, le=1, description="min task accuracy relative to dense")


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


def list_profiles() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.yaml"))


def load_profile(name_or_path: str) -> Profile:
    path = Path(name_or_path).expanduser()
    if not (path.suffix in (".yaml", ".yml") or path.exists()):
        path = HERE / f"{name_or_path}.yaml"
        if not path.is_file():
            shipped = ", ".join(list_profiles())
            raise UserError(f"Unknown profile '{name_or_path}' (shipped: {shipped}; or give a path to a YAML file).")
    if not path.is_file():
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
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].lower()
        raise UserError(f"The profile {path} is invalid: {loc}: {msg}.") from exc
