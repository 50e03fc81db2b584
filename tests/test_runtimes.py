"""The runtime interface (runtimes/base.py) and its torch implementation, on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch

from runtimes.base import (
    RUNTIMES,
    Measurement,
    RuntimeUnavailable,
    available_runtimes,
    benchmark_prompt,
    get_runtime,
    load_runtime,
)
from runtimes.torch_runtime import TorchRuntime


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


def test_measure_reports_medians_and_device(rt):
    m = rt.measure(prompt_tokens=24, output_tokens=4, concurrency=2, runs=2, warmup=1)
    assert isinstance(m, Measurement)
    assert m.runtime == "torch" and m.device.startswith("cpu: ") and "1 thread" in m.device
    assert m.ttft_s > 0 and m.tpot_s > 0 and m.throughput_tok_s > 0
    assert (m.prompt_tokens, m.output_tokens, m.concurrency, m.runs) == (24, 4, 2, 2)
    assert set(m.as_dict()) >= {"ttft_s", "tpot_s", "throughput_tok_s", "device"}


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
    assert got == want
