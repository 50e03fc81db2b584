"""Integration tests on the real embedded model, SmolLM2-135M-Instruct (the 'demo' extra)."""

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from compressor.config import RunConfig
from compressor.evaluate.perplexity import perplexity
from compressor.pipeline import prepare
from compressor.prune import COMPENSATION, IMPORTANCE, allocation
from compressor.prune.driver import collect_stats, prune_model, score
from exporters import export_hf
from tests.conftest import run_cli, run_python
from tests.test_export import RELOAD

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture(scope="module")
def calibrated(smollm2_dir):
    torch.manual_seed(0)
    opts = RunConfig(model=str(smollm2_dir), nsamples=32, seqlen=256, eval_samples=16)
    prep = prepare(opts)
    stats, _ = collect_stats(prep.loaded.model, prep.adapter, prep.calib, opts.compute)
    return prep, stats


def _prune(calibrated, metric, structure, comp, ratio=0.2):
    prep, stats = calibrated
    model = copy.deepcopy(prep.loaded.model)
    m = IMPORTANCE.get(metric)
    scored = score(model, prep.adapter, stats, m)
    keeps = allocation.allocate(scored.scores, ratio, structure, "auto", 64, standardized=m.standardize)
    prune_model(model, prep.adapter, keeps, scored, COMPENSATION.get(comp))
    return model


def test_flap_beats_magnitude_at_20_percent(calibrated):
    prep, _ = calibrated
    dense = perplexity(prep.loaded.model, prep.heldout)
    flap = perplexity(_prune(calibrated, "flap", "global", "bias"), prep.heldout)
    mag = perplexity(_prune(calibrated, "magnitude", "uniform", "none"), prep.heldout)
    print(f"held-out perplexity: dense {dense:.2f}, flap {flap:.2f}, magnitude {mag:.2f}")
    assert dense < flap < mag


@pytest.mark.parametrize("structure,fmt", [("uniform", "native"), ("global", "fitprune")])
def test_exports_of_the_real_model_reload_with_the_same_logits(calibrated, tmp_path, structure, fmt):
    prep, _ = calibrated
    model = _prune(calibrated, "flap", structure, "bias")
    res = export_hf(model, prep.loaded.tokenizer, tmp_path)
    assert res.format == fmt
    ids = prep.heldout[:2, :64].contiguous()
    with torch.no_grad():
        logits = model(ids).logits
    save_file({"input_ids": ids, "logits": logits.contiguous()}, str(tmp_path / "expected.safetensors"))
    for mode in ("registered",) + (("remote",) if fmt == "fitprune" else ()):
        p = run_python(RELOAD, mode, str(tmp_path))
        assert p.returncode == 0, p.stderr[-3000:]
        (_cls, diff), = json.loads(p.stdout.strip().splitlines()[-1]).values()
        # float32 rounding only: the export adds zero biases (addmm instead of mm) and the BLAS kernels differ
        # between CPUs; measured 0 to 1.7e-4 on logits spanning about +-30. A wrong or missing weight shows as >0.1.
        assert diff <= 1e-3, (mode, diff)


def test_main_command_on_the_embedded_model(tmp_path):
    out = tmp_path / "smol"
    # the README's main command, smaller: 3 generations of the allocation search (the default structure
    # for this model on a CPU) instead of 30, which would add about 5 minutes
    p = run_cli("--profile", "cpu-2core", "--ratio", "0.2", "--no-checks", "--nsamples", "16", "--seqlen", "128",
                "--search-generations", "3", "--domain-windows", "0", "--out", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads((out / "report.json").read_text())
    assert 0.17 < r["params"]["achieved_ratio_decoder"] < 0.23
    assert r["perplexity"]["pruned"] > r["perplexity"]["dense"] > 1
    assert r["export"]["format"] == "fitprune" and r["method"]["structure"] == "searched"
    assert "structure searched (auto" in p.stderr and "generation 3/3" in p.stderr and "30/30 layers" in p.stderr
