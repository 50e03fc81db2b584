"""Profiles: every shipped YAML validates; bad input (malformed YAML, unknown keys, negative
budgets, impossible workloads) is one clear sentence and a non-zero exit; a path works wherever a
name does."""

from __future__ import annotations

import pytest
import yaml

from compressor.errors import UserError
from profiles import list_profiles, load_profile
from tests.conftest import run_main

REQUIRED = ("a10g-24gb", "l4-24gb", "t4-16gb", "rtx4090-24gb", "a100-40gb", "a100-80gb", "h100-80gb", "cpu-2core")


def _one_error(p, match: str) -> None:
    assert p.returncode != 0
    assert "Traceback" not in p.stderr + p.stdout
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, p.stderr
    assert match in " ".join(p.stderr.split()), p.stderr


def _profile_dict(**budget) -> dict:
    d = load_profile("a10g-24gb").model_dump(exclude={"efficiency"})
    d["name"] = "mine"
    d["budget"].update(budget)
    return d


def _write(tmp_path, data, name="mine.yaml"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_the_required_profiles_ship_and_validate():
    names = list_profiles()
    for name in REQUIRED:
        assert name in names
    cpu = [n for n in names if load_profile(n).device.kind == "cpu"]
    assert cpu, "a profile for this kind of 2-core machine"
    for name in names:
        p = load_profile(name)
        assert p.name == name
        assert p.workload.prompt_tokens + p.workload.output_tokens <= p.workload.max_context


def test_validate_command_accepts_shipped_files():
    from profiles.schema import HERE

    p = run_main("profiles", "validate", str(HERE / "cpu-2core.yaml"))
    assert p.returncode == 0 and "valid profile 'cpu-2core'" in p.stdout


def test_a_path_works_wherever_a_name_does(tmp_path):
    path = _write(tmp_path, _profile_dict(tpot_ms=12.5))
    assert load_profile(str(path)).budget.tpot_ms == 12.5
    p = run_main("profiles", "show", str(path))
    assert p.returncode == 0 and "tpot_ms: 12.5" in p.stdout
    p = run_main("plan", "--profile", str(path), "--no-calibrate")
    assert p.returncode == 0, p.stderr
    assert "choice" in p.stdout


def test_malformed_yaml(tmp_path):
    path = _write(tmp_path, "name: x\ndevice: [unclosed\n  memory_gib: 3\n")
    with pytest.raises(UserError, match="not valid YAML at line"):
        load_profile(str(path))
    _one_error(run_main("profiles", "validate", str(path)), "not valid YAML")


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = _write(tmp_path, "- just\n- a list\n")
    _one_error(run_main("profiles", "validate", str(path)), "must be a YAML mapping")


@pytest.mark.parametrize("where", ["top", "device", "budget"])
def test_unknown_keys_are_refused(tmp_path, where):
    d = _profile_dict()
    target = d if where == "top" else d[where]
    target["tflops_typo"] = 3
    path = _write(tmp_path, d)
    loc = "tflops_typo" if where == "top" else f"{where}.tflops_typo"
    with pytest.raises(UserError, match=f"invalid: {loc}: unknown key"):
        load_profile(str(path))
    if where == "device":  # and once through the command line
        _one_error(run_main("profiles", "validate", str(path)), f"{loc}: unknown key")


@pytest.mark.parametrize("key", ["ttft_ms", "tpot_ms", "min_throughput_tok_s", "memory_headroom"])
def test_negative_budgets_are_refused(tmp_path, key):
    path = _write(tmp_path, _profile_dict(**{key: -1}))
    with pytest.raises(UserError, match=f"budget.{key}: input should be greater than"):
        load_profile(str(path))
    if key == "tpot_ms":
        _one_error(run_main("plan", "--profile", str(path), "--no-calibrate"), f"budget.{key}")


def test_negative_device_figures_are_refused(tmp_path):
    d = _profile_dict()
    d["device"]["bandwidth_gbs"] = -600
    _one_error(run_main("profiles", "validate", str(_write(tmp_path, d))), "device.bandwidth_gbs")


def test_workload_longer_than_the_context_is_refused(tmp_path):
    d = _profile_dict()
    d["workload"].update(max_context=256, prompt_tokens=200, output_tokens=100)
    _one_error(run_main("profiles", "validate", str(_write(tmp_path, d))), "exceed max_context (256)")


def test_missing_profile_file_and_unknown_name(tmp_path):
    _one_error(run_main("profiles", "show", str(tmp_path / "nope.yaml")), "does not exist")
    _one_error(run_main("plan", "--profile", "no-such-gpu", "--no-calibrate"), "Unknown profile 'no-such-gpu'")
