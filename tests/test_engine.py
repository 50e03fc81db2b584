import torch

from compressor.adapters import adapter_for
from compressor.engine import LayerwiseEngine, RunningStats
from tests.conftest import tiny_model


def test_running_stats_match_direct_computation():
    torch.manual_seed(0)
    x = torch.randn(1000, 7, dtype=torch.float64) * 3 + 5
    s = RunningStats(7, gram=True)
    for chunk in x.split(137):
        s.update(chunk.float())
    xf = x.float().double()
    assert torch.allclose(s.mean, xf.mean(0), atol=1e-9)
    assert torch.allclose(s.var, xf.var(0, unbiased=False), atol=1e-7)
    assert torch.allclose(s.sq_norm, (xf**2).sum(0), rtol=1e-9)
    assert torch.allclose(s.gram, xf.T @ xf, rtol=1e-9)


def test_engine_propagates_exactly_like_the_full_model(family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    samples = torch.randint(0, 128, (5, 16))
    seen = {}

    def visit(i, layer, stats):
        seen[i] = (stats.attn.n, stats.mlp.n, stats.attn.mean.numel(), stats.mlp.mean.numel())
        return False

    eng = LayerwiseEngine(model, adapter, samples, batch_size=2)
    # capture the last layer's output through the engine
    outputs = {}
    last = adapter.layers(model)[-1]
    h = last.register_forward_hook(
        lambda m, a, o: outputs.setdefault("y", []).append(o if torch.is_tensor(o) else o[0]))
    eng.run(visit)
    h.remove()
    got = torch.cat(outputs["y"])
    # the same layer's output when the whole model runs at once
    raw = []
    h = last.register_forward_hook(lambda m, a, o: raw.append(o if torch.is_tensor(o) else o[0]))
    with torch.no_grad():
        model(samples)
    h.remove()
    assert torch.allclose(got, raw[0], atol=1e-5)
    n_layers = len(adapter.layers(model))
    assert sorted(seen) == list(range(n_layers))
    assert all(v[0] == 5 * 16 and v[1] == 5 * 16 for v in seen.values())
