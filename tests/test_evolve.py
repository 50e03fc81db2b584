"""The searched allocation (prune/evolve.py) on tiny random Llamas: budget, monotone fitness,
reproducibility, block removal that still runs and exports, and `--structure searched` end to end."""

from __future__ import annotations

import json

import pytest
import torch

from compressor.model import adapter_for
from compressor.prune.driver import Compute, PruneSpec
from compressor.prune.evolve import Fitness, prune_searched, validation_windows
from compressor.prune.widths import layer_params
from tests.conftest import assert_clean_failure, run_cli, tiny_model

SMALL = dict(generations=12, window_len=64, windows=4, first_windows=2, offspring=6)


@pytest.fixture(autouse=True)
def _one_thread():
    """Two threads on the shared 2-core CI machines are many times slower for these tiny matrices."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _setup(dead_attention: int | None = None, layers: int = 4):
    model = tiny_model("llama-gqa", layers=layers)
    with torch.no_grad():
        model.lm_head.weight.mul_(8)  # peaked next-token distributions: KL differences well above rounding
        if dead_attention is not None:  # a block that contributes nothing: removing it is free
            model.model.layers[dead_attention].self_attn.o_proj.weight.zero_()
    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(0, 128, (8, 32), generator=gen)
    val = torch.randint(0, 128, (2000,), generator=gen)
    return model, adapter_for(model), calib, val


def _search(model, adapter, calib, val, ratio=0.3, **kw):
    spec = PruneSpec(metric="flap", compensation="lsq+bias", ratio=ratio, round_to=8)
    lines = []
    res = prune_searched(model, adapter, calib, val, spec, Compute(batch_size=4), say=lines.append, **{**SMALL, **kw})
    return res, lines


def _kl(dense, pruned, val, n=4, length=64) -> float:
    fit = Fitness(validation_windows(val, n, length))
    fit.cache_dense(dense, 128)
    return sum(fit.window_kl(pruned, i) for i in range(n)) / n


def test_budget_is_met_and_the_fitness_never_gets_worse():
    import copy

    model, adapter, calib, val = _setup()
    dense = copy.deepcopy(model)
    shapes = [adapter.shape(layer) for layer in adapter.layers(model)]
    total = sum(layer_params(s, 48) for s in shapes)
    res, lines = _search(model, adapter, calib, val)
    n = res.notes["search"]
    kls = [p["kl"] for p in n["trajectory"]]
    assert len(kls) == SMALL["generations"] + 1
    assert all(b <= a for a, b in zip(kls, kls[1:], strict=False)), kls
    assert kls[-1] < kls[0], "12 generations on a 4-layer model find something better than global"
    # the budget: the target within half an MLP step (3 x hidden x round_to weights), or global's own overshoot
    removed = 1 - adapter.count_params(model)["decoder"] / adapter.count_params(dense)["decoder"]
    step = 3 * 48 * 8 / total
    assert abs(n["removed_fraction"] - 0.3) <= step / 2 + 1e-9 or n["removed_fraction"] <= n["start_removed_fraction"]
    assert abs(removed - n["removed_fraction"]) < 0.01  # norms and biases are the only difference
    # the model left in place is the one the search scored (candidates are exactly prune_model's layers)
    assert _kl(dense, model, val) == pytest.approx(kls[-1], rel=1e-3, abs=1e-6)
    assert sum("generation" in line for line in lines) == SMALL["generations"] + 1
    assert res.structure == "searched" and len(res.keeps) == 4


def test_same_seed_same_result_other_seed_other_path():
    runs = []
    for seed in (3, 3, 4):
        model, adapter, calib, val = _setup()
        res, _ = _search(model, adapter, calib, val, seed=seed, generations=5)
        runs.append(([(k.q_heads, k.kv_heads, k.channels) for k in res.keeps],
                     [p["kl"] for p in res.notes["search"]["trajectory"]]))
    assert runs[0] == runs[1]
    assert runs[0][1] != runs[2][1] or runs[0][0] != runs[2][0]


def test_a_useless_block_is_removed_and_the_model_runs_and_exports(tmp_path):
    from transformers import AutoModelForCausalLM

    from exporters import export_hf

    model, adapter, calib, val = _setup(dead_attention=2)
    res, _ = _search(model, adapter, calib, val, generations=30)
    n = res.notes["search"]
    assert 2 in n["attention_removed"], n
    assert adapter.shape(adapter.layers(model)[2]).num_heads == 0
    ids = val[:40][None]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    export_hf(model, None, tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        again = back(input_ids=ids).logits
    assert torch.allclose(logits, again, atol=1e-4), (logits - again).abs().max()


def test_without_depth_no_block_is_removed():
    model, adapter, calib, val = _setup(dead_attention=2)
    res, _ = _search(model, adapter, calib, val, generations=10, depth=False)
    assert all(k.q_heads and k.channels for k in res.keeps)


def test_structure_searched_end_to_end(tmp_path, tiny_model_dir):
    out = tmp_path / "o"
    p = run_cli(str(tiny_model_dir), "--profile", "cpu-2core", "--nsamples", "4", "--seqlen", "32",
                "--round-to", "8", "--ratio", "0.3", "--structure", "searched", "--search-generations", "3",
                "--threads", "1", "--no-checks", "--domain-windows", "0", "--out", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    method = report["method"]
    assert method["structure"] == "searched"
    traj = method["search"]["trajectory"]
    assert 0.2 < report["params"]["achieved_ratio_decoder"] < 0.4
    # the tiny random model's outputs hardly change whatever is pruned (KL ~1e-6 at the start): below
    # NEGLIGIBLE_KL the search stops at once, saying why, else it runs its 3 generations; the search itself is
    # tested on a model with signal above
    from compressor.prune.evolve import NEGLIGIBLE_KL

    if traj[0]["kl"] < NEGLIGIBLE_KL:
        assert len(traj) == 1 and "indistinguishable from the dense model" in " ".join(p.stderr.split())
    else:
        assert [t["generation"] for t in traj] == [0, 1, 2, 3] and "generation 3/3" in p.stderr


def test_auto_structure_is_the_search_in_memory_and_global_when_asked(tmp_path, tiny_model_dir):
    """`--structure auto` (the default) runs the allocation search for an in-memory run of a small
    model, and says so; an explicit --structure global is left alone."""
    base = ["--nsamples", "4", "--seqlen", "32", "--round-to", "8", "--ratio", "0.3", "--no-checks",
            "--domain-windows", "0"]
    p = run_cli(str(tiny_model_dir), *base, "--out", str(tmp_path / "a"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "structure searched (auto" in " ".join(p.stderr.split())
    assert json.loads((tmp_path / "a" / "report.json").read_text())["method"]["structure"] == "searched"
    p = run_cli(str(tiny_model_dir), *base, "--structure", "global", "--out", str(tmp_path / "g"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((tmp_path / "g" / "report.json").read_text())["method"]["structure"] == "global"


def test_auto_structure_keeps_global_for_a_large_model_on_a_cpu():
    from compressor.config import RunConfig
    from compressor.pipeline.plan import SEARCH_CPU_MAX_PARAMS, auto_structure
    from compressor.prune.driver import PruneSpec

    said = []
    spec = PruneSpec(metric="flap", compensation="lsq+bias", structure="global")
    big = auto_structure(RunConfig(), spec, SEARCH_CPU_MAX_PARAMS + 1, said.append)
    small = auto_structure(RunConfig(), spec, SEARCH_CPU_MAX_PARAMS, said.append)
    assert (big.structure, small.structure) == ("global", "searched")
    assert "too long" in said[0]
    explicit = auto_structure(RunConfig(structure="global"), spec, 1000, said.append)
    assert explicit.structure == "global"


def test_auto_structure_is_the_streamed_search_out_of_core(tmp_path, tiny_model_dir):
    """Out of core, `--structure auto` is the searched allocation too where every layer's statistics
    fit in memory, its generations streamed over the checkpoint; with two passes forced it is refused."""
    from tests.conftest import run_main

    base = ["--nsamples", "4", "--seqlen", "32", "--round-to", "8", "--ratio", "0.3", "--no-checks",
            "--domain-windows", "0", "--out-of-core", "on", "--search-generations", "2"]
    p = run_main(str(tiny_model_dir), *base, "--out", str(tmp_path / "a"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "structure searched (auto" in " ".join(p.stderr.split())
    r = json.loads((tmp_path / "a" / "report.json").read_text())
    assert r["method"]["structure"] == "searched" and r["method"]["out_of_core"] == "one-pass"
    assert r["method"]["search"]["streamed"] and len(r["method"]["search"]["trajectory"]) in (1, 3)
    out = tmp_path / "two"
    p = run_main(str(tiny_model_dir), *base, "--structure", "searched", "--passes", "two", "--out", str(out))
    assert_clean_failure(p, out, "--structure searched builds its candidates from every layer's statistics")


def test_structure_searched_and_search_together_are_refused(tmp_path, tiny_model_dir):
    """--search (the metric mixture) with --structure searched (the allocation): two searches, one run."""
    out = tmp_path / "o"
    p = run_cli(str(tiny_model_dir), "--structure", "searched", "--search", "--out", str(out))
    assert_clean_failure(p, out, "two different searches")


def test_search_generations_below_one_is_refused(tmp_path, tiny_model_dir):
    out = tmp_path / "o"
    p = run_cli(str(tiny_model_dir), "--structure", "searched", "--search-generations", "0", "--out", str(out))
    assert_clean_failure(p, out, "--search-generations must be at least 1")


def test_out_of_core_search_finds_the_in_memory_search_s_allocation(tmp_path):
    """The searched allocation streamed over a checkpoint (one layer in memory per sweep) takes the
    in-memory search's path: the same KL trajectory and the same kept units, and the driver writes
    the weights the in-memory search leaves in place."""
    import copy

    from compressor.model.lazy import LazyModel
    from compressor.prune.driver import Scored, prune
    from compressor.prune.evolve import search_keeps

    model, adapter, calib, val = _setup()
    model.save_pretrained(tmp_path / "m")
    mem = copy.deepcopy(model)
    res, _ = _search(mem, adapter_for(mem), calib, val)
    lazy = LazyModel(tmp_path / "m")
    spec = PruneSpec(metric="flap", compensation="lsq+bias", structure="searched", ratio=0.3, round_to=8)
    lines: list[str] = []

    def search(scores, stats):
        return search_keeps(lazy, adapter_for(lazy.model), Scored(scores, stats), spec, val, Compute(batch_size=4),
                            say=lines.append, **SMALL)

    class Keep:  # the streamed layers, kept (a test sink)
        layers: dict = {}

        def begin(self, keeps):
            pass

        def add(self, i, layer):
            self.layers[i] = {k: v.clone() for k, v in layer.state_dict().items()}
            return False

    sink = Keep()
    out = prune(lazy, adapter_for(lazy.model), calib, spec, Compute(batch_size=4), sink, free_bytes=2**40,
                say=lines.append, search=search)
    a, b = res.notes["search"], out.notes["search"]
    assert b["streamed"] and not a["streamed"]
    assert [p["kl"] for p in b["trajectory"]] == pytest.approx([p["kl"] for p in a["trajectory"]], rel=1e-5)
    assert [(k.q_heads, k.kv_heads, k.channels) for k in out.keeps] == \
        [(k.q_heads, k.kv_heads, k.channels) for k in res.keeps]
    for i, layer in enumerate(adapter_for(mem).layers(mem)):
        for k, v in layer.state_dict().items():
            assert torch.allclose(sink.layers[i][k], v, atol=1e-6), (i, k)
