"""The measured latency table (compressor/budget/latency_table.py): the least-squares fit per
format, its fallback on noise, the architectures measured, the cache, the datasheet fallback,
memory per weight format, and real tables measured against the reference in torch and vLLM."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from compressor.budget.latency_table import (
    DATASHEET_SOURCE,
    LatencyTable,
    TablePoint,
    architectures,
    cache_path,
    datasheet_table,
    format_problem,
    host_device,
    load_table,
    measure_table,
    table_key,
)
from compressor.budget.shapes import arch_of
from compressor.errors import UserError
from profiles import load_profile
from profiles.costmodel import GIB, Arch, CostModel, weight_bytes

SMOLLM2_CONFIG = {"model_type": "llama", "hidden_size": 576, "vocab_size": 49152, "num_hidden_layers": 30,
                  "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "intermediate_size": 1536,
                  "tie_word_embeddings": True}
LLAMA_8B_CONFIG = {"model_type": "llama", "hidden_size": 4096, "vocab_size": 128256, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 14336,
                   "tie_word_embeddings": False}


def _profile(base: str, **changes):
    from profiles.schema import Profile

    d = load_profile(base).model_dump()
    for key, value in changes.items():
        section, _, sub = key.partition("__")
        if sub:
            d[section][sub] = value
        else:
            d[section] = value
    return Profile.model_validate(d)


def _synthetic_table(a: float, b: float, c: float, fmt: str = "none", **override) -> tuple[LatencyTable, dict]:
    """Points on the line a + b x layers + c x params at SmolLM2's measured architectures;
    `override` replaces a point's TPOT (to inject noise)."""
    dense = Arch.from_config(SMOLLM2_CONFIG)
    archs = dict(architectures(dense, fmt, 64))
    points = []
    for name, arch in archs.items():
        t = a + b * arch.layers + c * arch.decoder_params
        points.append(TablePoint(name, fmt, arch.layers, arch.decoder_params, 10 * t, override.get(name, t), {}))
    return LatencyTable({"test": True}, points, "synthetic", True), archs


def test_points_on_a_line_are_fitted_exactly_and_interpolated_linearly():
    a, b, c = 3e-3, 1.5e-4, 2.5e-11  # 3 ms fixed, 0.15 ms per layer, 25 ps per weight
    table, archs = _synthetic_table(a, b, c)
    assert list(archs) == ["full", "w25", "w50", "d25", "d50", "d50w50"]
    assert table.formats() == ["none"] and not table.fit_notes
    for arch in archs.values():  # through every measured point
        ttft, tpot = table.predict(arch)
        line = a + b * arch.layers + c * arch.decoder_params
        assert tpot == pytest.approx(line, rel=1e-9) and ttft == pytest.approx(10 * line, rel=1e-9)
    co = table.coefficients("none")["tpot"]
    assert (co["a_s"], co["b_s_per_layer"], co["c_s_per_param"]) == pytest.approx((a, b, c), rel=1e-9)
    # between them: 24 layers (6 dropped as no-op layers) at 80% MLP width
    dense = archs["full"]
    keep = [True] * 24 + [False] * 6
    pruned = Arch(dense.hidden, dense.vocab, dense.head_dim, tuple(9 if k else 0 for k in keep),
                  tuple(3 if k else 0 for k in keep), tuple(1216 if k else 0 for k in keep), True)
    params = 24 * (576 * 64 * (2 * 9 + 2 * 3) + 3 * 576 * 1216)
    assert pruned.decoder_params == params
    assert table.predict(pruned)[1] == pytest.approx(a + b * 24 + c * params, rel=1e-9)
    # depth and width at the same weights differ by the per-layer cost of the dropped layers
    assert archs["w50"].decoder_params == archs["d50"].decoder_params
    assert table.predict(archs["w50"])[1] - table.predict(archs["d50"])[1] == pytest.approx(15 * b, rel=1e-9)
    with pytest.raises(ValueError, match="no w8a8-int8 points"):
        table.predict(dense, "w8a8-int8")


