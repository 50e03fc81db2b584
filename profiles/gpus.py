"""Which GPU is this, exactly? Normalised model names, so that "is the profile's device here?" is
answered by the product, its memory size and the count, never by a shared word.

Before this table, a profile's device matched any GPU whose name contained one of the first two
words of the profile's device name: an RTX 3060 passed for the rtx4090 profile's RTX 4090, an
A100-80GB for the H100 profile (through "80gb"), and L4 / T4 were never found. Timings of the wrong
GPU were then reported as measured "on the profile's device".

`identify(name, memory)` maps a `torch.cuda.get_device_name()` string (or a profile's
`device.name`) to a `Gpu`: the canonical product (form factor included where it changes the chip's
speed: an H100 PCIe is not an H100 SXM) and its memory class in GB as sold. Where one product is
sold in two sizes (A100 40/80 GB, V100 16/32 GB, RTX 3060 8/12 GB) the size comes from the name
when it says, and is checked against the memory the device reports (a MIG slice or an unexpected
size is then not that product). A name the table does not know is None, and None is never any
profile's device.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Names torch reports carry a vendor or brand word that says nothing about the chip.
_BRAND_WORDS = ("nvidia", "tesla")
# Reported memory (GiB) over the memory class must lie in this band: drivers report a little less
# than the size sold (an L4 "24 GB" reports ~22 GiB, a T4 "16 GB" ~14.8 GiB); a MIG slice reports far less.
_MEMORY_BAND = (0.85, 1.05)


@dataclass(frozen=True)
class Gpu:
    """One GPU product: `model` (canonical name, e.g. "A100 SXM4", "H100 PCIe", "L4") and
    `memory_gb`, its memory class as sold (e.g. 40 or 80)."""

    model: str
    memory_gb: int

    def __str__(self) -> str:
        return f"{self.model} {self.memory_gb}GB"


@dataclass(frozen=True)
class _Product:
    model: str
    pattern: str  # a regular expression the whole normalised name must match
    sizes: tuple[int, ...]  # memory classes (GB) the product is sold in


# Patterns are matched against the normalised name: lower case, '-' and '_' as spaces, brand
# words removed, sizes written "80gb". A group named gb* captures a size the name states.
def _size(tag: str = "gb") -> str:
    return rf"(?: (?P<{tag}>\d+)gb)?"


PRODUCTS: tuple[_Product, ...] = (
    # data-centre, Hopper / Blackwell
    _Product("H100 SXM", r"h100 (?:sxm5? )?(?P<gb>\d+)gb hbm3|h100 sxm5?" + _size("gb2") + "(?: hbm3)?", (80,)),
    _Product("H100 PCIe", r"h100" + _size() + " pcie", (80,)),
    _Product("H100 NVL", r"h100 nvl" + _size(), (94,)),
    _Product("H200", r"h200(?: sxm)?" + _size(), (141,)),
    _Product("H200 NVL", r"h200 nvl" + _size(), (141,)),
    _Product("GH200", r"gh200" + _size(), (96, 144)),
    _Product("H800", r"h800" + _size() + "(?: hbm3)?", (80,)),
    _Product("B200", r"b200" + _size(), (192,)),
    # Ampere
    _Product("A100 SXM4", r"a100 sxm4?" + _size(), (40, 80)),
    _Product("A100 PCIe", r"a100 pcie" + _size() + "|a100" + _size("gb2") + " pcie", (40, 80)),
    _Product("A800 SXM4", r"a800 sxm4?" + _size(), (40, 80)),
    _Product("A10G", r"a10g", (24,)),
    _Product("A10", r"a10", (24,)),
    _Product("A30", r"a30", (24,)),
    _Product("A40", r"a40", (48,)),
    _Product("RTX A6000", r"rtx a6000", (48,)),
    _Product("RTX A5000", r"rtx a5000", (24,)),
    _Product("RTX A4000", r"rtx a4000", (16,)),
    # Ada
    _Product("L4", r"l4", (24,)),
    _Product("L40", r"l40", (48,)),
    _Product("L40S", r"l40s", (48,)),
    _Product("RTX 6000 Ada", r"rtx 6000 ada generation", (48,)),
    # Turing / Volta
    _Product("T4", r"t4", (16,)),
    _Product("Quadro RTX 6000", r"quadro rtx 6000", (24,)),
    _Product("V100 SXM2", r"v100 sxm2" + _size(), (16, 32)),
    _Product("V100 PCIe", r"v100 pcie" + _size(), (16, 32)),
    _Product("V100S PCIe", r"v100s pcie" + _size(), (32,)),
    # GeForce (the "GeForce" word may be left out of a profile's name; no other card shares these)
    _Product("GeForce RTX 5090", r"(?:geforce )?rtx 5090", (32,)),
    _Product("GeForce RTX 4090", r"(?:geforce )?rtx 4090", (24,)),
    _Product("GeForce RTX 4080 SUPER", r"(?:geforce )?rtx 4080 super", (16,)),
    _Product("GeForce RTX 4080", r"(?:geforce )?rtx 4080", (16,)),
    _Product("GeForce RTX 3090 Ti", r"(?:geforce )?rtx 3090 ti", (24,)),
    _Product("GeForce RTX 3090", r"(?:geforce )?rtx 3090", (24,)),
    _Product("GeForce RTX 3080", r"(?:geforce )?rtx 3080", (10, 12)),
    _Product("GeForce RTX 3060", r"(?:geforce )?rtx 3060", (8, 12)),
)
_COMPILED = tuple((p, re.compile(p.pattern)) for p in PRODUCTS)


def normalise(name: str) -> str:
    """Lower case, '-' / '_' as spaces, brand words dropped, "80 GB" as "80gb", single spaces."""
    s = re.sub(r"[-_/]", " ", name.lower())
    s = re.sub(r"(\d+)\s*gb\b", r"\1gb", s)
    words = [w for w in s.split() if w not in _BRAND_WORDS]
    return " ".join(words)


def identify(name: str, memory_bytes: int | None = None, memory_gib: float | None = None) -> Gpu | None:
    """The product called `name` with `memory_bytes` (what `torch.cuda.get_device_properties().
    total_memory` reports) or `memory_gib` (a profile's `device.memory_gib`), or None when the
    table does not know the name or the memory does not fit any size the product is sold in."""
    norm = normalise(name)
    for product, rx in _COMPILED:
        m = rx.fullmatch(norm)
        if m is None:
            continue
        stated = next((int(v) for k, v in m.groupdict().items() if k.startswith("gb") and v), None)
        sizes = product.sizes
        if stated is not None:
            if stated not in sizes:
                return None
            sizes = (stated,)
        gib = memory_bytes / 2**30 if memory_bytes is not None else memory_gib
        if gib is None:
            return Gpu(product.model, sizes[0]) if len(sizes) == 1 else None
        size = min(sizes, key=lambda s: abs(gib - s))
        lo, hi = _MEMORY_BAND
        return Gpu(product.model, size) if lo <= gib / size <= hi else None
    return None


def host_gpus() -> list[tuple[str, int]]:
    """(name, total memory in bytes) of every CUDA device this process sees, in index order."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [(torch.cuda.get_device_name(i), torch.cuda.get_device_properties(i).total_memory)
            for i in range(torch.cuda.device_count())]


def match(profile_name: str, profile_memory_gib: float, count: int,
          host: list[tuple[str, int]]) -> tuple[bool, str]:
    """Whether the first `count` GPUs of `host` are all the profile's product with its memory class,
    and a sentence saying what was compared."""
    want = identify(profile_name, memory_gib=profile_memory_gib)
    if want is None:
        return False, (f"the profile's device '{profile_name}' ({profile_memory_gib:g} GiB) is not in fitprune's "
                       "table of GPUs (profiles/gpus.py), so no host counts as it")
    have = [identify(n, memory_bytes=b) for n, b in host]
    wanted = f"{count} x {want}"
    if not host:
        return False, f"no GPU is visible here; the profile wants {wanted}"
    desc = ", ".join(f"{n} ({g if g else 'not in the table of GPUs'})" for (n, _), g in zip(host, have, strict=True))
    if len(host) < count:
        return False, f"the profile wants {wanted} and this host has {len(host)}: {desc}"
    if all(g == want for g in have[:count]):
        return True, f"this host has {wanted}: {desc}"
    return False, f"the profile wants {wanted} and this host has {desc}"
