"""The cost model and the width-only plan (the lever frontier restricted to width): widths at a
ratio, hand-checked memory, monotonicity, the choice, infeasible budgets (one sentence, exit 3),
needless pruning (exit 4), and the main job taking the plan's ratio."""

from __future__ import annotations

import json

import pytest
import yaml

from compressor.budget.frontier import predict, search
from compressor.budget.latency_table import datasheet_table
from compressor.budget.planner import GRID, arch_at_ratio
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


def _config(arch: Arch) -> dict:
    """A Llama config of `arch`'s (uniform) shape: what the plan reads."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": arch.hidden,
            "intermediate_size": arch.intermediate[0], "num_attention_heads": arch.q_heads[0],
            "num_key_value_heads": arch.kv_heads[0], "num_hidden_layers": arch.layers, "vocab_size": arch.vocab,
            "head_dim": arch.head_dim, "tie_word_embeddings": arch.tied_embeddings}


def _width_only(prof, arch: Arch, grid: tuple[float, ...] = GRID):
    """The width-only plan: the lever frontier in the profile's dtype with no layer dropped."""
    table = datasheet_table(prof, _config(arch), ["none"])
    return search(prof, arch, table, CostModel(prof), ["none"], grid=grid, max_dropped=0)


@pytest.mark.parametrize("profile", list_profiles())
@pytest.mark.parametrize("arch", [SMOLLM2, LLAMA_8B], ids=["smollm2", "llama8b"])
def test_predictions_are_monotone_in_the_ratio(profile, arch):
    prof = load_profile(profile)
    if arch is SMOLLM2 and prof.device.count == 8:  # 9 query heads: no shape of them splits over 8 devices
        with pytest.raises(UserError, match="cannot be pruned to a shape vLLM splits over 8 devices"):
            arch_at_ratio(arch, 0.2, "auto", prof.round_to, prof.tensor_parallel)
        return
    cost, table = CostModel(prof), datasheet_table(prof, _config(arch), ["none"])
    archs = [arch_at_ratio(arch, r, "auto", prof.round_to, prof.tensor_parallel) for r in GRID]
    preds = [predict(cost, table, a, "none") for a in archs]
    for a, b, pa, pb in zip(archs, archs[1:], preds, preds[1:], strict=False):
        assert b.total_params <= a.total_params
        assert pb.memory.total_gib <= pa.memory.total_gib
        assert pb.ttft_s <= pa.ttft_s and pb.tpot_s <= pa.tpot_s
        assert pb.throughput_tok_s >= pa.throughput_tok_s
    assert preds[-1].tpot_s < preds[0].tpot_s


def test_tighter_budgets_never_choose_a_smaller_ratio():
    a100 = load_profile("a100-80gb").device.model_dump()
    prof = _profile(device=a100)
    dense = predict(CostModel(prof), datasheet_table(prof, _config(LLAMA_8B), ["none"]), LLAMA_8B, "none")
    chosen = []
    for factor in (1.01, 0.95, 0.9, 0.8, 0.7, 0.6):
        prof = _profile(budget={"memory_headroom": 0.0, "tpot_ms": dense.tpot_s * 1e3 * factor}, device=a100)
        f = _width_only(prof, LLAMA_8B)
        chosen.append(f.candidates[0].width if f.candidates else 1.0)
        if f.candidates:
            c = f.candidates[0]
            assert len(f.candidates) == 1 and c.ok and c.prediction.tpot_s * 1e3 <= dense.tpot_s * 1e3 * factor
            if c.width:  # the least such width: one grid step less misses
                assert not _width_only(prof, LLAMA_8B, grid=(round(c.width - 0.05, 2),)).candidates
    assert chosen == sorted(chosen) and chosen[0] == 0.0 and chosen[-2] > 0


def test_an_8b_model_on_a10g_needs_pruning_for_memory():
    prof = load_profile("a10g-24gb")
    cost = CostModel(prof)
    assert [v.line for v in cost.violations(cost.predict(LLAMA_8B))][0] == "memory"
    f = _width_only(prof, LLAMA_8B)
    assert f.feasible and f.candidates[0].width > 0 and f.candidates[0].prediction.memory.fits


