"""Honest memory figures: peak host RSS and peak device memory per stage, reset between stages,
and what memory this process may still use (cgroup limits included).

Linux keeps a resettable high-water mark of the resident set (VmHWM in /proc/self/status; writing
"5" to /proc/self/clear_refs resets it), so each stage gets its own peak rather than the process's
maximum since start. Where that is not possible the stage's figure is the process maximum and says so.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR = Path("/proc/self/clear_refs")


def rss_mib() -> float:
    """Current resident set size."""
    return _status_kib("VmRSS") / 1024.0


def peak_rss_mib() -> float:
    """Peak resident set size since the last `reset_peak` (or since start)."""
    kib = _status_kib("VmHWM")
    return kib / 1024.0 if kib else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _status_kib(key: str) -> int:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_peak() -> bool:
    """Reset the peak RSS (and CUDA's peak) so the next reading covers only what follows."""
    ok = False
    try:
        _CLEAR.write_text("5")
        ok = True
    except OSError:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
    except Exception:  # noqa: BLE001  (no CUDA runtime)
        pass
    return ok


def peak_device_mib() -> float:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.max_memory_allocated() / 2**20
    except Exception:  # noqa: BLE001
        pass
    return 0.0


def _cgroup_limit_bytes() -> int | None:
    """The memory limit of this process's cgroup (v1 or v2), or None when unlimited."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            f = Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.max"
        elif "memory" in controllers.split(","):
            f = Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.limit_in_bytes"
        else:
            continue
        try:
            text = f.read_text().strip()
            if text == "max" or int(text) >= 2**60:
                return None
            return int(text)
        except (OSError, ValueError):
            continue
    return None


def available_bytes() -> int:
    """Memory this process can still grow into: the host's MemAvailable, capped by a cgroup limit
    minus what this process already holds."""
    avail = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    limit = _cgroup_limit_bytes()
    if limit is not None:
        avail = min(avail, max(0, limit - int(rss_mib() * 2**20)))
    return avail


def return_freed_memory_to_the_os() -> None:
    """Large tensors freed by a layer-by-layer run should leave the process, not stay in the C heap:
    glibc raises its mmap threshold after the first large free (up to 32 MB), after which layers of
    varying (pruned) shapes fragment the heap and the resident set grows with depth. A fixed 1 MiB
    threshold keeps every large tensor in its own mapping, released to the OS when freed."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


class StageMemory:
    """Peak RSS and device memory of each named stage (the worst, when a stage runs twice)."""

    def __init__(self) -> None:
        self.peaks: dict[str, dict[str, float]] = {}
        self.resettable = True

    def start(self) -> None:
        self.resettable = reset_peak() and self.resettable

    def stop(self, name: str) -> None:
        now = {"peak_rss_mib": round(peak_rss_mib(), 1), "peak_device_mib": round(peak_device_mib(), 1)}
        old = self.peaks.get(name, {})
        self.peaks[name] = {k: max(v, old.get(k, 0.0)) for k, v in now.items()}

    def what(self) -> str:
        return ("peak host RSS and peak device memory of each stage, reset at the start of each stage"
                if self.resettable else
                "peak host RSS of the process up to the end of each stage (this kernel cannot reset it)")
