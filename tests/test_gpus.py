"""Exact device matching (profiles/gpus.py): real `torch.cuda.get_device_name()` strings,
with the memory `get_device_properties().total_memory` reports, map to one product and memory
class; a profile's device is present only on that product, size and count, never on a GPU that
merely shares a word with it. Every shipped profile (profiles/*.yaml) is covered."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from compressor.budget.device import device_match, device_present
from profiles import load_profile
from profiles.gpus import Gpu, identify, normalise

PROFILES = sorted((Path(__file__).resolve().parents[1] / "profiles").glob("*.yaml"))
MIB = 2**20

# (torch.cuda.get_device_name(), total_memory in MiB as the driver reports it (approximate: only
# the ratio to the size sold matters), the product and memory class it is)
REAL = [
    ("NVIDIA A10G", 22723, Gpu("A10G", 24)),
    ("NVIDIA A10", 22731, Gpu("A10", 24)),
    ("NVIDIA L4", 22488, Gpu("L4", 24)),
    ("Tesla T4", 15109, Gpu("T4", 16)),
    ("NVIDIA A100-SXM4-80GB", 81251, Gpu("A100 SXM4", 80)),
    ("NVIDIA A100-SXM4-40GB", 40536, Gpu("A100 SXM4", 40)),
    ("NVIDIA A100-PCIE-40GB", 40339, Gpu("A100 PCIe", 40)),
    ("NVIDIA A100 80GB PCIe", 81038, Gpu("A100 PCIe", 80)),
    ("NVIDIA H100 80GB HBM3", 81008, Gpu("H100 SXM", 80)),
    ("NVIDIA H100 PCIe", 81559, Gpu("H100 PCIe", 80)),
    ("NVIDIA H100 NVL", 95830, Gpu("H100 NVL", 94)),
    ("NVIDIA H200", 143167, Gpu("H200", 141)),
    ("NVIDIA GeForce RTX 4090", 24217, Gpu("GeForce RTX 4090", 24)),
    ("NVIDIA GeForce RTX 3090", 24265, Gpu("GeForce RTX 3090", 24)),
    ("NVIDIA GeForce RTX 3060", 12037, Gpu("GeForce RTX 3060", 12)),
    ("NVIDIA GeForce RTX 3060", 7972, Gpu("GeForce RTX 3060", 8)),
    ("NVIDIA RTX A6000", 48676, Gpu("RTX A6000", 48)),
    ("NVIDIA RTX 6000 Ada Generation", 48647, Gpu("RTX 6000 Ada", 48)),
    ("NVIDIA L40S", 45589, Gpu("L40S", 48)),
    ("NVIDIA L40", 45589, Gpu("L40", 48)),
    ("Tesla V100-SXM2-16GB", 16151, Gpu("V100 SXM2", 16)),
    ("Tesla V100-SXM2-32GB", 32501, Gpu("V100 SXM2", 32)),
]
# Names the table must not claim: other products that share words with known ones, and a MIG slice.
UNKNOWN = [
    ("NVIDIA GeForce RTX 4090 D", 24217),
    ("NVIDIA GeForce RTX 4090 Laptop GPU", 16376),
    ("NVIDIA A100-SXM4-80GB MIG 3g.40gb", 40192),
    ("NVIDIA A100-SXM4-80GB", 40192),  # the 80 GB name with half the memory: not that product
    ("AMD Instinct MI300X", 196592),
    ("NVIDIA Graphics Device", 81559),
]


def _gpu_profiles():
    out = []
    for path in PROFILES:
        if yaml.safe_load(path.read_text())["device"].get("kind", "gpu") == "gpu":
            out.append(load_profile(str(path)))
    return out


def _host(name: str, mib: int, count: int = 1) -> list[tuple[str, int]]:
    return [(name, mib * MIB)] * count


@pytest.mark.parametrize(("name", "mib", "gpu"), REAL, ids=[f"{n}-{m}" for n, m, _ in REAL])
def test_real_names_map_to_one_product_and_size(name, mib, gpu):
    assert identify(name, memory_bytes=mib * MIB) == gpu


@pytest.mark.parametrize(("name", "mib"), UNKNOWN, ids=[n for n, _ in UNKNOWN])
def test_unknown_gpus_are_no_product_and_no_profiles_device(name, mib):
    assert identify(name, memory_bytes=mib * MIB) is None
    for prof in _gpu_profiles():
        ok, why = device_match(prof, _host(name, mib, prof.device.count))
        assert not ok, why


def test_names_state_their_size_or_the_memory_decides():
    assert normalise("NVIDIA A100-SXM4-80GB") == "a100 sxm4 80gb" and normalise("Tesla T4") == "t4"
    # a name that states its size needs no memory; one sold in two sizes without it is undecided
    assert identify("NVIDIA A100-SXM4-40GB") == Gpu("A100 SXM4", 40)
    assert identify("NVIDIA GeForce RTX 3060") is None
    assert identify("NVIDIA GeForce RTX 3060", memory_gib=12) == Gpu("GeForce RTX 3060", 12)


def test_every_shipped_gpu_profile_names_a_known_device():
    profiles = _gpu_profiles()
    assert len(profiles) >= 7
    for prof in profiles:
        assert identify(prof.device.name, memory_gib=prof.device.memory_gib) is not None, prof.name


def test_each_profile_is_present_only_on_its_own_product_size_and_count():
    """For every shipped GPU profile and every real GPU above: present exactly when the real GPU
    is the profile's product and size and there are at least `device.count` of them."""
    profiles = _gpu_profiles()
    claimed = set()
    for prof in profiles:
        want = identify(prof.device.name, memory_gib=prof.device.memory_gib)
        n = prof.device.count
        for name, mib, gpu in REAL:
            assert device_present(prof, _host(name, mib, n)) == (gpu == want), (prof.name, name)
            if gpu == want:
                claimed.add(prof.name)
                assert not device_present(prof, _host(name, mib, n - 1)), (prof.name, "too few GPUs")
                assert device_present(prof, _host(name, mib, n + 1)), (prof.name, "more GPUs than asked")
                # the first `count` GPUs are the ones a runtime uses: a different first GPU is not it
                mixed = [("NVIDIA GeForce RTX 3060", 12037 * MIB)] + _host(name, mib, n)
                assert not device_present(prof, mixed)
    # every shipped GPU profile has a real device name in REAL that is it
    assert claimed == {p.name for p in profiles}


