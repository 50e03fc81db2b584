"""`compress gate`: passes against its own baseline, fails (exit 1, one line per violated rule)
against a baseline that is faster or more accurate than allowed, and exits 2 on unreadable input."""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from compressor.errors import UserError
from compressor.report import EXIT_BAD_INPUT, EXIT_PASS, EXIT_VIOLATED, gate, parse_fraction
from profiles import load_profile
from tests.conftest import run_cli

HOST = "cpu: Test CPU (2 threads)"


def _cloze(acc: float, n: int = 600, items: str | None = "d1", per_item: bool = True) -> dict:
    """Cloze scores as a report holds them: right answers first, so two scores of the same item set
    differ only in the items between their two accuracies (paired: lost or gained)."""
    k = round(acc * n)
    d = {"cloze_acc": k / n, "cloze_n": n}
    if per_item:
        d |= {"cloze_correct": "1" * k + "0" * (n - k), "cloze_items": items}
    return d


def _report(tpot=0.05, ttft=0.4, tput=30.0, ppl=20.0, acc=0.6, device=HOST, runtime="torch", cloze=None) -> dict:
    m = {"runtime": runtime, "device": device, "ttft_s": ttft, "tpot_s": tpot, "throughput_tok_s": tput,
         "kind": "measured"}
    return {"schema": "fitprune.report/2", "perplexity": {"dense": 18.0, "pruned": ppl},
            "latency": {"measured": {"pruned": m}},
            "accuracy": {"lm_eval": {"pruned": cloze or _cloze(acc), "dense": _cloze(0.62)}},
            "budget": {"passed": True, "verified": True, "lines": []}}


def test_a_report_passes_against_itself():
    r = _report()
    res = gate(r, copy.deepcopy(r))
    assert res.exit_code == EXIT_PASS and not res.violations
    assert {"TTFT", "TPOT", "throughput", "perplexity", "cloze accuracy"} <= set(res.checked)


def test_within_the_allowed_regression_passes():
    assert gate(_report(tpot=0.0524), _report(tpot=0.05), max_latency_regression=0.05).exit_code == EXIT_PASS


def test_a_slower_report_fails_with_one_line_per_rule():
    res = gate(_report(tpot=0.06, tput=20.0), _report(), max_latency_regression=0.05)
    assert res.exit_code == EXIT_VIOLATED
    assert len(res.violations) == 2
    assert res.violations[0].startswith("latency: TPOT 60.00 ms is +20.0%")
    assert res.violations[1].startswith("latency: throughput 20.00 tok/s")


def test_accuracy_drops_fail():
    res = gate(_report(ppl=21.0, acc=0.5), _report(), max_accuracy_drop=0.02)
    assert [v.split(":")[0] for v in res.violations] == ["accuracy", "accuracy"]
    assert "perplexity 21.000 is +5.0%" in res.violations[0]
    assert res.violations[1].startswith("accuracy: lm-eval cloze accuracy 0.500 is -16.7% against the baseline's 0.600")
    assert "change -10.0 points, 95% CI -12.4 to -7.6 (paired over the same 600 items)" in res.violations[1]
    assert gate(_report(ppl=21.0, acc=0.5), _report(), max_accuracy_drop=0.2).exit_code == EXIT_PASS


def test_a_small_paired_change_passes_and_a_resolved_one_fails():
    """600 items scored by both reports: 3 items lost (-0.5 points) is within the allowed 2% (1.2
    points) with statistical support; 30 lost (-5 points) is beyond it with support."""
    assert gate(_report(acc=0.595), _report(acc=0.6)).exit_code == EXIT_PASS
    res = gate(_report(acc=0.55), _report(acc=0.6))
    assert res.violations == ["accuracy: lm-eval cloze accuracy 0.550 is -8.3% against the baseline's 0.600: change "
                              "-5.0 points, 95% CI -6.8 to -3.2 (paired over the same 600 items); allowed -2.0% = "
                              "-1.2 points"]


def test_too_few_items_to_resolve_the_drop_is_said_plainly():
    """A report of the former 40-item task (no per-item results) against itself: one flipped item
    moves its accuracy by 2.5 points, so the items cannot resolve a 2% drop. A measured change within
    the allowance passes (a report always passes against itself) and the PASS line says what the
    items resolve; a measured drop beyond it fails and says the items cannot tell."""
    old = _cloze(0.6, n=40, per_item=False)
    res = gate(_report(cloze=old), _report(cloze=old))
    assert res.exit_code == EXIT_PASS, res.violations
    assert "cloze accuracy (40 items cannot resolve a 2.0% drop, the smallest drop they resolve is 35.0%)" in \
        res.checked
    res = gate(_report(cloze=_cloze(0.58, n=40, per_item=False)), _report(cloze=old))
    assert len(res.violations) == 1, res.violations
    v = res.violations[0]
    assert v.startswith("accuracy: lm-eval cloze accuracy 0.575 is -4.2% against the baseline's 0.600, beyond the "
                        "allowed drop, and 40 cloze items cannot tell whether it is: change -2.5 points"), v
    assert "the smallest drop they resolve is 35.1%" in v and "not paired" in v
    assert gate(_report(cloze=old), _report(cloze=old), max_accuracy_drop=0.4).exit_code == EXIT_PASS
    # unpaired, a drop far beyond the allowed one is still found
    res = gate(_report(cloze=_cloze(0.3, per_item=False)), _report(cloze=_cloze(0.6, per_item=False)))
    assert res.violations[0].startswith("accuracy: lm-eval cloze accuracy 0.300 is -50.0%") and "not paired" in \
        res.violations[0]


