"""`--profile auto`: the shipped profile of the GPUs this host has, else the CPU profile."""

from __future__ import annotations

from compressor.errors import UserError

AUTO = "auto"
CPU_PROFILE = "cpu-2core"


def host_profile(host: list[tuple[str, int]] | None = None) -> tuple[str, str]:
    """(profile name, sentence saying why) for this host: the shipped GPU profile whose device is
    the host's GPU product and memory class, for as many of them as the host has (the largest such
    count); `cpu-2core` without a GPU. A GPU no shipped profile describes is refused in one
    sentence, never priced as another device. `host`: (name, total memory bytes) per GPU."""
    from .gpus import host_gpus, match
    from .schema import list_profiles, load_profile

    if host is None:
        host = host_gpus()
    if not host:
        return CPU_PROFILE, "no GPU is visible here"
    fits = []
    for name in list_profiles():
        p = load_profile(name)
        if p.device.kind != "cpu" and p.device.count <= len(host):
            ok, why = match(p.device.name, p.device.memory_gib, p.device.count, host)
            if ok:
                fits.append((p.device.count, name, why))
    if not fits:
        raise UserError(f"No shipped profile describes this host's GPU ({host[0][0]}, "
                        f"{host[0][1] / 2**30:.0f} GiB); pass --profile with a name from `compress profiles list` "
                        "or your own YAML file (`compress profiles show a10g-24gb` shows the fields).")
    count, name, why = max(fits)
    return name, why


def resolve(name_or_path: str, say=None) -> str:
    """`name_or_path`, or for `auto` the host's profile (printed with the reason when `say` is given)."""
    if name_or_path != AUTO:
        return name_or_path
    name, why = host_profile()
    if say is not None:
        say(f"profile [cyan]{name}[/] (auto: {why})")
    return name