def test_noise_is_averaged_and_a_negative_cost_falls_back_to_zero():
    a, b, c = 3e-3, 1.5e-4, 2.5e-11
    _, archs = _synthetic_table(a, b, c)
    line = {n: a + b * x.layers + c * x.decoder_params for n, x in archs.items()}
    # one point 5% slow: least squares spreads it, every prediction stays within 5% of the line
    table, _ = _synthetic_table(a, b, c, w25=line["w25"] * 1.05)
    assert not table.fit_notes
    for n, x in archs.items():
        assert table.predict(x)[1] == pytest.approx(line[n], rel=0.05)
    # the depth points measured as slow as full ones of their weights: b would be negative
    flat = {n: 2e-3 + 1e-10 * x.decoder_params - (4e-4 if x.layers == 30 else 0) for n, x in archs.items()}
    table, _ = _synthetic_table(a, b, c, **flat)
    co = table.coefficients("none")
    assert co["tpot"]["b_s_per_layer"] == 0.0 and co["tpot"]["c_s_per_param"] > 0
    assert any("negative per-layer overhead" in n for n in co["notes"])
    # TTFT was not noisy: still the exact line
    assert co["ttft"]["b_s_per_layer"] == pytest.approx(10 * b, rel=1e-9)
    # fewer weights measured slower: no per-weight cost, the layer cost from the depth points
    wide = {n: a + b * x.layers - 1e-12 * x.decoder_params for n, x in archs.items()}
    table, _ = _synthetic_table(a, b, c, **wide)
    co = table.coefficients("none")["tpot"]
    assert co["c_s_per_param"] == 0.0 and co["b_s_per_layer"] > 0
    assert any("negative per-weight cost" in n for n in table.fit_notes)
    for arch in archs.values():
        assert table.predict(arch)[1] > 0


def test_points_a_disturbed_run_explains_are_named_for_measuring_again():
    from compressor.budget.latency_table import _faster, implausible

    a, b, c = 3e-3, 1.5e-4, 2.5e-11
    clean, archs = _synthetic_table(a, b, c)
    pts = {p.name: p for p in clean.points}
    assert implausible(pts) == {}
    full = pts["full"].tpot_s
    slowed, _ = _synthetic_table(a, b, c, d50=full * 1.2, w25=full)
    assert sorted(implausible({p.name: p for p in slowed.points})) == ["d50", "w25"]
    merged = _faster(slowed.points[4], pts["d50"])
    assert merged.tpot_s == pts["d50"].tpot_s and merged.ttft_s == pts["d50"].ttft_s
    assert merged.measurement["earlier_attempts"] == [{}]


def test_the_architectures_span_the_planners_widths_and_depths_within_the_formats_group():
    dense = Arch.from_config(SMOLLM2_CONFIG)
    archs = dict(architectures(dense, "none", 64))
    assert [(a.layers, a.q_heads[0], a.kv_heads[0], a.intermediate[0]) for a in archs.values()] == [
        (30, 9, 3, 1536), (30, 6, 3, 1152), (30, 3, 3, 768), (23, 9, 3, 1536), (15, 9, 3, 1536), (15, 3, 3, 768)]
    archs = dict(architectures(Arch.from_config(LLAMA_8B_CONFIG), "w4a16", 64))
    assert len(archs) == 6 and archs["d50"].layers == 16 and archs["d50"].intermediate[0] == 14336
    for a in archs.values():  # every width a multiple of the group of 128
        assert a.intermediate[0] % 128 == 0 and a.q_heads[0] * a.head_dim % 128 == 0
    assert archs["w50"].decoder_params < archs["w25"].decoder_params < archs["full"].decoder_params
    # one layer: no depth points; the widths alone, and the fit sets the layer cost to 0
    one = Arch(576, 49152, 64, (9,), (3,), (1536,), True)
    assert [n for n, _ in architectures(one, "none", 64)] == ["full", "w25", "w50"]
    smollm2 = arch_of(SMOLLM2_CONFIG)
    assert "576" in format_problem("w4a16", smollm2)
    assert format_problem("w8a8-int8", smollm2) is None
    with pytest.raises(UserError, match="not a weight format"):
        format_problem("int3", smollm2)


