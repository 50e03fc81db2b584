"""The cost model and the planner: widths at a ratio, hand-checked memory, monotonicity, the choice,
infeasible budgets (one sentence, exit 3), and the main job taking the plan's ratio."""

from __future__ import annotations

import json

import pytest
import yaml

from compressor.budget.planner import GRID, InfeasibleBudget, NothingToPrune, arch_at_ratio, make_plan, plan_for_run
from compressor.errors import UserError
from profiles import list_profiles, load_profile
from profiles.costmodel import Arch, CostModel
from tests.conftest import run_cli

SMOLLM2 = Arch(hidden=576, vocab=49152, head_dim=64, q_heads=(9,) * 30, kv_heads=(3,) * 30,
               intermediate=(1536,) * 30, tied_embeddings=True)
LLAMA_8B = Arch(hidden=4096, vocab=128256, head_dim=128, q_heads=(32,) * 32, kv_heads=(8,) * 32,
                intermediate=(14336,) * 32, tied_embeddings=False)


def _profile(base: str = "a10g-24gb", **changes):
    d = load_profile(base).model_dump(exclude={"efficiency"})
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            d[section][field] = value
        else:
            d[section] = value
    from profiles.schema import Profile

    return Profile.model_validate(d)


def test_arch_reads_a_config_with_per_layer_widths():
    cfg = {"hidden_size": 64, "vocab_size": 100, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128,
           "layer_num_attention_heads": [4, 2], "layer_num_key_value_heads": [2, 1],
           "layer_intermediate_size": [128, 64], "tie_word_embeddings": False}
    a = Arch.from_config(cfg)
    assert a.q_heads == (4, 2) and a.kv_heads == (2, 1) and a.intermediate == (128, 64)
    assert a.decoder_params == 64 * 16 * (2 * 4 + 2 * 2) + 3 * 64 * 128 + 64 * 16 * (2 * 2 + 2 * 1) + 3 * 64 * 64
    assert a.total_params == a.decoder_params + 2 * 100 * 64


def test_memory_by_hand_for_an_8b_model_on_a10g():
    prof = load_profile("a10g-24gb")
    m = CostModel(prof).memory(LLAMA_8B)
    params = 32 * (4096 * 128 * (2 * 32 + 2 * 8) + 3 * 4096 * 14336) + 2 * 128256 * 4096
    assert m.weights_gib == pytest.approx(params * 2 / 2**30)
    kv = 2 * 32 * 8 * 128 * 2 * prof.workload.max_context * prof.workload.concurrency
    assert m.kv_cache_gib == pytest.approx(kv / 2**30)
    assert m.available_gib == pytest.approx(24 * 0.9)
    assert not m.fits  # 15 GiB of weights + 8 GiB of KV cache + overhead do not fit in 21.6 GiB


def test_widths_at_a_ratio_are_valid_and_aligned():
    for ratio in GRID[1:]:
        a = arch_at_ratio(SMOLLM2, ratio, "auto", 64)
        for q, kv, i in zip(a.q_heads, a.kv_heads, a.intermediate, strict=True):
            assert q % kv == 0 and kv == 3 and q >= 3  # query slices: KV heads stay
            assert i % 64 == 0 and 64 <= i <= 1536
        removed = 1 - a.decoder_params / SMOLLM2.decoder_params
        assert abs(removed - ratio) < 0.07, (ratio, removed)
    kv_mode = arch_at_ratio(LLAMA_8B, 0.5, "kv", 128)
    assert kv_mode.kv_heads[0] == 4 and kv_mode.q_heads[0] == 16


@pytest.mark.parametrize("profile", list_profiles())
@pytest.mark.parametrize("arch", [SMOLLM2, LLAMA_8B], ids=["smollm2", "llama8b"])
def test_predictions_are_monotone_in_the_ratio(profile, arch):
    prof = load_profile(profile)
    if arch is SMOLLM2 and prof.device.count == 8:  # 9 query heads: no shape of them splits over 8 devices
        with pytest.raises(UserError, match="cannot be pruned to a shape vLLM splits over 8 devices"):
            make_plan(prof, arch)
        return
    plan = make_plan(prof, arch)
    rows = plan.rows
    assert [r.ratio for r in rows] == list(GRID)
    for a, b in zip(rows, rows[1:], strict=False):
        pa, pb = a.prediction, b.prediction
        assert b.arch.total_params <= a.arch.total_params
        assert pb.memory.total_gib <= pa.memory.total_gib
        assert pb.ttft_s <= pa.ttft_s and pb.tpot_s <= pa.tpot_s
        assert pb.throughput_tok_s >= pa.throughput_tok_s
    assert rows[-1].prediction.tpot_s < rows[0].prediction.tpot_s


def test_tighter_budgets_never_choose_a_smaller_ratio():
    a100 = load_profile("a100-80gb").device.model_dump()
    dense = make_plan(_profile(device=a100), LLAMA_8B, grid=(0.0,)).rows[0].prediction
    chosen = []
    for factor in (1.01, 0.95, 0.9, 0.8, 0.7, 0.6):
        prof = _profile(budget={"memory_headroom": 0.0, "tpot_ms": dense.tpot_s * 1e3 * factor}, device=a100)
        plan = make_plan(prof, LLAMA_8B)
        chosen.append(plan.chosen.ratio if plan.feasible else 1.0)
        if plan.feasible:
            assert plan.chosen.prediction.tpot_s * 1e3 <= dense.tpot_s * 1e3 * factor
            earlier = [r for r in plan.rows if r.ratio < plan.chosen.ratio]
            assert all(not r.ok for r in earlier)  # the smallest such ratio
    assert chosen == sorted(chosen) and chosen[0] == 0.0 and chosen[-2] > 0