def test_the_confusions_of_the_old_word_match_are_gone():
    """Issue 11: an RTX 3060 counted as the rtx4090 profile's device, an A100-80GB as the H100's,
    and L4 / T4 were never detected."""
    assert not device_present(load_profile("rtx4090-24gb"), _host("NVIDIA GeForce RTX 3060", 12037))
    assert not device_present(load_profile("h100-80gb"), _host("NVIDIA A100-SXM4-80GB", 81251))
    assert not device_present(load_profile("a100-80gb"), _host("NVIDIA A100-SXM4-40GB", 40536))
    assert not device_present(load_profile("h100-80gb"), _host("NVIDIA H100 PCIe", 81559))
    assert device_present(load_profile("l4-24gb"), _host("NVIDIA L4", 22488))
    assert device_present(load_profile("t4-16gb"), _host("Tesla T4", 15109))
    ok, why = device_match(load_profile("rtx4090-24gb"), _host("NVIDIA GeForce RTX 3060", 12037))
    assert not ok and "GeForce RTX 3060 12GB" in why and "1 x GeForce RTX 4090 24GB" in why


def test_cpu_profiles_are_present_only_without_a_gpu():
    prof = load_profile("cpu-2core")
    assert device_present(prof, [])
    assert not device_present(prof, _host("NVIDIA L4", 22488))


def test_a_profile_device_outside_the_table_is_never_present():
    prof = load_profile("l4-24gb").model_copy(deep=True)
    prof.device.name = "NVIDIA Quantum Accelerator 9000"
    ok, why = device_match(prof, _host("NVIDIA L4", 22488))
    assert not ok and "not in fitprune's table of GPUs" in why


def test_profile_auto_is_the_hosts_gpus_or_the_cpu():
    """`--profile auto`: the shipped profile of every GPU the host has, cpu-2core without one, and
    a GPU no profile describes refused in one sentence (never priced as another device)."""
    import pytest

    from compressor.errors import UserError
    from profiles.auto import host_profile, resolve

    gib = 2**30
    assert host_profile([])[0] == "cpu-2core"
    assert host_profile([("NVIDIA A10G", 22 * gib)])[0] == "a10g-24gb"
    assert host_profile([("NVIDIA A10G", 22 * gib)] * 4)[0] == "4xa10g-96gb"
    assert host_profile([("NVIDIA H100 80GB HBM3", 79 * gib)] * 8)[0] == "8xh100-640gb"
    with pytest.raises(UserError, match="No shipped profile describes this host's GPU"):
        host_profile([("NVIDIA B200", 180 * gib)])
    said = []
    assert resolve("a10g-24gb", said.append) == "a10g-24gb" and said == []
    assert resolve("auto", said.append) == "cpu-2core" and "auto: no GPU is visible here" in said[0]  # no GPU here
