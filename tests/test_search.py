"""The AdaPruner-style search on a tiny model: cached statistics, trials, the best one applied."""

import pytest
import torch

from compressor.model import adapter_for
from compressor.prune.driver import Compute
from compressor.prune.engine import RunningStats
from tests.conftest import tiny_model

pytest.importorskip("optuna")


def test_chunk_statistics_merge_exactly():
    torch.manual_seed(0)
    x = torch.randn(300, 5, dtype=torch.float64) * 2 + 1
    parts = [RunningStats(5, gram=True) for _ in range(3)]
    for p, chunk in zip(parts, x.chunk(3), strict=True):
        p.update(chunk)
    merged = parts[0].merge(parts[1]).merge(parts[2])
    whole = RunningStats(5, gram=True)
    whole.update(x)
    assert merged.n == whole.n
    assert torch.allclose(merged.mean, whole.mean) and torch.allclose(merged.var, whole.var)
    assert torch.allclose(merged.gram, whole.gram)


def test_search_runs_trials_and_applies_the_best(tmp_path):
    from compressor.evaluate.perplexity import perplexity
    from compressor.prune.search import Search

    model = tiny_model("llama-gqa", layers=2)
    adapter = adapter_for(model)
    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(0, 128, (8, 32), generator=gen)
    val = torch.randint(0, 128, (4, 32), generator=gen)
    lines = []
    s = Search(model, adapter, calib, Compute(batch_size=4), n_chunks=4, say=lines.append)
    res = s.run(val, ratio=0.3, round_to=8, score=perplexity, trials=4, seed=0)
    assert len(res.trials) == 4
    assert res.best.val_ppl == min(t.val_ppl for t in res.trials)
    # the first two trials are the plain metrics, enqueued
    assert res.trials[0].weights["flap"] == 1.0 and res.trials[1].weights["output-approx"] == 1.0
    before = sum(p.numel() for p in model.model.layers.parameters())
    s.prune(model, res.best, 0.3, 8)
    after = sum(p.numel() for p in model.model.layers.parameters())
    assert 0.2 < 1 - after / before < 0.4
    assert any("trial" in line for line in lines)