def test_reports_on_different_items_are_not_paired():
    res = gate(_report(cloze=_cloze(0.6, items="python3.12")), _report(cloze=_cloze(0.6, items="python3.11")))
    assert res.exit_code == EXIT_PASS
    assert any(c.startswith("cloze accuracy (600 items cannot resolve a 2.0% drop") for c in res.checked), res.checked
    res = gate(_report(cloze=_cloze(0.58, items="python3.12")), _report(cloze=_cloze(0.6, items="python3.11")))
    assert res.violations and "600 cloze items cannot tell" in res.violations[0]
    assert "600 and 600 items, not paired" in res.violations[0]
    assert gate(_report(cloze=_cloze(0.6)), _report(cloze=_cloze(0.6))).exit_code == EXIT_PASS


def test_a_cloze_accuracy_without_an_item_count_cannot_be_judged():
    res = gate(_report(), _report(cloze={"cloze_acc": 0.6}))
    assert res.violations == ["accuracy: the baseline's lm-eval cloze accuracy has no item count, so a 2.0% drop "
                              "cannot be judged; refresh it with this version of fitprune"]


def test_measurements_from_different_hosts_are_not_compared():
    res = gate(_report(), _report(device="cuda: NVIDIA A10G"))
    assert res.exit_code == EXIT_BAD_INPUT and "not comparable" in res.unjudged[0] and not res.violations


def test_the_reports_own_budget_verdict_counts_unless_disabled():
    r = _report()
    r["budget"] = {"passed": False, "verified": True,
                   "lines": [{"line": "tpot", "value": 120.0, "limit": 100.0, "unit": "ms", "ok": False,
                              "kind": "measured", "device": HOST, "verified": True}]}
    res = gate(r, _report())
    assert res.violations == [f"budget: tpot 120 ms is above the profile's limit 100 (measured on {HOST})"]
    assert gate(r, _report(), check_budget=False).exit_code == EXIT_PASS


@pytest.mark.parametrize("text,value", [("5%", 0.05), ("0.05", 0.05), ("12.5%", 0.125), ("0", 0.0)])
def test_fractions(text, value):
    assert parse_fraction(text, "--x") == pytest.approx(value)


@pytest.mark.parametrize("text,match", [("five", "percentage like 5%"), ("5", "ambiguous"), ("-1%", "negative")])
def test_bad_fractions(text, match):
    with pytest.raises(UserError, match=match):
        parse_fraction(text, "--x")


