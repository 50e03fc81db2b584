"""The runtime interface (runtimes/base.py) and its torch implementation, on a tiny random Llama."""

from __future__ import annotations

import dataclasses
import statistics

import pytest
import torch

from runtimes.base import (
    RUNTIMES,
    Measurement,
    MeasurementError,
    RuntimeUnavailable,
    TokenTimes,
    available_runtimes,
    benchmark_prompt,
    get_runtime,
    load_runtime,
)
from runtimes.torch_runtime import TorchRuntime
from tests.conftest import assert_clean_failure, run_cli


@pytest.fixture(scope="module")
def rt(tiny_model_dir):
    with load_runtime("torch", tiny_model_dir, threads=1) as r:
        yield r


def _argmax_loop(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding without KV cache or padding: the reference for `generate`."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_registry_names_and_errors():
    assert get_runtime("torch") is TorchRuntime and RUNTIMES.get("torch") is TorchRuntime
    assert "torch" in available_runtimes()
    with pytest.raises(RuntimeUnavailable, match="Unknown runtime 'tensorrt'"):
        get_runtime("tensorrt")


def test_generate_is_greedy_with_left_padding(rt):
    prompts = [[5, 17, 300, 42, 9, 1000], [7, 8], [123, 456, 789]]
    gens = rt.generate(prompts, 6, ignore_eos=True, logprobs=3)
    for p, g in zip(prompts, gens, strict=True):
        assert g.token_ids == _argmax_loop(rt.model, p, 6)
        assert len(g.logprobs) == 6
        for tok, lp in zip(g.token_ids, g.logprobs, strict=True):
            assert max(lp, key=lp.get) == tok and len(lp) == 3 and all(v <= 0 for v in lp.values())


def test_generate_stops_at_eos_unless_ignored(rt):
    prompt = [11, 22, 33, 44]
    full = rt.generate([prompt], 8, ignore_eos=True)[0].token_ids
    cfg = rt.model.generation_config
    old = cfg.eos_token_id
    cfg.eos_token_id = full[2]
    try:
        stopped = rt.generate([prompt], 8)[0].token_ids
        forced = rt.generate([prompt], 8, ignore_eos=True)[0].token_ids
    finally:
        cfg.eos_token_id = old
    assert stopped == full[: full.index(full[2]) + 1]
    assert forced == full


def test_measure_reports_medians_spread_and_device(rt):
    m = rt.measure(prompt_tokens=24, output_tokens=4, concurrency=2, runs=3, warmup=1)
    assert isinstance(m, Measurement)
    assert m.runtime == "torch" and m.device.startswith("cpu: ") and "1 thread" in m.device
    assert m.ttft_s > 0 and m.tpot_s > 0 and m.throughput_tok_s > 0
    assert (m.prompt_tokens, m.output_tokens, m.concurrency, m.runs) == (24, 4, 2, 3)
    d = m.as_dict()
    assert set(d) >= {"ttft_s", "tpot_s", "throughput_tok_s", "device", "timing"}
    for key, unit in (("ttft", "s"), ("tpot", "s"), ("throughput", "tok_s")):
        runs = d[f"{key}_runs_{unit}"]
        assert len(runs) == 3 and all(v > 0 for v in runs)
        assert d[f"{key}_{unit}"] == statistics.median(runs)
        assert d[f"{key}_min_{unit}"] == min(runs) and d[f"{key}_max_{unit}"] == max(runs)


def test_stream_times_every_token_of_the_greedy_decode(rt):
    """One streamed request: the tokens are `generate`'s greedy tokens, each with its own arrival
    time after the start, so TTFT and TPOT are two figures of the same request."""
    prompt = [5, 17, 300, 42, 9, 1000, 7]
    t = rt.stream(prompt, 6)
    assert list(t.token_ids) == rt.generate([prompt], 6, ignore_eos=True)[0].token_ids
    assert len(t.arrivals) == 6 and t.start < t.arrivals[0]
    assert all(b > a for a, b in zip(t.arrivals, t.arrivals[1:], strict=False))
    assert t.ttft_s == t.arrivals[0] - t.start and t.tpot_s == pytest.approx((t.arrivals[-1] - t.arrivals[0]) / 5)
    ttft, tpot = rt.timed_request(prompt, 6)
    assert ttft > 0 and tpot > 0


class _AllAtOnce(TorchRuntime):
    """The torch runtime with its clock read only at the end, as a runtime that does not stream
    (it hands every token over in one final chunk) would time it."""

    def stream(self, prompt, max_new_tokens):
        t = super().stream(prompt, max_new_tokens)
        return dataclasses.replace(t, arrivals=(t.arrivals[-1],) * len(t.arrivals))


def test_a_zero_time_per_token_is_refused_not_reported(tiny_model_dir):
    """The old method clamped a negative difference to 0 ms, which passes any budget. Now a TPOT
    that is not a positive time is a MeasurementError, and so is a stream of the wrong length."""
    with _AllAtOnce(tiny_model_dir, threads=1) as r:
        with pytest.raises(MeasurementError, match="time per output token of 0.0"):
            r.timed_request([5, 17, 300], 4)
        with pytest.raises(MeasurementError):
            r.measure(prompt_tokens=16, output_tokens=4, concurrency=1, runs=1, warmup=0)
    assert TokenTimes(1.0, (1.5, 2.0, 2.5)).tpot_s == 0.5


def test_measure_batch1_uses_the_streamed_timing(rt):
    """The cost-model fit measures with the same streamed requests, medians and spread."""
    from compressor.budget.device import measure_batch1

    m = measure_batch1(rt, prompt_tokens=16, output_tokens=4, runs=3)
    assert m.concurrency == 1 and len(m.ttft_runs_s) == len(m.tpot_runs_s) == 3
    assert m.tpot_s == statistics.median(m.tpot_runs_s) > 0 and m.ttft_s == statistics.median(m.ttft_runs_s) > 0


def test_benchmark_prompts_have_the_length_asked_for(rt):
    a, b = benchmark_prompt(rt.tokenizer, 300), benchmark_prompt(rt.tokenizer, 300, seed=1)
    assert len(a) == len(b) == 300 and a != b


def test_bad_dtype_is_one_clear_error(tiny_model_dir):
    with pytest.raises(ValueError, match="Unsupported dtype 'int3'"):
        TorchRuntime(tiny_model_dir, dtype="int3")


def test_open_runtime_serves_a_hf_directory_in_onnxruntime(rt, tiny_model_dir):
    """Planner calibration and checks hand Hugging Face directories to the runtime of a profile; for
    ONNX Runtime `open_runtime` exports them first, and the greedy tokens are the torch runtime's."""
    pytest.importorskip("onnxruntime", reason="the 'onnx' extra is not installed")
    from compressor.budget.device import open_runtime

    prompts = [[5, 17, 99, 3], [42, 8]]
    want = [g.token_ids for g in rt.generate(prompts, 6, ignore_eos=True)]
    with open_runtime("onnxruntime", tiny_model_dir, "float32", 1) as ort_rt:
        assert ort_rt.name == "onnxruntime"
        got = [g.token_ids for g in ort_rt.generate(prompts, 6, ignore_eos=True)]
        streamed = ort_rt.stream(prompts[0], 6)
    assert got == want
    # ONNX Runtime's decode loop streams the same greedy tokens, each with its own arrival time
    assert list(streamed.token_ids) == want[0] and len(set(streamed.arrivals)) == 6 and streamed.ttft_s > 0


@pytest.mark.slow
@pytest.mark.integration
def test_plan_measuring_where_vllm_cannot_run_the_model_is_one_sentence(tiny_model_dir):
    """Issue 11: the plan's measurement on the device ended in a vLLM traceback when vLLM could not
    run the model. The tiny model's head size (8) has no vLLM CPU attention kernel: one sentence."""
    pytest.importorskip("vllm", reason="vLLM is not installed")
    p = run_cli("plan", str(tiny_model_dir), "--profile", "cpu-2core", "--fit", timeout=600)
    assert_clean_failure(p, None, "The latency table cannot be measured on this machine: vllm cannot run the "
                                  "reference (the full architecture)", code=2)
    assert "has no kernel for head size 8" in " ".join(p.stderr.split())


@pytest.mark.slow
def test_plan_measuring_where_the_runtime_fails_is_one_sentence(tiny_model_dir, tmp_path):
    """Any failure of the runtime while the plan measures its latency table (here: ONNX Runtime asked
    for bfloat16, which its CPU provider cannot run) ends in one sentence, not the runtime's traceback."""
    pytest.importorskip("onnxruntime", reason="the 'onnx' extra is not installed")
    import yaml

    from profiles import load_profile

    prof = load_profile("cpu-2core-onnx").model_dump()
    prof["dtype"] = "bfloat16"
    path = tmp_path / "onnx-bf16.yaml"
    path.write_text(yaml.safe_dump(prof))
    p = run_cli("plan", str(tiny_model_dir), "--profile", str(path), "--fit", timeout=600)
    assert_clean_failure(p, None, "The latency table cannot be measured on this machine: onnxruntime cannot run the "
                                  "reference (the full architecture)", code=2)


VLLM_STREAM = r"""
import json, sys
from runtimes.vllm_runtime import VllmRuntime
with VllmRuntime(sys.argv[1], dtype="bfloat16", threads=2, max_model_len=256, max_num_seqs=4) as rt:
    prompt = rt.encode("The capital of France is")
    t = rt.stream(prompt, 8)
    g = rt.generate([prompt], 8, ignore_eos=True)[0].token_ids
    m = rt.measure(prompt_tokens=32, output_tokens=8, concurrency=2, runs=3, warmup=1).as_dict()
print("RESULT " + json.dumps({"stream": list(t.token_ids), "generate": g, "arrivals": list(t.arrivals),
                              "start": t.start, "measure": m}))
"""


@pytest.mark.slow
@pytest.mark.integration
def test_vllm_streams_one_token_per_engine_step(smollm2_dir):
    """vLLM's offline engine stepped by hand with DELTA outputs: the streamed tokens are its greedy
    tokens and each arrives at its own time (a FINAL_ONLY request would hand all 8 over at once)."""
    pytest.importorskip("vllm", reason="vLLM is not installed")
    import json

    from tests.conftest import run_python

    p = run_python(VLLM_STREAM, str(smollm2_dir), env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, p.stderr[-3000:]
    r = json.loads(line[len("RESULT "):])
    assert r["stream"] == r["generate"] and len(r["stream"]) == 8
    assert len(set(r["arrivals"])) == 8 and r["start"] < r["arrivals"][0]
    m = r["measure"]
    assert m["runtime"] == "vllm" and len(m["tpot_runs_s"]) == 3 and m["tpot_min_s"] > 0 and m["ttft_min_s"] > 0
