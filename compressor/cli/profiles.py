"""`compress profiles list | show | validate`: the hardware profiles."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from . import app

out = Console()
profiles = typer.Typer(help="List, show and validate hardware profiles.", no_args_is_help=True)
app.add_typer(profiles, name="profiles")


@profiles.command("list", help="List the shipped profiles.")
def profiles_list():
    from profiles import list_profiles, load_profile

    t = Table(title="shipped profiles")
    for c in ("name", "device", "memory GiB", "runtime", "dtype", "round_to"):
        t.add_column(c)
    for name in list_profiles():
        p = load_profile(name)
        t.add_row(p.name, p.device.name, f"{p.device.memory_gib:g} x {p.device.count}", p.runtime, p.dtype, str(p.round_to))
    out.print(t)


@profiles.command("show", help="Print a profile (a name or a path) as validated YAML.")
def profiles_show(name: str):
    import yaml

    from profiles import load_profile

    out.print(yaml.safe_dump(load_profile(name).model_dump(), sort_keys=False), markup=False, highlight=False)


@profiles.command("validate", help="Validate a profile YAML file; exit 0 when valid.")
def profiles_validate(path: str):
    from profiles import load_profile

    p = load_profile(path)
    out.print(f"{path}: valid profile '{p.name}'")


