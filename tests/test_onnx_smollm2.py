"""ONNX Runtime serves the real embedded model (SmolLM2-135M-Instruct) pruned 20% with FLAP:
uniform widths with bias compensation (-> LlamaForCausalLM with attention/MLP biases) and
per-layer widths with bias compensation (-> FitPruneForCausalLM). Each goes HF export ->
transformers reload -> ONNX export -> ONNX Runtime, and is compared with the reloaded
transformers model (float32):

- logits over 2 x 64 held-out tokens within LOGITS_TOL (measured: ~5e-5 to 1e-4; logits of this
  model span about +-30, so 1e-3 is ~3e-5 relative),
- greedy tokens for a set of chat prompts (batched and left-padded in ONNX Runtime, one by one in
  transformers) identical.

The exports skip onnxscript's graph optimizer (`optimize=False`): it costs about half the export
time on a 30-layer model, and the tiny-model tests cover the optimized graph.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from compressor.config import RunConfig
from compressor.pipeline import prepare
from compressor.prune.driver import PruneSpec, collect_stats, prune
from exporters import export_hf
from exporters.onnx import export_onnx

pytestmark = [pytest.mark.slow, pytest.mark.integration]
pytest.importorskip("onnxruntime", reason="the 'onnx' extra is not installed")

from runtimes.onnx_runtime import OnnxRuntime  # noqa: E402

LOGITS_TOL = 1e-3
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence why the sky is blue.",
    "List three prime numbers.",
]
NEW_TOKENS = 20


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One thread each for torch and ONNX Runtime: on a shared 2-core machine, thread pools that
    spin against each other (and against other jobs) cost far more than they bring."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def calibrated(smollm2_dir):
    torch.manual_seed(0)
    opts = RunConfig(model=str(smollm2_dir), nsamples=16, seqlen=128, eval_samples=2, batch_size=8)
    prep = prepare(opts)
    stats, _ = collect_stats(prep.loaded.model, prep.adapter, prep.calib, opts.compute)
    return prep, stats, opts


@pytest.fixture(scope="module", params=[("uniform", "native"), ("global", "fitprune")],
                ids=["uniform-bias", "per-layer-bias"])
def served(request, calibrated, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    import compressor.model.hf_arch  # noqa: F401

    structure, fmt = request.param
    prep, stats, opts = calibrated
    model = copy.deepcopy(prep.loaded.model)
    spec = PruneSpec(metric="flap", compensation="bias", structure=structure, ratio=0.2, round_to=64)
    prune(model, prep.adapter, prep.calib, spec, opts.compute, dense_stats=stats)
    root = tmp_path_factory.mktemp(f"smol-{structure}")
    hf_dir, onnx_dir = root / "hf", root / "onnx"
    hf_dir.mkdir()
    onnx_dir.mkdir()
    res = export_hf(model, prep.loaded.tokenizer, hf_dir)
    assert res.format == fmt
    ref = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    assert ref.model.layers[0].mlp.down_proj.bias is not None  # bias compensation is in the graph
    export_onnx(ref, prep.loaded.tokenizer, onnx_dir, optimize=False)
    rt = OnnxRuntime(onnx_dir, threads=1)
    yield ref, rt, prep
    rt.close()


def test_logits_match_transformers(served):
    ref, rt, prep = served
    ids = prep.heldout[:2, :64]
    with torch.no_grad():
        want = ref(ids).logits.numpy()
    diff = float(np.abs(rt.logits(ids.numpy()) - want).max())
    print(f"max |logit diff| ONNX Runtime vs transformers: {diff:.2e}")
    assert diff <= LOGITS_TOL


def test_greedy_tokens_match_transformers(served):
    ref, rt, prep = served
    tok = prep.loaded.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False) for p in PROMPTS]
    prompts = [list(p["input_ids"]) if isinstance(p, dict) else list(p) for p in prompts]
    got = rt.generate(prompts, NEW_TOKENS)
    for p, g in zip(prompts, got, strict=True):
        with torch.no_grad():
            want = ref.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                pad_token_id=tok.pad_token_id or 0)[0, len(p):].tolist()
        assert g.token_ids == want, (tok.decode(g.token_ids), tok.decode(want))