def test_the_cache_round_trips_and_ignores_corrupt_or_foreign_files(tmp_path, monkeypatch):
    from compressor.budget.latency_table import _write_cache

    monkeypatch.setenv("FITPRUNE_CACHE_DIR", str(tmp_path))
    prof, dev = _profile("cpu-2core"), "cpu: test (2 threads)"
    key = table_key(prof, SMOLLM2_CONFIG, "vllm", dev)
    path = cache_path(key)
    assert path.parent == tmp_path / "latency"
    synthetic, _ = _synthetic_table(3e-3, 1.5e-4, 2.5e-11)
    warned = []
    assert load_table(prof, SMOLLM2_CONFIG, "vllm", dev, warn=warned.append) is None
    _write_cache(LatencyTable(key, synthetic.points, "measured in vllm on test", True, path), path)
    assert not list(path.parent.glob(".*tmp*"))  # the temporary file was renamed into place
    back = load_table(prof, SMOLLM2_CONFIG, "vllm", dev, warn=warned.append)
    assert back is not None and back.points == synthetic.points and back.path == path and back.measured
    assert back.coefficients("none") == synthetic.coefficients("none") and not warned
    # another workload, shape, runtime or device is another file
    other = [table_key(_profile("cpu-2core", workload__output_tokens=64), SMOLLM2_CONFIG, "vllm", dev),
             table_key(prof, {**SMOLLM2_CONFIG, "num_hidden_layers": 24}, "vllm", dev),
             table_key(prof, SMOLLM2_CONFIG, "torch", dev),
             table_key(prof, SMOLLM2_CONFIG, "vllm", "cpu: test (1 thread)")]
    assert len({cache_path(k) for k in other} | {path}) == 5
    # vLLM binds its threads into this process's environment on its first start: same device, same key
    before = host_device(prof, "vllm")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    assert host_device(prof, "vllm") == before and before.startswith("cpu: ") and "(2 threads)" in before
    # engines started with vLLM's CI switch (the tests' own, tests/conftest.py) are not the default engine:
    # their device names it, so their table is another file; the torch runtime does not read it
    monkeypatch.setenv("VLLM_CPU_CI_ENV", "0")
    default = host_device(prof, "vllm")
    monkeypatch.setenv("VLLM_CPU_CI_ENV", "1")
    assert host_device(prof, "vllm") == default + " (VLLM_CPU_CI_ENV: not compiled by inductor)"
    assert host_device(prof, "torch") == default
    # a file at this key's path that holds another key (say, copied by hand) is not trusted
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "key": other[0]}))
    assert load_table(prof, SMOLLM2_CONFIG, "vllm", dev, warn=warned.append) is None
    assert "is ignored" in warned[-1] and "key" in warned[-1]
    # corrupt files: truncated JSON, a latency that is not a latency, an inconsistent point
    bad_point = dict(data["points"][0], tpot_s=-1.0)
    deeper = [dict(p, layers=31) if p["name"] == "w25" else p for p in data["points"]]
    for text in (path.read_text()[:50], json.dumps({**data, "points": [bad_point]}),
                 json.dumps({**data, "points": deeper}), "\xff\xfe"):
        path.write_text(text)
        n = len(warned)
        assert load_table(prof, SMOLLM2_CONFIG, "vllm", dev, warn=warned.append) is None
        assert len(warned) == n + 1 and warned[-1].startswith("warning: ") and "\n" not in warned[-1]