def test_gate_command_exit_codes(tmp_path):
    base, slow = tmp_path / "base.json", tmp_path / "slow.json"
    base.write_text(json.dumps(_report()))
    slow.write_text(json.dumps(_report(tpot=0.08, ttft=0.5)))
    p = run_cli("gate", str(slow), "--baseline", str(base), "--max-latency-regression", "10%")
    assert p.returncode == EXIT_VIOLATED
    fails = [line for line in p.stdout.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 2 and "TTFT" in fails[0] and "TPOT" in fails[1]
    (tmp_path / "bad.json").write_text("{not json")
    p = run_cli("gate", str(tmp_path / "bad.json"), "--baseline", str(base))
    assert p.returncode == EXIT_BAD_INPUT and "not valid JSON" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.slow
@pytest.mark.integration
def test_gate_on_a_real_run(tmp_path, tiny_model_dir):
    """A real run on a tiny model (measured in torch on this CPU, which is the profile's device):
    the report passes against itself and fails against a baseline 1.5x faster than it."""
    prof = load_profile("cpu-2core").model_dump(exclude={"efficiency"})
    prof.update(name="tiny-cpu", runtime="torch", dtype="float32", round_to=8)
    prof["workload"].update(max_context=64, concurrency=2, prompt_tokens=16, output_tokens=4)
    prof["budget"] = {"memory_headroom": 0.2, "ttft_ms": 60_000, "tpot_ms": 60_000, "min_throughput_tok_s": 0.01}
    prof["accuracy"] = {"max_ppl_increase": 10.0, "min_task_accuracy": 0.01}  # a random tiny model's cloze is chance
    path = tmp_path / "tiny-cpu.yaml"
    path.write_text(yaml.safe_dump(prof))
    out = tmp_path / "o"
    p = run_cli(str(tiny_model_dir), "--profile", str(path), "--ratio", "0.3", "--nsamples", "4", "--seqlen", "32",
                "--out", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["perplexity"]["precision"] == ""  # a float32 profile: judged as the weights are
    lat = report["latency"]
    assert lat["on_profile_device"] is True and lat["runtime"] == "torch"
    tpot_line = next(ln for ln in report["budget"]["lines"] if ln["line"] == "tpot")
    assert tpot_line["kind"] == "measured" and tpot_line["value"] == pytest.approx(
        lat["measured"]["pruned"]["tpot_s"] * 1e3)

    p = run_cli("gate", str(out), "--baseline", str(out / "report.json"))
    assert p.returncode == EXIT_PASS, p.stdout + p.stderr
    assert p.stdout.startswith("PASS")

    faster = copy.deepcopy(report)
    m = faster["latency"]["measured"]["pruned"]
    m["ttft_s"] /= 1.5
    m["tpot_s"] /= 1.5
    m["throughput_tok_s"] *= 1.5
    base = tmp_path / "faster-baseline.json"
    base.write_text(json.dumps(faster))
    p = run_cli("gate", str(out), "--baseline", str(base), "--max-latency-regression", "5%")
    assert p.returncode == EXIT_VIOLATED
    fails = [line for line in p.stdout.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 3 and all("+50.0%" in f or "-33.3%" in f for f in fails), p.stdout


def test_what_the_gate_cannot_judge_exits_2_never_0():
    """No budget section (unless --no-budget), a baseline of another model, nothing in common: exit 2,
    told apart from a regression (1); a PASS never leaves the budget off silently."""
    r = _report()
    del r["budget"]
    res = gate(r, _report())
    assert res.exit_code == EXIT_BAD_INPUT and "no budget section" in res.unjudged[0]
    assert gate(r, _report(), check_budget=False).exit_code == EXIT_PASS
    a, b = _report(), _report()
    a["params"] = {"before": {"total": 135}, "after": {"total": 100}, "achieved_ratio_decoder": 0.3,
                   "achieved_ratio_total": 0.26}
    b["params"] = {**a["params"], "before": {"total": 8030}}
    res = gate(a, b)
    assert res.exit_code == EXIT_BAD_INPUT and "another model" in res.unjudged[0]
    bare = {"schema": "fitprune.report/2", "budget": {"passed": True, "verified": True, "lines": []}}
    assert "nothing to compare" in gate(bare, bare, check_budget=False).unjudged[0]
    assert "nothing to compare" in gate(bare, bare, check_budget=False, allow_missing=(
        "latency", "perplexity", "accuracy")).unjudged[0]
    slow = _report(tpot=0.08)
    del slow["budget"]
    assert gate(slow, _report()).exit_code == EXIT_VIOLATED  # a regression still says so


@pytest.mark.parametrize("text", ["[" * 5000 + "]" * 5000,
                                  '{"schema": "fitprune.report/2", "seed": 1' + "0" * 5000 + "}",
                                  '{"schema": "fitprune.report/2", "x": ' + "[" * 900 + "]" * 900 + "}"])
def test_hostile_json_is_exit_2_in_one_sentence(tmp_path, text, capsys):
    from compressor.cli import main

    base = tmp_path / "base.json"
    base.write_text(json.dumps(_report()))
    (tmp_path / "bad.json").write_text(text)
    assert main(["gate", str(tmp_path / "bad.json"), "--baseline", str(base)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err


@pytest.mark.parametrize("section, drop", [
    ("latency", lambda r: r.pop("latency")),
    ("perplexity", lambda r: r["perplexity"].pop("pruned")),
    ("accuracy", lambda r: r["accuracy"]["lm_eval"].update(pruned={"skipped": "out of core"})),
    ("budget", lambda r: r.pop("budget")),
])
def test_a_section_neither_report_holds_is_named_and_exits_2_unless_allowed(section, drop):
    """The gate never passes what it did not judge: a section missing from both reports (or only from
    the baseline) is named, exit 2; --allow-missing SECTION lets it pass on the rest; a report that
    lost what its baseline has is a regression (1)."""
    r, b = _report(), _report()
    drop(r)
    drop(b)
    res = gate(r, b)
    assert res.exit_code == EXIT_BAD_INPUT and not res.violations
    assert any(u.startswith(f"{section}:") for u in res.unjudged), res.unjudged
    assert gate(r, b, allow_missing=(section,)).exit_code == EXIT_PASS
    assert gate(r, _report(), allow_missing=(section,)).exit_code == (
        EXIT_PASS if section == "budget" else EXIT_VIOLATED)  # the report lost what the baseline has


def test_allow_missing_takes_only_a_sections_name(tmp_path):
    from compressor.cli import main

    path = tmp_path / "r.json"
    path.write_text(json.dumps(_report()))
    assert main(["gate", str(path), "--baseline", str(path), "--allow-missing", "latency"]) == EXIT_PASS
    assert main(["gate", str(path), "--baseline", str(path), "--allow-missing", "speed"]) == EXIT_BAD_INPUT
