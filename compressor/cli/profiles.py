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

    p = load_profile(name)
    out.print(yaml.safe_dump(p.model_dump(), sort_keys=False), markup=False, highlight=False)
    out.print("what the fields mean:", highlight=False)
    for field, meaning in field_meanings(type(p)):
        out.print(f"  {field}: {meaning}", markup=False, highlight=False)


def field_meanings(model, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted field name, description) of every described field of a profile's schema."""
    rows = []
    for name, f in model.model_fields.items():
        sub = f.annotation if isinstance(f.annotation, type) and hasattr(f.annotation, "model_fields") else None
        if sub is not None:
            rows += field_meanings(sub, f"{prefix}{name}.")
        elif f.description:
            rows.append((prefix + name, " ".join(f.description.split())))
    return rows


@profiles.command("init", help="Write a profile to edit, copied from a shipped one (or a YAML file).")
def profiles_init(
    name: str = typer.Argument(..., help="The new profile's name (also the file name, NAME.yaml)."),
    source: str = typer.Option("a10g-24gb", "--from", help="The profile to start from."),
    out_dir: str = typer.Option(".", "--dir", help="Folder to write NAME.yaml into."),
):
    import re
    from pathlib import Path

    import yaml

    from profiles import load_profile

    from ..errors import UserError

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise UserError(f"The profile name '{name}' must be letters, digits, '.', '_' or '-'.")
    path = Path(out_dir).expanduser() / f"{name}.yaml"
    if path.exists():
        raise UserError(f"{path} exists already; choose another name or remove it.")
    data = load_profile(source).model_dump(exclude={"efficiency"})
    data["name"] = name
    data["description"] = f"copied from {source}: edit device, workload and budget for your hardware"
    try:
        with open(path, "x") as f:
            f.write(f"# made by `compress profiles init {name} --from {source}`; `compress profiles show {source}` "
                    "explains the fields\n" + yaml.safe_dump(data, sort_keys=False))
    except OSError as exc:
        raise UserError(f"{path} could not be written ({exc.strerror or exc}).") from exc
    out.print(f"wrote {path}; use it with --profile {path}", highlight=False)


@profiles.command("validate", help="Validate a profile YAML file; exit 0 when valid.")
def profiles_validate(path: str):
    from profiles import load_profile

    p = load_profile(path)
    out.print(f"{path}: valid profile '{p.name}'")


