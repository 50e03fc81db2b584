"""Provenance of every budget line: measured in the profile's runtime on its device (verified), a
labelled proxy, or predicted; the verdict, the run's exit code and the gate follow it."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from compressor.evaluate.verdict import (
    COMPUTED,
    EXIT_MEETS,
    EXIT_MISSES,
    EXIT_UNVERIFIED,
    MEASURED,
    PREDICTED,
    PROXY,
    budget_lines,
    summary,
)
from compressor.report import gate
from profiles import load_profile
from tests.conftest import assert_clean_failure, run_cli, run_main

PROFILE = load_profile("cpu-2core")  # runtime vllm; budget: TTFT 450 ms, TPOT 100 ms, >= 2 tok/s


def _figures(runtime: str, ttft_ms: float, device: str = "cpu: this host") -> dict:
    return {"runtime": runtime, "device": device, "ttft_s": ttft_ms / 1e3, "tpot_s": 0.03, "throughput_tok_s": 20.0}


def _latency(measured_in: str | None, on_device: bool, ttft_ms: float = 300.0, note: str | None = None) -> dict:
    pred = _figures("vllm", 400.0, device="x86-64 CPU, 2 cores x1 (cpu-2core, vllm)")
    pred.update(memory_gib=1.0, memory={"available_gib": 19.2})
    measured = {"pruned": _figures(measured_in, ttft_ms)} if measured_in else {}
    return {"on_profile_device": on_device, "runtime_note": note, "measured": measured, "predicted": {"pruned": pred}}


def test_lines_measured_in_the_profiles_runtime_on_its_device_are_verified():
    lines = budget_lines(PROFILE, _latency("vllm", on_device=True), {})
    by = {ln["line"]: ln for ln in lines}
    assert by["memory"]["kind"] == COMPUTED and by["memory"]["verified"]
    for name in ("ttft", "tpot", "throughput"):
        assert by[name]["kind"] == MEASURED and by[name]["runtime"] == "vllm" and by[name]["verified"]
    assert by["ttft"]["value"] == pytest.approx(300.0)
    text, code = summary(lines, PROFILE)
    assert code == EXIT_MEETS and text.startswith("meets every budget line, verified in vllm on")


def test_a_proxy_runtime_is_labelled_and_never_verifies():
    note = "the profile's runtime 'vllm' is not available here; measured in torch"
    lines = budget_lines(PROFILE, _latency("torch", on_device=True, note=note), {})
    latency_lines = [ln for ln in lines if ln["line"] in ("ttft", "tpot", "throughput")]
    assert all(ln["kind"] == PROXY and ln["runtime"] == "torch" and not ln["verified"] for ln in latency_lines)
    assert all(ln["why"] == note for ln in latency_lines)
    text, code = summary(lines, PROFILE)
    assert code == EXIT_UNVERIFIED
    assert text == f"not verified in vllm on x86-64 CPU, 2 cores: ttft, tpot, throughput: {note}"


def test_another_host_is_judged_on_the_prediction_and_not_verified():
    lines = budget_lines(PROFILE, _latency("vllm", on_device=False, ttft_ms=1.0), {})
    ttft = next(ln for ln in lines if ln["line"] == "ttft")
    assert ttft["kind"] == PREDICTED and ttft["value"] == pytest.approx(400.0) and not ttft["verified"]
    assert "is not the profile's device" in ttft["why"]
    assert summary(lines, PROFILE)[1] == EXIT_UNVERIFIED


def test_a_missed_line_wins_over_verification():
    lines = budget_lines(PROFILE, _latency("torch", on_device=True, ttft_ms=900.0), {})
    text, code = summary(lines, PROFILE)
    assert code == EXIT_MISSES and text.startswith("misses at least one budget line (ttft); not verified in vllm")


def _report(lines: list[dict], verified: bool) -> dict:
    return {"schema": "fitprune.report/4", "perplexity": {"dense": 18.0, "pruned": 20.0},
            "budget": {"passed": True, "verified": verified, "target": "vllm on x86-64 CPU, 2 cores", "lines": lines}}


def test_the_gate_fails_an_unverified_report_unless_allowed():
    lines = budget_lines(PROFILE, _latency("torch", on_device=True, note="measured in torch"), {})
    rep = _report(lines, verified=False)
    figures = ("latency", "accuracy")  # these reports hold the budget and the perplexity only
    res = gate(rep, rep, allow_missing=figures)
    assert res.exit_code == 1
    assert res.violations == ["budget: not verified in vllm on x86-64 CPU, 2 cores: ttft, tpot, throughput: measured "
                              "in torch (--allow-unverified accepts proxy and predicted figures)"]
    assert gate(rep, rep, allow_unverified=True, allow_missing=figures).exit_code == 0
    ok = _report(budget_lines(PROFILE, _latency("vllm", on_device=True), {}), verified=True)
    assert gate(ok, ok, allow_missing=figures).exit_code == 0


def test_a_report_written_before_provenance_counts_as_not_verified():
    old = {"schema": "fitprune.report/3", "perplexity": {"dense": 18.0, "pruned": 20.0},
           "budget": {"passed": True, "lines": [{"line": "ttft", "value": 100.0, "limit": 450.0, "unit": "ms",
                                                 "ok": True, "kind": "measured", "device": "cpu"}]}}
    res = gate(old, old)
    assert res.exit_code == 1 and "not verified" in res.violations[0]


def _hide_vllm(tmp_path) -> dict:
    """An environment in which `import vllm` fails, as on a machine without the vllm extra."""
    pkg = tmp_path / "hide" / "vllm"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text('raise ImportError("vLLM is hidden from this run by the test")\n')
    return {"PYTHONPATH": os.pathsep.join([str(pkg.parent), os.environ.get("PYTHONPATH", "")])}


FAST = ("--ratio", "0.2", "--nsamples", "4", "--seqlen", "64", "--round-to", "8")


def _loose(tmp_path) -> str:
    """cpu-2core (runtime vLLM, this CPU) with limits no noise on a shared CPU can miss: these tests
    are about where the figures come from, not whether a tiny random model is fast enough."""
    prof = load_profile("cpu-2core").model_dump(exclude={"efficiency"})
    prof["budget"].update(ttft_ms=60_000, tpot_ms=60_000, min_throughput_tok_s=0.01)
    prof["accuracy"].update(max_ppl_increase=10.0, min_task_accuracy=0.01)
    path = tmp_path / "loose.yaml"
    path.write_text(yaml.safe_dump(prof))
    return str(path)


@pytest.mark.slow
def test_without_vllm_the_verdict_is_not_verified_and_the_gate_fails(tmp_path, tiny_model_dir):
    """The issue's case: a vLLM profile on a machine where vLLM cannot be imported measures in torch
    as a labelled proxy, says so on the console, exits 5, and `compress gate` fails the report."""
    import subprocess
    import sys

    out = tmp_path / "o"
    env = {**os.environ, "COLUMNS": "200", **_hide_vllm(tmp_path)}
    p = subprocess.run([sys.executable, "-m", "compressor", str(tiny_model_dir), "--profile", _loose(tmp_path), *FAST,
                        "--out", str(out)], capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == EXIT_UNVERIFIED, p.stderr[-3000:]
    assert "warning: the profile's runtime 'vllm' is not available here" in p.stderr
    assert "verdict: not verified in vllm on x86-64 CPU, 2 cores" in p.stderr
    r = json.loads((out / "report.json").read_text())
    assert r["budget"]["verified"] is False and r["latency"]["runtime"] == "torch"
    for ln in r["budget"]["lines"]:
        if ln["line"] in ("ttft", "tpot", "throughput"):
            assert ln["kind"] == PROXY and ln["runtime"] == "torch" and ln["verified"] is False
    md = (out / "report.md").read_text()
    assert "## Budget: **not verified in vllm" in md and "| proxy | torch |" in md

    g = run_main("gate", str(out), "--baseline", str(out / "report.json"))
    assert g.returncode == 1 and "FAIL budget: not verified in vllm" in g.stdout
    g = run_main("gate", str(out), "--baseline", str(out / "report.json"), "--allow-unverified")
    assert g.returncode == 0, g.stdout + g.stderr


@pytest.mark.slow
def test_runtime_option_asks_for_a_proxy_on_purpose(tmp_path, tiny_model_dir):
    out = tmp_path / "o"
    p = run_cli(str(tiny_model_dir), "--profile", _loose(tmp_path), *FAST, "--runtime", "torch", "--out", str(out))
    assert p.returncode == EXIT_UNVERIFIED, p.stderr[-3000:]
    assert "--runtime torch asked for a proxy of the profile's runtime 'vllm'" in p.stderr
    r = json.loads((out / "report.json").read_text())
    assert {ln["kind"] for ln in r["budget"]["lines"] if ln["line"] in ("ttft", "tpot")} == {PROXY}


def test_an_unknown_runtime_is_refused_before_any_work(tmp_path, tiny_model_dir):
    out = tmp_path / "o"
    p = run_main(str(tiny_model_dir), *FAST, "--runtime", "tensorrt", "--out", str(out))
    assert_clean_failure(p, out, "Unknown --runtime 'tensorrt'")


# The other case, the main command on a vLLM profile with vLLM installed measuring every latency
# line in vLLM (verified, exit 0, the gate passes), is tests/test_ci_example.py's step-by-step run of the
# example workflow on the embedded model.
