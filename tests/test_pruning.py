"""Unit tests on tiny random models: metrics, allocation, compensation and surgery, every family."""

import pytest
import torch

from compressor.model import adapter_for
from compressor.model.adapters import LayerShape
from compressor.prune import COMPENSATION, IMPORTANCE, allocation, importance
from compressor.prune.allocation import LayerScores, allocate
from compressor.prune.driver import Compute, PruneSpec, prune, prune_model, score_layers
from compressor.prune.engine import LayerStats, RunningStats
from compressor.prune.surgery import LayerKeep, prune_layer
from tests.conftest import tiny_model


def _samples(n=6, L=16, vocab=128, seed=0):
    return torch.randint(0, vocab, (n, L), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", IMPORTANCE.names())
def test_every_metric_scores_every_channel(family, name):
    model = tiny_model(family)
    adapter = adapter_for(model)
    m = IMPORTANCE.get(name)
    x = _samples()
    extras = m.precompute(model, adapter, x) if m.precompute else None
    scored, _ = score_layers(model, adapter, x, m, Compute(batch_size=4), extras=extras)
    for ls, layer in zip(scored.scores, adapter.layers(model), strict=True):
        shape = adapter.shape(layer)
        assert ls.attn.shape == (shape.num_heads * shape.head_dim,)
        assert ls.mlp.shape == (shape.intermediate_size,)
        assert torch.isfinite(ls.attn).all() and torch.isfinite(ls.mlp).all()
        if name != "fusion":  # fusion returns z-scores
            assert (ls.attn >= 0).all() and (ls.mlp >= 0).all()
        assert ls.mlp.std() > 0


def test_flap_scores_a_constant_channel_zero():
    model = tiny_model("llama-gqa")
    adapter = adapter_for(model)
    layer = adapter.layers(model)[0]
    st = LayerStats(RunningStats(48), RunningStats(64))
    x_attn = torch.randn(200, 48)
    x_mlp = torch.randn(200, 64)
    x_mlp[:, 5] = 3.0  # no fluctuation at all
    x_attn[:, 7] = -1.5
    st.attn.update(x_attn)
    st.mlp.update(x_mlp)
    s = IMPORTANCE.get("flap").fn(adapter, layer, st)
    assert s.mlp[5] == 0 and s.attn[7] == 0
    assert (s.mlp[torch.arange(64) != 5] > 0).all()


def test_flap_score_is_variance_times_column_norm():
    model = tiny_model("llama-mha")
    adapter = adapter_for(model)
    layer = adapter.layers(model)[1]
    st = LayerStats(RunningStats(32), RunningStats(64))
    xa, xm = torch.randn(300, 32) * torch.linspace(0.1, 2, 32), torch.randn(300, 64)
    st.attn.update(xa)
    st.mlp.update(xm)
    s = IMPORTANCE.get("flap").fn(adapter, layer, st)
    w = layer.mlp.down_proj.weight.double()
    expect = xm.double().var(0, unbiased=False) * (w**2).sum(0)
    assert torch.allclose(s.mlp, expect, rtol=1e-6)


def _scores(shape, hidden, attn, mlp):
    return LayerScores(shape, hidden, torch.as_tensor(attn, dtype=torch.float64),
                       torch.as_tensor(mlp, dtype=torch.float64))


def test_query_mode_removes_heads_evenly_from_every_group():
    shape = LayerShape(num_heads=6, num_kv_heads=2, head_dim=2, intermediate_size=8)
    # head scores (per head, 2 channels each): group 0 = heads 0-2, group 1 = heads 3-5
    head = [5, 1, 3, 2, 6, 4]
    attn = [h for h in head for _ in range(2)]
    ls = _scores(shape, 16, attn, list(range(8)))
    keep = allocation._keep(ls, allocation.attention_units(ls, "query"), 1, 8)
    assert keep.q_heads == [0, 2, 4, 5] and keep.kv_heads == [0, 1]
    keep = allocation._keep(ls, allocation.attention_units(ls, "kv"), 1, 8)
    assert keep.kv_heads == [1] and keep.q_heads == [3, 4, 5]  # group 0 mean 3 < group 1 mean 4


def test_global_allocation_hits_the_ratio_and_varies_widths():
    torch.manual_seed(0)
    shape = LayerShape(num_heads=8, num_kv_heads=8, head_dim=8, intermediate_size=256)
    layers = [_scores(shape, 64, torch.rand(64) * (i + 1), torch.rand(256) * (4 - i)) for i in range(4)]
    keeps = allocate(layers, 0.3, "global", round_to=8)
    total = sum(allocation.layer_params(shape, 64) for _ in layers)
    kept = sum(64 * 8 * (2 * len(k.q_heads) + 2 * len(k.kv_heads)) + 3 * 64 * len(k.channels) for k in keeps)
    assert abs((1 - kept / total) - 0.3) < 0.03
    assert len({len(k.channels) for k in keeps}) > 1
    assert all(len(k.channels) % 8 == 0 and len(k.q_heads) >= 1 for k in keeps)


def test_uniform_allocation_gives_identical_widths():
    torch.manual_seed(1)
    shape = LayerShape(num_heads=6, num_kv_heads=2, head_dim=8, intermediate_size=128)
    layers = [_scores(shape, 48, torch.rand(48), torch.rand(128)) for _ in range(3)]
    keeps = allocate(layers, 0.4, "uniform", round_to=16)
    assert len({(len(k.q_heads), len(k.kv_heads), len(k.channels)) for k in keeps}) == 1
    assert len(keeps[0].channels) % 16 == 0


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.2, 1.5])
def test_ratio_outside_open_interval_is_refused(ratio):
    from compressor.errors import UserError

    shape = LayerShape(4, 4, 2, 8)
    with pytest.raises(UserError, match="between 0 and 1"):
        allocate([_scores(shape, 8, torch.rand(8), torch.rand(8))], ratio, "global")


