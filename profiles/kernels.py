"""Kernel availability as data: which weight formats a profile's device can run in its runtime.

The table is profiles/data/kernels.yaml (its header cites the sources). A profile is keyed to a
device class from what it already says: a GPU profile through its product in the GPU table
(profiles/gpus.py) and that product's architecture; a CPU profile whose device names
x86 is `x86-cpu`. `can_run(profile, fmt)` answers with a reason when it cannot, so the planner never
proposes a format the device has no kernel for and `compress --quantize` refuses one in a sentence.
Importing this module imports neither torch nor vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

TABLE = Path(__file__).parent / "data" / "kernels.yaml"
BASELINE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}  # a profile's dtype as a format


@dataclass(frozen=True)
class Answer:
    """Whether a format runs (`ok`), and why not, or the caveat when it runs (`reason`, may be "")."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


@lru_cache(maxsize=1)
def table() -> dict:
    return yaml.safe_load(TABLE.read_text(encoding="utf-8"))


def formats() -> list[str]:
    """Every weight format the table knows, baselines first."""
    return list(table()["formats"])


def architecture(product: str) -> str | None:
    """The architecture of a GPU product named as profiles/gpus.py names it."""
    for arch, products in table()["architectures"].items():
        if product in products:
            return arch
    return None


def device_class(profile) -> tuple[str | None, str]:
    """(the profile's device class in the table, or None; the device as it was identified)."""
    dev = profile.device
    if dev.kind == "cpu":
        is_x86 = any(w in dev.name.lower() for w in ("x86", "amd64", "intel", "amd epyc", "xeon"))
        return ("x86-cpu" if is_x86 else None), f"CPU '{dev.name}'"
    from .gpus import identify

    gpu = identify(dev.name, memory_gib=dev.memory_gib)
    if gpu is None:
        return None, f"GPU '{dev.name}' (not in the table of GPUs, profiles/gpus.py)"
    arch = architecture(gpu.model)
    return arch, f"{gpu.model} ({arch or 'architecture unknown'})"


def can_run(profile, fmt: str) -> Answer:
    """Whether `profile`'s device has a kernel for weight format `fmt` in the profile's runtime."""
    t = table()
    if fmt not in t["formats"]:
        return Answer(False, f"'{fmt}' is not a weight format fitprune knows (known: {', '.join(t['formats'])})")
    cls, seen = device_class(profile)
    runtime = t["kernels"].get(profile.runtime, {})
    if cls is None or cls not in runtime:
        return Answer(False, f"the table of kernels (profiles/data/kernels.yaml) has no entry for {seen} "
                             f"in {profile.runtime}, so no {fmt} kernel is known there")
    entry = runtime[cls].get(fmt)
    if entry is None:
        return Answer(False, f"the table of kernels lists no {fmt} kernel for {seen} in {profile.runtime}")
    why = entry.get("why", "")
    if entry["run"]:
        return Answer(True, why)
    return Answer(False, f"{profile.runtime} has no {fmt} kernel on {seen}: {why}")


def runnable(profile) -> list[str]:
    """The formats the profile's device runs, in the table's order (what the planner may choose from)."""
    return [f for f in formats() if can_run(profile, f)]


def baseline(profile) -> str:
    """The profile's dense format (its dtype as a format name)."""
    return BASELINE[profile.dtype]