def test_the_datasheet_table_prices_formats_by_their_bytes_on_a_bandwidth_bound_gpu():
    prof = load_profile("a10g-24gb")
    table = datasheet_table(prof, LLAMA_8B_CONFIG, ["none", "w8a8-int8", "w4a16"])
    assert not table.measured and table.source == DATASHEET_SOURCE and table.path is None
    assert table.formats() == ["none", "w8a8-int8", "w4a16"]
    dense = Arch.from_config(LLAMA_8B_CONFIG)
    tpot = {f: table.predict(dense, f)[1] for f in table.formats()}
    assert tpot["none"] > 1.6 * tpot["w8a8-int8"] and tpot["w8a8-int8"] > 1.4 * tpot["w4a16"]
    # the dense prediction is the roofline's own at the measured architectures
    cost = CostModel(prof)
    w = prof.workload
    assert tpot["none"] == pytest.approx(cost.decode_step_s(dense, w.prompt_tokens + w.output_tokens // 2), rel=1e-9)
    # a format whose group does not divide the model's widths is left out, with a note
    small = datasheet_table(prof, SMOLLM2_CONFIG, ["none", "w4a16"])
    assert small.formats() == ["none"] and "576" in small.notes[0]


def test_memory_prices_decoder_weights_in_their_format_and_the_rest_dense():
    prof = load_profile("a10g-24gb")
    cost = CostModel(prof)
    dense = Arch.from_config(LLAMA_8B_CONFIG)
    dec, emb = dense.decoder_params, 2 * dense.embedding_params  # untied: embeddings and LM head
    assert cost.memory(dense).weights_gib == pytest.approx(dense.total_params * 2 / GIB)
    assert cost.memory(dense, "none") == cost.memory(dense)
    assert cost.memory(dense, "w8a8-int8").weights_gib == pytest.approx((dec * 1 + emb * 2) / GIB)
    assert cost.memory(dense, "fp8").weights_gib == pytest.approx((dec * 1 + emb * 2) / GIB)
    assert cost.memory(dense, "w4a16").weights_gib == pytest.approx((dec * (0.5 + 2 / 128) + emb * 2) / GIB)
    assert weight_bytes("bf16", 2) == 2 and weight_bytes("fp32", 2) == 4 and weight_bytes("none", 4) == 4
    assert cost.memory(dense, "w8a8-int8").kv_cache_gib == cost.memory(dense).kv_cache_gib
    with pytest.raises(ValueError, match="unknown weight format"):
        weight_bytes("int3", 2)


def test_measure_table_refuses_formats_before_measuring(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("FITPRUNE_CACHE_DIR", str(tmp_path))
    config = json.loads((tiny_model_dir / "config.json").read_text())
    prof = _profile("cpu-2core")
    said = []
    with pytest.raises(UserError, match="w8a16 kernel"):
        measure_table(prof, config, tiny_model_dir, "torch", ["none", "w8a16"], say=said.append)
    with pytest.raises(UserError, match="not a weight format"):
        measure_table(prof, config, tiny_model_dir, "torch", ["int3"], say=said.append)
    with pytest.raises(UserError, match="tokenizer"):
        measure_table(prof, config, tmp_path, "torch", ["none"], say=said.append)
    assert not said and not (tmp_path / "latency").exists()


def test_a_real_table_measured_in_torch_is_cached_and_labelled_with_the_runtime_used(tiny_model_dir, tmp_path,
                                                                                     monkeypatch):
    """cpu-2core names vLLM; measured here in torch (as budget/device.measurement_runtime falls
    back), the table must say torch in its key and source."""
    monkeypatch.setenv("FITPRUNE_CACHE_DIR", str(tmp_path))
    config = json.loads((tiny_model_dir / "config.json").read_text())
    prof = _profile("cpu-2core", round_to=16, workload__prompt_tokens=16, workload__output_tokens=8)
    said = []
    table = measure_table(prof, config, tiny_model_dir, "torch", ["none"], runs=2, say=said.append)
    names = [n for n, _ in architectures(Arch.from_config(config), "none", 16)]
    assert len(names) >= 4 and names[0] == "full"
    assert said[0].startswith(f"latency table: measuring {len(names) - 1} architectures in torch")
    assert "request by request in turn with the reference" in said[0]
    assert [line.split(" architecture")[0] for line in said[1:len(names)]] == [f"latency table: the {n}"
                                                                                for n in names[1:]]
    # a tiny model's points differ by little more than noise: a point that contradicts the hardware
    # was measured once more (retries=1), against the reference again, and the table says so
    again = [line for line in said if "again" in line]
    assert len(again) <= len(names) - 1 and sum("measured twice" in n for n in table.notes) == len(again)
    assert table.measured and table.formats() == ["none"] and [p.name for p in table.points] == names
    assert table.key["runtime"] == "torch" and table.source.startswith("measured in torch on cpu")
    assert "not the profile's runtime, vllm" in table.source and any("torch" in n for n in table.notes)
    by_name = {p.name: p for p in table.points}
    full = by_name["full"]  # the reference: the median of every reference request of the session
    assert full.measurement["reference_requests"] >= 2 * len(names)
    for p in table.points:
        assert math.isfinite(p.tpot_s) and p.tpot_s > 0 and p.ttft_s > 0
        assert p.measurement["runtime"] == "torch" and p.measurement["output_tokens"] == 8
        if p.name != "full" and "earlier_attempts" not in p.measurement:  # stored as its ratio x the reference's
            ratio = p.measurement["ratio_to_reference"]
            assert p.tpot_s == pytest.approx(ratio["tpot"] * full.tpot_s)
            # beside a reference engine loaded before it and one loaded after it (device.measure_chain)
            assert [r["loaded_first"] for r in p.measurement["rounds"]] == ["reference", "other"]
            rounds = [r["tpot_ratio"] for r in p.measurement["rounds"]]
            assert ratio["tpot"] == pytest.approx(math.sqrt(math.prod(rounds)))
    assert by_name["d50"].layers == 1 and by_name["w50"].decoder_params < full.decoder_params
    assert isinstance(table.path, Path) and table.path.is_file() and table.path.parent == tmp_path / "latency"
    ttft, tpot = table.predict(Arch.from_config(config))
    assert ttft > 0 and tpot > 0
    # the second call measures nothing and returns the same points
    said.clear()
    again = measure_table(prof, config, tiny_model_dir, "torch", ["none"], runs=2, say=said.append)
    assert not said and again.points == table.points and again.path == table.path
    # refresh measures again; no temporary files are left in the cache folder
    fresh = measure_table(prof, config, tiny_model_dir, "torch", ["none"], runs=2, say=said.append, refresh=True)
    assert len(said) >= len(names) and len(fresh.points) == len(names)
    assert list(table.path.parent.iterdir()) == [table.path]


@pytest.mark.slow
@pytest.mark.integration
def test_a_w8a8_table_measured_in_vllm_cpu(tmp_path, smollm2_dir, monkeypatch):
    """The profile's own runtime and a quantized format: int8 checkpoints (compressed-tensors) of a
    small random Llama served by vLLM CPU (a head size its CPU attention has), each in turn with the
    reference (the same model in the dense dtype) loaded beside it."""
    pytest.importorskip("vllm")
    from transformers import AutoTokenizer

    from tests.conftest import tiny_config

    monkeypatch.setenv("FITPRUNE_CACHE_DIR", str(tmp_path / "cache"))
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model_dir = tmp_path / "model"
    # one layer: the full model and two widths in int8 (3 points, 2N+1 = 7 engine starts in the reference chain); depths
    # are the torch test's (each would add two engine starts here)
    tiny_config("llama-gqa", vocab_size=len(tok), layers=1, hidden_size=128, num_attention_heads=2,
                num_key_value_heads=1, head_dim=64, intermediate_size=256).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    prof = _profile("cpu-2core", workload__prompt_tokens=16, workload__output_tokens=8)
    said = []
    # retries=0: a tiny model's points differ by noise, and every point measured again costs two more
    # engine starts (~1 min each here); the torch test above covers the retry
    table = measure_table(prof, config, model_dir, "vllm", ["w8a8-int8"], runs=2, say=said.append, retries=0)
    assert table.formats() == ["w8a8-int8"] and table.key["runtime"] == "vllm"
    assert table.source.startswith("measured in vllm on cpu") and "not the profile's" not in table.source
    names = [n for n, _ in architectures(Arch.from_config(config), "w8a8-int8", prof.round_to)]
    assert {(p.name, p.format) for p in table.points} == {("full", "none")} | {(n, "w8a8-int8") for n in names}
    for p in table.points:
        assert p.measurement["runtime"] == "vllm" and p.tpot_s > 0 and p.ttft_s > 0
    assert sum(line.startswith("latency table: the") and "w8a8-int8" in line for line in said) >= len(names)
    said.clear()
    assert measure_table(prof, config, model_dir, "vllm", ["w8a8-int8"], runs=2, say=said.append).points == table.points
    assert not said


def test_off_cpu_each_point_is_measured_alone_after_the_reference(tiny_model_dir, tmp_path, monkeypatch):
    """A GPU profile's table measures one engine at a time (two may not fit on the device): every
    point is compared with the reference measured alone first, and the table says so. Run here in
    torch on the CPU, which is what this path does wherever the profile's device is not a CPU."""
    monkeypatch.setenv("FITPRUNE_CACHE_DIR", str(tmp_path))
    config = json.loads((tiny_model_dir / "config.json").read_text())
    prof = _profile("a10g-24gb", runtime="torch", dtype="float32", round_to=16, workload__prompt_tokens=16,
                    workload__output_tokens=8)
    said = []
    table = measure_table(prof, config, tiny_model_dir, "torch", ["none"], runs=2, say=said.append, retries=0)
    assert "alone after the reference" in said[0]
    assert any("measured alone after the reference" in n for n in table.notes)
    full = next(p for p in table.points if p.name == "full")
    for p in table.points:
        if p.name != "full":
            assert p.measurement["how"] == "alone, after the reference"
            assert p.measurement["reference_alongside"]["tpot_s"] == pytest.approx(full.tpot_s)  # the one reference


def test_exact_points_are_used_for_their_shape_only_and_left_out_of_the_fit():
    """A kernel that is slow at one shape (vLLM CPU's int8 kernel with biases at MLP width 960):
    the exact point of that shape and format overrides the fit there, and nowhere else."""
    from dataclasses import replace

    from compressor.budget.latency_table import EXACT, exact_shape
    from compressor.budget.planner import arch_at_ratio, shallower

    a, b, c = 3e-3, 1.5e-4, 2.5e-11
    table, archs = _synthetic_table(a, b, c)
    cand = replace(arch_at_ratio(shallower(archs["full"], 14), 0.35, "auto", 64), biased=True)
    shape = exact_shape(cand)
    assert shape == {"layers": 16, "q_heads": 6, "kv_heads": 3, "intermediate": 960, "biased": True}
    fitted = table.predict(cand)
    slow = TablePoint(EXACT, "none", 16, cand.decoder_params, 0.5, 0.02, {}, shape)
    with_exact = LatencyTable(table.key, [*table.points, slow], table.source, True)
    assert with_exact.predict(cand) == pytest.approx((0.5, 0.02))  # the reference is on the line: as stored
    assert with_exact.predict(replace(cand, biased=False)) == pytest.approx(fitted)  # another shape: the fit
    assert with_exact.predict(archs["w25"]) == pytest.approx(table.predict(archs["w25"]))
    assert with_exact.coefficients("none") == table.coefficients("none")  # not fitted
    # a dropped layer written as a no-op layer is the same shape
    noop = replace(cand, q_heads=(*cand.q_heads, 0), kv_heads=(*cand.kv_heads, 0), intermediate=(*cand.intermediate, 0))
    assert exact_shape(noop) == shape and with_exact.predict(noop) == pytest.approx((0.5, 0.02))
    # a reference measured above the line (noise the fit averages out): the exact point, stored as its
    # ratio x the reference's measurement, is priced as that ratio x the fit's reference, the basis of
    # every other prediction and of the planner's anchor
    full = archs["full"]
    on_line = a + b * full.layers + c * full.decoder_params
    noisy, _ = _synthetic_table(a, b, c, full=1.1 * on_line)
    ref_fit = noisy.predict(full)[1]
    assert ref_fit != pytest.approx(1.1 * on_line)
    ratio = 0.02 / (1.1 * on_line)
    priced = LatencyTable(noisy.key, [*noisy.points, slow], noisy.source, True).predict(cand)[1]
    assert priced == pytest.approx(ratio * ref_fit)
    # per-layer widths have no exact shape; an exact point must carry its shape
    assert exact_shape(replace(cand, intermediate=(960,) * 15 + (1024,))) is None
    assert TablePoint.from_dict(slow.as_dict()) == slow
    with pytest.raises(ValueError, match="shape"):
        TablePoint.from_dict({**slow.as_dict(), "shape": None})


def test_an_exact_shape_is_measured_against_the_reference_and_cached(tiny_model_dir, tmp_path, monkeypatch):
    """`measure_exact` in torch on a tiny model: the candidate's shape (fewer layers, narrower, with
    the bias switches on) is written with random weights, measured in turn with the reference,
    stored on the table's scale, cached, and not measured twice."""
    from dataclasses import replace

    from compressor.budget.latency_table import EXACT, measure_exact
    from compressor.budget.planner import arch_at_ratio, shallower
    from compressor.budget.shapes import write_random_model

    monkeypatch.setenv("FITPRUNE_CACHE_DIR", str(tmp_path))
    config = json.loads((tiny_model_dir / "config.json").read_text())
    prof = _profile("cpu-2core", round_to=8, workload__prompt_tokens=16, workload__output_tokens=8)
    table = measure_table(prof, config, tiny_model_dir, "torch", ["none"], runs=2, say=lambda *_: None)
    dense = Arch.from_config(config)
    cand = replace(arch_at_ratio(shallower(dense, 1), 0.25, "auto", 8), biased=True)
    # what is measured: the family's own config with its bias switches on
    write_random_model(config, cand, tiny_model_dir, "float32", tmp_path / "w")
    written = json.loads((tmp_path / "w" / "config.json").read_text())
    assert written["attention_bias"] and written["mlp_bias"] and written["num_hidden_layers"] == cand.layers
    said = []
    out = measure_exact(table, prof, config, tiny_model_dir, [(cand, "none"), (cand, "none")], runs=2, say=said.append)
    exact = [p for p in out.points if p.name == EXACT]
    assert len(exact) == 1 and exact[0].shape["biased"] and exact[0].layers == cand.layers
    ref = next(p for p in out.points if p.name == "full")
    ratio = exact[0].measurement["ratio_to_reference"]["tpot"]
    assert exact[0].tpot_s == pytest.approx(ratio * ref.tpot_s)  # on the table's scale
    fit_ref = LatencyTable(table.key, [p for p in out.points if p.name != EXACT], table.source, True).predict(dense)
    assert out.predict(cand) == pytest.approx((exact[0].measurement["ratio_to_reference"]["ttft"] * fit_ref[0],
                                               ratio * fit_ref[1]))  # its ratio x the fit's reference
    assert load_table(prof, config, "torch", table.key["device"]).exact(cand, "none") == exact[0]  # cached
    said.clear()
    assert measure_exact(out, prof, config, tiny_model_dir, [(cand, "none")], runs=2, say=said.append) is out
    assert not said
    # the planner's check (frontier.ExactCheck), anchored as `compress --levers` anchors: a new shape is
    # measured and re-priced; a shape measured before is priced from the cache and said so
    from compressor.budget.frontier import AnchoredTable, Candidate, ExactCheck, predict

    cost = CostModel(prof)
    anchored = AnchoredTable.on(out, dense, *out.predict(dense, "none"))
    other = replace(arch_at_ratio(shallower(dense, 1), 0.5, "auto", 8), biased=True)
    check = ExactCheck(anchored, prof, config, tiny_model_dir, cost, runs=2, say=said.append)
    for arch, measured in ((other, True), (cand, False)):
        c = Candidate(0.5, 1, "none", arch, predict(cost, anchored, arch, "none"), [], 0.5)
        said.clear()
        assert check(c) == c.ok and c.exact
        assert any("measuring" in line for line in said) == measured
        assert ("measured at its exact shape before" in said[-1]) != measured
        assert c.prediction.tpot_s == pytest.approx(anchored.predict(arch, "none")[1])
    assert anchored.table.exact(other, "none") is not None  # the anchored table gained the point
    # the full architecture (a plan of a weight format alone) is the table's own "full" point of its format:
    # its exact point, measured with the table, is not measured again
    c = Candidate(0.0, 0, "none", dense, predict(cost, anchored, dense, "none"), [], 0.0)
    said.clear()
    assert check(c) == c.ok and c.exact
    assert not any("measuring" in line or "latency table:" in line for line in said), said
    assert "is the latency table's full point" in said[-1]
    full = next(p for p in out.points if (p.name, p.format) == ("full", "none"))
    point = anchored.table.exact(dense, "none")
    assert (point.ttft_s, point.tpot_s) == (full.ttft_s, full.tpot_s) and "exact_from" in point.measurement
    assert load_table(prof, config, "torch", table.key["device"]).exact(dense, "none") == point  # cached
    assert list(out.path.parent.iterdir()) == [out.path]  # no temporary files left


def test_a_chain_measures_every_model_beside_a_reference_loaded_before_and_one_loaded_after(monkeypatch):
    """`device.measure_chain` on stand-in runtimes whose speed depends on which engine was loaded
    first (what vLLM CPU showed): engines load reference, A, reference, B, reference (2N + 1), two
    at a time; each model's ratio is the geometric mean of its two rounds, so a load-order effect
    that favours the later engine by the same factor cancels."""
    import contextlib

    from compressor.budget.device import measure_chain

    events, loaded = [], []

    class Fake:
        name, device, dtype = "fake", "cpu", "bfloat16"

        def __init__(self, label, tpot):
            self.label, self.tpot, self.tokenizer = label, tpot, None

        def stream(self, prompt, n):
            return None

        def timed_request(self, prompt, n):
            events.append(("request", self.label))
            # the engine loaded later of the two runs 10% faster
            slow = 1.0 if loaded.index(self) == len(loaded) - 1 else 1.1
            return 0.05 * slow, self.tpot * slow

    def opener(label, tpot):
        @contextlib.contextmanager
        def open_():
            rt = Fake(label, tpot)
            events.append(("load", label))
            loaded.append(rt)
            try:
                yield rt
            finally:
                loaded.remove(rt)
                events.append(("close", label))
        return open_

    monkeypatch.setattr("runtimes.base.benchmark_prompt", lambda tok, n: [1] * n)
    out = measure_chain(opener("ref", 0.02), [opener("A", 0.01), opener("B", 0.015)], 16, 8, runs=3)
    assert [e for e in events if e[0] == "load"] == [("load", x) for x in ("ref", "A", "ref", "B", "ref")]
    assert not loaded and sum(e[0] == "close" for e in events) == 5  # every engine closed
    a, b = out
    assert [r["loaded_first"] for r in a.rounds] == ["reference", "other"]
    assert a.rounds[0]["tpot_ratio"] == pytest.approx(0.5 / 1.1) and a.rounds[1]["tpot_ratio"] == pytest.approx(0.55)
    assert a.tpot_ratio == pytest.approx(0.5) and b.tpot_ratio == pytest.approx(0.75)  # the order cancels
    assert a.reference.runs == 6 and a.other.runs == 6  # both rounds' requests, pooled