def test_surgery_keeping_everything_changes_nothing(family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    x = _samples(2, 10)
    with torch.no_grad():
        ref = model(x).logits
    for layer in adapter.layers(model):
        s = adapter.shape(layer)
        prune_layer(adapter, layer, LayerKeep(list(range(s.num_heads)), list(range(s.num_kv_heads)),
                                              list(range(s.intermediate_size))))
    with torch.no_grad():
        assert torch.allclose(model(x).logits, ref, atol=1e-6)


def test_surgery_equals_masking(family):
    """Removing units physically gives the same output as zeroing their weights."""
    model = tiny_model(family)
    masked = tiny_model(family)
    adapter = adapter_for(model)
    keeps = []
    for layer_m, layer in zip(adapter.layers(masked), adapter.layers(model), strict=True):
        s = adapter.shape(layer)
        kv = list(range(1, s.num_kv_heads)) or [0]
        q = [h for h in range(s.num_heads) if h // s.heads_per_kv in kv]
        ch = list(range(0, s.intermediate_size, 2))
        keeps.append(LayerKeep(q, kv, ch))
        with torch.no_grad():
            a = adapter.attention(layer_m)
            for h in set(range(s.num_heads)) - set(q):
                a.o_proj.weight[:, h * s.head_dim:(h + 1) * s.head_dim] = 0
            for c in set(range(s.intermediate_size)) - set(ch):
                adapter.mlp(layer_m).down_proj.weight[:, c] = 0
        prune_layer(adapter, layer, keeps[-1])
    x = _samples(2, 12)
    with torch.no_grad():
        assert torch.allclose(model(x).logits, masked(x).logits, atol=1e-5)


def test_bias_compensation_is_exact_for_constant_channels():
    """A removed channel whose input never changes is replaced exactly by the bias."""
    model = tiny_model("llama-mha")
    adapter = adapter_for(model)
    layer = adapter.layers(model)[0]
    mlp = adapter.mlp(layer)
    x = torch.randn(50, 64)
    x[:, :16] = torch.randn(16)  # channels 0..15 constant over tokens
    st = LayerStats(RunningStats(32), RunningStats(64))
    st.attn.update(torch.randn(50, 32))
    st.mlp.update(x)
    keep = LayerKeep(list(range(4)), list(range(4)), list(range(16, 64)))
    with torch.no_grad():
        ref = mlp.down_proj(x)
    fix = COMPENSATION.get("bias").fn(adapter, layer, keep, st)
    prune_layer(adapter, layer, keep, o_bias=fix.o_bias, down_bias=fix.down_bias)
    with torch.no_grad():
        got = adapter.mlp(layer).down_proj(x[:, 16:])
    assert torch.allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize("structure", ["global", "uniform"])
@pytest.mark.parametrize("comp", COMPENSATION.names())
def test_prune_model_end_to_end_on_tiny_models(family, structure, comp):
    model = tiny_model(family)
    adapter = adapter_for(model)
    before = sum(p.numel() for p in model.model.layers.parameters())
    scored, _ = score_layers(model, adapter, _samples(), IMPORTANCE.get("flap"), Compute(batch_size=4))
    keeps = allocate(scored.scores, 0.3, structure, round_to=8, standardized=structure == "global")
    if COMPENSATION.get(comp).needs_gram:
        prune(model, adapter, _samples(), PruneSpec("flap", comp, structure, 0.3, round_to=8), Compute(batch_size=4))
    else:
        prune_model(model, adapter, keeps, scored, COMPENSATION.get(comp))
    after = sum(p.numel() for p in model.model.layers.parameters())
    assert 0.15 < 1 - after / before < 0.45
    with torch.no_grad():
        out = model.generate(_samples(1, 5), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)


@pytest.mark.parametrize("name", IMPORTANCE.names())
@pytest.mark.parametrize("structure", ["global", "uniform"])
def test_every_metric_prunes_end_to_end(name, structure):
    model = tiny_model("llama-gqa")
    adapter = adapter_for(model)
    comp = "fold" if name == "mi" else "lsq+bias"
    res = prune(model, adapter, _samples(8), PruneSpec(name, comp, structure, 0.3, round_to=8), Compute(batch_size=4))
    assert res.passes == (2 if (structure == "global" and IMPORTANCE.get(name).sequential) else 1)
    assert all(len(k.q_heads) % len(k.kv_heads) == 0 for k in res.keeps)
    with torch.no_grad():
        assert torch.isfinite(model(_samples(2, 8)).logits).all()


def test_lsq_is_exact_when_kept_channels_span_the_removed_ones():
    from compressor.prune.compensation import least_squares

    torch.manual_seed(0)
    kept = torch.arange(0, 12)
    base = torch.randn(500, 12, dtype=torch.float64)
    mix = torch.randn(12, 6, dtype=torch.float64)
    x = torch.cat([base, base @ mix], 1)  # channels 12..17 are combinations of kept ones
    w = torch.randn(5, 18, dtype=torch.float64)
    st = RunningStats(18, gram=True)
    st.update(x)
    new_w, b = least_squares(w, st.gram, st.mean, st.n, kept, intercept=False, ridge=1e-12)
    assert b is None
    assert torch.allclose(x[:, kept] @ new_w.T, x @ w.T, atol=1e-6)
    # with an intercept: removed channels = combination + constant
    x2 = torch.cat([base, base @ mix + 3.0], 1)
    st2 = RunningStats(18, gram=True)
    st2.update(x2)
    new_w, b = least_squares(w, st2.gram, st2.mean, st2.n, kept, intercept=True, ridge=1e-12)
    assert torch.allclose(x2[:, kept] @ new_w.T + b, x2 @ w.T, atol=1e-5)


def test_lsq_with_a_strong_ridge_is_flap_bias_compensation():
    """The ridge pulls the re-fit towards the kept weights as they are, so with little data (a strong
    ridge) least squares + intercept becomes FLAP's bias compensation, not a shrunken, over-fitted W'."""
    from compressor.prune.compensation import least_squares

    torch.manual_seed(0)
    x = torch.randn(50, 20, dtype=torch.float64) + torch.linspace(-1, 1, 20, dtype=torch.float64)
    w = torch.randn(6, 20, dtype=torch.float64)
    st = RunningStats(20, gram=True)
    st.update(x)
    kept, removed = torch.arange(0, 20, 2), torch.arange(1, 20, 2)
    new_w, b = least_squares(w, st.gram, st.mean, st.n, kept, intercept=True, ridge=1e8)
    assert torch.allclose(new_w, w[:, kept], atol=1e-5)
    assert torch.allclose(b, w[:, removed] @ st.mean[removed], atol=1e-5)


def test_lsq_towards_dense_undoes_an_affine_input_error():
    """When the dense input R is an affine function of the pruned model's input X, the re-fit towards
    the dense outputs reproduces W R exactly from X."""
    from compressor.prune.compensation import least_squares

    torch.manual_seed(0)
    x = torch.randn(400, 10, dtype=torch.float64)
    a, c = torch.randn(10, 10, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    r = x @ a + c
    w = torch.randn(4, 10, dtype=torch.float64)
    st = RunningStats(10, gram=True)
    st.update(x)
    st.update_cross(r, x)
    kept = torch.arange(10)
    new_w, b = least_squares(w, st.gram, st.mean, st.n, kept, intercept=True, ridge=1e-12,
                             cross=st.cross, ref_sum=st.ref_sum)
    assert torch.allclose(x @ new_w.T + b, r @ w.T, atol=1e-6)
    plain, _ = least_squares(w, st.gram, st.mean, st.n, kept, intercept=True, ridge=1e-12)
    assert torch.allclose(plain, w, atol=1e-6)  # without the reference it keeps W (target W X)


def test_lsq_compensation_beats_bias_on_correlated_channels():
    model = tiny_model("llama-mha")
    adapter = adapter_for(model)
    layer = adapter.layers(model)[0]
    torch.manual_seed(0)
    base = torch.randn(400, 32)
    x = torch.cat([base, base @ torch.randn(32, 32) * 0.3 + 0.1 * torch.randn(400, 32)], 1)  # [400, 64]
    st = LayerStats(RunningStats(32, gram=True), RunningStats(64, gram=True))
    st.attn.update(torch.randn(400, 32))
    st.mlp.update(x)
    keep = LayerKeep(list(range(4)), list(range(4)), list(range(32)))
    w = adapter.mlp(layer).down_proj.weight.detach().clone()
    ref = x @ w.T
    errs = {}
    for name in ("bias", "lsq", "lsq+bias"):
        fix = COMPENSATION.get(name).fn(adapter, layer, keep, st)
        new_w = fix.down_weight if fix.down_weight is not None else w[:, :32].double()
        out = x[:, :32].double() @ new_w.T + (fix.down_bias if fix.down_bias is not None else 0)
        errs[name] = float(((out - ref.double()) ** 2).mean())
    assert errs["lsq+bias"] <= errs["lsq"] * 1.01 and errs["lsq"] < 0.5 * errs["bias"]


def test_mi_removes_a_duplicated_neuron_first():
    model = tiny_model("llama-mha")
    adapter = adapter_for(model)
    layer = adapter.layers(model)[0]
    torch.manual_seed(0)
    x = torch.randn(2000, 64)
    x[:, 10] = 2 * x[:, 40] + 1  # neuron 10 carries exactly neuron 40's information
    st = LayerStats(RunningStats(32), RunningStats(64, sample_rows=2000))
    st.attn.update(torch.randn(2000, 32))
    st.mlp.update(x)
    s = IMPORTANCE.get("mi").fn(adapter, layer, st)
    order = torch.argsort(s.mlp)
    assert int(order[0]) in (10, 40) and float(s.mlp[order[0]]) < 1e-6
    assert float(s.mlp[50 - int(order[0])]) > 0.01  # its partner is not condemned with it
    # and folding it into the partner reproduces the layer output
    removed = int(order[0])
    keep = LayerKeep(list(range(4)), list(range(4)), [c for c in range(64) if c != removed])
    fix = COMPENSATION.get("fold").fn(adapter, layer, keep, st)
    w = adapter.mlp(layer).down_proj.weight.detach().double()
    ref = x.double() @ w.T
    out = x[:, keep.channels].double() @ fix.down_weight.T + fix.down_bias
    assert torch.allclose(out, ref, atol=1e-4)


def test_output_approx_gives_a_silent_head_zero():
    model = tiny_model("llama-mha")
    adapter = adapter_for(model)
    layer = adapter.layers(model)[0]
    with torch.no_grad():
        adapter.attention(layer).o_proj.weight[:, 8:16] = 0  # head 1 writes nothing
    st = LayerStats(RunningStats(32, gram=True), RunningStats(64, gram=True))
    st.attn.update(torch.randn(300, 32))
    st.mlp.update(torch.randn(300, 64))
    s = IMPORTANCE.get("output-approx").fn(adapter, layer, st)
    heads = s.attn.view(4, 8)[:, 0]
    assert heads[1].abs() < 1e-9 and (heads[[0, 2, 3]] > 0).all()


def test_fusion_leans_on_the_stable_estimate():
    torch.manual_seed(0)
    truth = torch.rand(200)
    stable = truth + 0.01 * torch.randn(4, 200)
    noisy = truth + 1.0 * torch.randn(4, 200)
    fused, w = importance.fuse(stable, noisy)
    assert w > 0.9
    fused2, w2 = importance.fuse(noisy, stable)
    assert w2 < 0.1
    assert torch.corrcoef(torch.stack([fused, truth.double()]))[0, 1] > 0.99


def test_obs_gives_a_predictable_channel_a_low_score():
    """A channel that is a linear function of others costs nothing after the re-fit."""
    model = tiny_model("llama-mha")
    adapter = adapter_for(model)
    layer = adapter.layers(model)[0]
    torch.manual_seed(0)
    x = torch.randn(3000, 64)
    x[:, 7] = 0.5 * x[:, 3] - 2 * x[:, 20] + 1.0  # predictable
    st = LayerStats(RunningStats(32, gram=True), RunningStats(64, gram=True))
    st.attn.update(torch.randn(3000, 32))
    st.mlp.update(x)
    s = IMPORTANCE.get("obs").fn(adapter, layer, st)
    flap = IMPORTANCE.get("flap").fn(adapter, layer, st)
    dependent = [3, 7, 20]  # any one of them is predictable from the other two
    others = [c for c in range(64) if c not in dependent]
    assert s.mlp[dependent].max() < s.mlp[others].min()
    assert flap.mlp[dependent].max() > flap.mlp[others].min()  # variance alone does not see it


@pytest.mark.parametrize("comp", ["lsq+bias", "bias", "lsq", "fold"])
def test_a_half_that_keeps_every_unit_is_left_as_it_is(comp):
    """Nothing removed, nothing compensated: a layer keeping all its MLP channels (attention pruned)
    keeps its dense down_proj and gets no bias there, and one keeping everything is untouched; only
    the cut half is re-fitted. (A bias is not free: stock Llama then switches on every projection's
    bias, and vLLM CPU's int8 W8A8 kernel is slower with them.)"""
    model = tiny_model("llama-gqa", layers=2)
    adapter = adapter_for(model)
    scored, _ = score_layers(model, adapter, _samples(), IMPORTANCE.get("flap"), Compute(batch_size=4),
                             keep_gram=COMPENSATION.get(comp).needs_gram)
    layers = adapter.layers(model)
    s = adapter.shape(layers[0])
    dense = [{k: v.clone() for k, v in lyr.state_dict().items()} for lyr in layers]
    keep_heads = list(range(s.num_kv_heads - 1)), list(range((s.num_kv_heads - 1) * s.heads_per_kv))
    keeps = [LayerKeep(keep_heads[1], keep_heads[0], list(range(s.intermediate_size))),  # attention cut only
             LayerKeep(list(range(s.num_heads)), list(range(s.num_kv_heads)), list(range(s.intermediate_size)))]
    prune_model(model, adapter, keeps, scored, COMPENSATION.get(comp))
    first, second = layers
    assert first.mlp.down_proj.bias is None
    assert torch.equal(first.mlp.down_proj.weight, dense[0]["mlp.down_proj.weight"])
    if COMPENSATION.get(comp).adds_bias:
        assert first.self_attn.o_proj.bias is not None  # the cut half is compensated
    for name, value in second.state_dict().items():
        assert torch.equal(value, dense[1][name]), name
    assert second.self_attn.o_proj.bias is None and second.mlp.down_proj.bias is None