def test_an_infeasible_width_only_budget_names_the_closest_plan(tmp_path):
    """No width meets a TPOT line of 0.01 ms: exit 3 in one sentence naming the most pruned width-only
    plan (no layer dropped, and the sentence claims none) and what it misses."""
    path = tmp_path / "tight.yaml"
    d = load_profile("a10g-24gb").model_dump(exclude={"efficiency"})
    d["budget"]["tpot_ms"] = 0.01
    path.write_text(yaml.safe_dump(d))
    p = run_cli("plan", "--profile", str(path), "--no-calibrate", "--width-only", "--json", str(tmp_path / "p.json"))
    assert p.returncode == 3, p.stderr
    errors = " ".join(p.stderr.split()).split("error: ")[1:]
    assert len(errors) == 1 and "infeasible" in errors[0] and "Traceback" not in p.stderr
    assert "70% of the decoder removed by width" in errors[0] and "time per output token" in errors[0]
    assert "layers dropped" not in errors[0]
    plan = json.loads((tmp_path / "p.json").read_text())
    assert plan["feasible"] is False and plan["plan"] == "width only" and plan["command"] is None


def test_the_width_only_plan_refuses_infeasible_and_needless_pruning(smollm2_dir, tmp_path):
    """The main job's width-only plan: exit 3 for an infeasible budget, exit 4 where the dense model
    meets the budget already; nothing written either way."""
    from compressor.cli import main

    for tpot_ms, code in ((0.01, 3), (None, 4)):
        d = load_profile("a10g-24gb").model_dump(exclude={"efficiency"})
        d["budget"]["tpot_ms"] = tpot_ms
        d["budget"]["ttft_ms"] = None
        path = tmp_path / f"p{code}.yaml"
        path.write_text(yaml.safe_dump(d))
        out = tmp_path / f"o{code}"
        assert main([str(smollm2_dir), "--profile", str(path), "--width-only", "--out", str(out)]) == code
        assert not out.exists()


@pytest.mark.slow
@pytest.mark.integration
def test_main_job_takes_the_plans_ratio(tmp_path, tiny_model_dir):
    """A profile of a device that is not here (datasheet latency, deterministic predictions) whose TPOT
    budget the dense model misses: the width-only plan's least width is what the run prunes, and its
    report and page say so."""
    from compressor.budget.shapes import arch_of
    from compressor.model.loading import read_config
    from profiles.schema import Profile

    base = load_profile("a10g-24gb").model_dump(exclude={"efficiency"})
    base.update(name="tiny-gpu", runtime="torch", dtype="float32", round_to=8)
    base["workload"].update(max_context=64, concurrency=2, prompt_tokens=16, output_tokens=4)
    base["budget"] = {"memory_headroom": 0.1, "ttft_ms": None, "tpot_ms": None, "min_throughput_tok_s": None}
    config = read_config(str(tiny_model_dir))[0]
    arch, prof0 = arch_of(config), Profile.model_validate(base)
    cost, table = CostModel(prof0), datasheet_table(prof0, config, ["none"])
    dense_ms = predict(cost, table, arch, "none").tpot_s * 1e3
    target_ms = predict(cost, table, arch_at_ratio(arch, 0.3, "auto", 8), "none").tpot_s * 1e3
    base["budget"]["tpot_ms"] = target_ms + 0.1 * (dense_ms - target_ms)  # dense misses it, 0.3 meets it
    prof = tmp_path / "tiny-gpu.yaml"
    prof.write_text(yaml.safe_dump(base))

    out = tmp_path / "o"
    p = run_cli(str(tiny_model_dir), "--profile", str(prof), "--width-only", "--nsamples", "4", "--seqlen", "32",
                "--out", str(out))
    assert p.returncode == 5, p.stderr[-3000:]  # a GPU profile on this CPU: judged on predictions, not verified
    r = json.loads((out / "report.json").read_text())
    expected = r["plan"]["chosen"]["width"]
    assert 0 < expected <= 0.35 and r["plan"]["ratio_source"] == "width only"
    assert r["plan"]["chosen"]["format"] == "none" and r["plan"]["chosen"]["dropped_layers"] == 0
    assert f"plan: ratio {expected:.2f} is the least width" in " ".join(p.stderr.split())
    assert r["schema"] == "fitprune.report/5" and r["method"]["ratio_requested"] == expected
    assert "## Plan (width only)" in (out / "report.md").read_text()
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
    ratio = out.split(f"run it: compress --profile cpu-2core {smollm2_dir} --ratio ")[1].split()[0]
    assert float(ratio) > 0 and f"choice: width -{float(ratio):.0%} (fewest decoder weights removed" in out