def test_an_8b_model_on_a10g_needs_pruning_for_memory():
    plan = make_plan(load_profile("a10g-24gb"), LLAMA_8B)
    assert plan.feasible and plan.chosen.ratio > 0
    assert not plan.rows[0].ok and plan.rows[0].violations[0].line == "memory"
    assert plan.chosen.prediction.memory.fits


def test_an_infeasible_budget_names_the_closest_ratio():
    prof = _profile(budget={"memory_headroom": 0.1, "tpot_ms": 0.01})
    plan = make_plan(prof, SMOLLM2)
    assert not plan.feasible
    sentence = plan.infeasible_sentence()
    assert "infeasible" in sentence and f"{plan.closest.ratio:.2f}" in sentence and "time per output token" in sentence
    assert plan.closest.ratio == max(GRID)  # the fastest is the closest to a latency line


def test_plan_for_run_refuses_infeasible_and_needless_pruning(smollm2_dir):
    with pytest.raises(InfeasibleBudget) as exc:
        plan_for_run(_profile(budget={"tpot_ms": 0.01}), str(smollm2_dir), "auto", 64, say=lambda *_: None)
    assert exc.value.exit_code == 3
    with pytest.raises(NothingToPrune, match="already meets every budget line"):
        plan_for_run(_profile(), str(smollm2_dir), "auto", 64, say=lambda *_: None)


def test_plan_command_on_an_infeasible_budget_exits_3_with_one_sentence(tmp_path):
    path = tmp_path / "tight.yaml"
    d = load_profile("a10g-24gb").model_dump(exclude={"efficiency"})
    d["budget"]["tpot_ms"] = 0.01
    path.write_text(yaml.safe_dump(d))
    p = run_cli("plan", "--profile", str(path), "--no-calibrate", "--json", str(tmp_path / "plan.json"))
    assert p.returncode == 3, p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "infeasible" in errors[0] and "Traceback" not in p.stderr
    assert "0.70" in p.stdout  # the table is printed before the verdict
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["feasible"] is False and plan["closest_ratio"] == 0.7 and len(plan["rows"]) == len(GRID)


@pytest.mark.slow
@pytest.mark.integration
def test_main_job_takes_the_plans_ratio(tmp_path, tiny_model_dir):
    """A profile of a device that is not here (no calibration, deterministic predictions) whose TPOT
    budget the dense model misses: the run prunes at the plan's ratio and says so in its report."""
    from compressor.budget.planner import read_config
    from profiles.costmodel import Arch

    base = load_profile("a10g-24gb").model_dump(exclude={"efficiency"})
    base.update(name="tiny-gpu", runtime="torch", dtype="float32", round_to=8)
    base["workload"].update(max_context=64, concurrency=2, prompt_tokens=16, output_tokens=4)
    base["budget"] = {"memory_headroom": 0.1, "ttft_ms": None, "tpot_ms": None, "min_throughput_tok_s": None}
    from profiles.schema import Profile

    arch = Arch.from_config(read_config(str(tiny_model_dir))[0])
    rows = make_plan(Profile.model_validate(base), arch).rows
    target = next(r for r in rows if r.ratio >= 0.3)
    dense_ms, target_ms = rows[0].prediction.tpot_s * 1e3, target.prediction.tpot_s * 1e3
    base["budget"]["tpot_ms"] = target_ms + 0.1 * (dense_ms - target_ms)  # dense misses it, 0.3 meets it
    prof = tmp_path / "tiny-gpu.yaml"
    prof.write_text(yaml.safe_dump(base))
    expected = make_plan(Profile.model_validate(base), arch).chosen.ratio
    assert 0 < expected <= 0.3

    out = tmp_path / "o"
    p = run_cli(str(tiny_model_dir), "--profile", str(prof), "--width-only", "--nsamples", "4", "--seqlen", "32",
                "--out", str(out))
    assert p.returncode == 5, p.stderr[-3000:]  # a GPU profile on this CPU: judged on predictions, not verified
    assert f"plan: ratio {expected:.2f}" in " ".join(p.stderr.split())
    r = json.loads((out / "report.json").read_text())
    assert r["schema"] == "fitprune.report/5"
    assert r["method"]["ratio_requested"] == expected and r["plan"]["chosen_ratio"] == expected
    lat = r["latency"]
    assert lat["on_profile_device"] is False and lat["runtime"] == "torch"
    assert lat["measured"]["pruned"]["kind"] == "measured" and lat["predicted"]["pruned"]["kind"] == "predicted"
    assert "not** this machine" in (out / "report.md").read_text()
    assert (out / "report.png").stat().st_size > 10_000
    assert {ln["line"] for ln in r["budget"]["lines"]} >= {"memory", "tpot", "perplexity_increase"}


def test_plan_command_ends_with_the_command_that_executes_its_choice(smollm2_dir, capsys):
    from compressor.cli import main

    assert main(["plan", str(smollm2_dir), "--profile", "cpu-2core", "--no-fit", "--width-only"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    ratio = out.split("choice: ratio ")[1].split()[0]
    assert float(ratio) > 0 and f"run it: compress --profile cpu-2core {smollm2_dir} --ratio {ratio}" in out
