import torch

from compressor.model import adapter_for
from compressor.prune.engine import LayerwiseEngine, RunningStats
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
    # each chunk's product in float32 (the activations' precision), summed over chunks in float64
    assert torch.allclose(s.gram, xf.T @ xf, rtol=1e-6)
    assert not torch.allclose(s.gram, xf.T @ xf, rtol=1e-12), "float32 products, not float64 ones"


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


def test_reference_stream_pairs_dense_and_pruned_activations():
    """With reference=True the engine streams sum x_dense x_pruned^T for the same tokens: equal to the
    Gram matrix at layer 0 (same inputs), and to the dense model's activations x the pruned model's
    after a layer was changed."""
    import copy

    model = tiny_model("llama-gqa")
    dense = copy.deepcopy(model)
    adapter = adapter_for(model)
    samples = torch.randint(0, 128, (5, 16))
    seen = {}

    def visit(i, layer, stats):
        seen[i] = stats
        if i == 0:  # perturb layer 0 so that layer 1's pruned inputs differ from the dense ones
            adapter.mlp(layer).down_proj.weight.data.mul_(0.5)
            return True
        return False

    LayerwiseEngine(model, adapter, samples, batch_size=2, gram=True, reference=True).run(visit)
    assert torch.allclose(seen[0].mlp.cross, seen[0].mlp.gram, rtol=1e-9)

    def down_inputs(m):
        got = []
        h = adapter.mlp(adapter.layers(m)[1]).down_proj.register_forward_pre_hook(
            lambda _m, a: got.append(a[0].reshape(-1, a[0].shape[-1]).double()))
        with torch.no_grad():
            m(samples)
        h.remove()
        return got[0]

    x_dense, x_pruned = down_inputs(dense), down_inputs(model)
    assert not torch.allclose(x_dense, x_pruned, atol=1e-3)
    assert torch.allclose(seen[1].mlp.cross, x_dense.T @ x_pruned, atol=1e-4)
    assert torch.allclose(seen[1].mlp.ref_sum, x_dense.sum(0), atol=1e-4)
    assert torch.allclose(seen[1].mlp.gram, x_pruned.T @ x_pruned, atol=1e-4)
