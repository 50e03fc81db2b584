"""Depth pruning (compressor/prune/depth.py): block scores, the iterative removal to a ratio, the
surgery it leaves behind, and `compress --structure depth` end to end, on tiny random models."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from compressor.errors import UserError
from compressor.model import adapter_for
from compressor.prune.depth import (
    BlockScorer,
    Unit,
    attention_params,
    mlp_params,
    prune_depth,
    scoring_windows,
    skipped,
    units_of,
)
from compressor.prune.driver import Compute, PruneSpec
from compressor.prune.widths import layer_params
from tests.conftest import assert_clean_failure, run_cli, tiny_model

FAST = ["--no-checks", "--calib", "builtin", "--nsamples", "4", "--seqlen", "64"]


def _model(layers: int = 6, family: str = "llama-gqa", seed: int = 0):
    return tiny_model(family, seed=seed, layers=layers)


def _calib(n: int = 6, t: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (n, t), generator=torch.Generator().manual_seed(seed))


def _prune(model, blocks: str, ratio: float, **kw):
    return prune_depth(model, adapter_for(model), _calib(), PruneSpec(ratio=ratio), Compute(batch_size=4),
                       say=lambda *_: None, blocks=blocks, windows=4, tokens=0, stride=2, **kw)


def _decoder_weights(model) -> int:
    return sum(p.numel() for n, p in adapter_for(model).layers(model).named_parameters() if n.endswith("weight")
               and "norm" not in n)


def test_unit_costs_are_the_layer_arithmetic():
    m = _model(3)
    ad = adapter_for(m)
    shapes = [ad.shape(layer) for layer in ad.layers(m)]
    h = m.config.hidden_size
    for s in shapes:
        assert attention_params(s, h) + mlp_params(s, h) == layer_params(s, h)
    assert [u.parts for u in units_of(shapes, h, "any")][:2] == [("attention",), ("mlp",)]
    assert {u.params for u in units_of(shapes, h, "layer")} == {layer_params(shapes[0], h)}
    with pytest.raises(UserError, match="Unknown --blocks 'heads'"):
        units_of(shapes, h, "heads")


def test_scores_equal_the_full_model_with_the_block_skipped():
    """The cached-stream score is the KL of the whole model's outputs with the block(s) skipped."""
    m = _model(4)
    ad = adapter_for(m)
    x = _calib(5, 24)
    sc = BlockScorer(m, ad, x, batch_size=2, stride=3)
    with torch.no_grad():
        dense = torch.log_softmax(m(x).logits[:, ::3].float(), -1)
    units = units_of([ad.shape(layer) for layer in ad.layers(m)], m.config.hidden_size, "any")
    sc.remove(units[3])  # layer 1's MLP, then score layer 2's attention on top of it
    with skipped(ad, ad.layers(m), {(1, "mlp"), (2, "attention")}), torch.no_grad():
        logp = torch.log_softmax(m(x).logits[:, ::3].float(), -1)
    want = float((dense.exp() * (dense - logp)).sum(-1).mean())
    assert sc.score(units[4]) == pytest.approx(want, rel=1e-4, abs=1e-7)
    assert want > 0
    # skipping restores every module's own forward afterwards
    with torch.no_grad():
        assert torch.allclose(torch.log_softmax(m(x).logits[:, ::3].float(), -1), dense, atol=1e-5)


@pytest.mark.parametrize("blocks,ratio", [("layer", 0.3), ("attention", 0.15), ("mlp", 0.4), ("any", 0.3)])
def test_ratio_met_and_only_that_kind_removed(blocks, ratio):
    m = _model(6)
    ad = adapter_for(m)
    shape = ad.shape(ad.layers(m)[0])
    h = m.config.hidden_size
    before = _decoder_weights(m)
    res = _prune(m, blocks, ratio)
    notes = res.notes["depth"]
    frac = notes["removed_fraction"]
    # closest achievable: within half of the largest removable unit of the target
    unit = {"layer": layer_params(shape, h), "attention": attention_params(shape, h),
            "mlp": mlp_params(shape, h), "any": mlp_params(shape, h)}[blocks]
    assert abs(frac - ratio) <= 0.5 * unit / (6 * layer_params(shape, h)) + 1e-9
    # the model's own weights agree with the notes (norms of removed blocks go too)
    assert 1 - _decoder_weights(m) / before == pytest.approx(frac, abs=1e-6)
    shapes = [ad.shape(layer) for layer in ad.layers(m)]
    assert shapes[0] == shape  # layer 0 stays whole
    attn_gone = [s.attention_removed for s in shapes]
    mlp_gone = [s.mlp_removed for s in shapes]
    if blocks == "attention":
        assert any(attn_gone) and not any(mlp_gone)
    if blocks == "mlp":
        assert any(mlp_gone) and not any(attn_gone)
    if blocks == "layer":
        assert any(attn_gone) and attn_gone == mlp_gone
    assert res.structure == "depth"
    listed = {(r["layer"], r["block"]) for r in notes["removed"]}
    assert len(listed) == len(notes["removed"])
    for i, s in enumerate(shapes):  # the notes name exactly the removed blocks
        named = {b for (j, b) in listed if j == i}
        if "layer" in named:
            named = {"attention", "mlp"}
        assert named == {p for p, gone in (("attention", s.attention_removed), ("mlp", s.mlp_removed)) if gone}
    assert [len(k.q_heads) == 0 for k in res.keeps] == attn_gone
    assert [len(k.channels) == 0 for k in res.keeps] == mlp_gone


def test_scoring_is_deterministic_and_iterative():
    a, b = _model(6), _model(6)
    ra, rb = _prune(a, "any", 0.3), _prune(b, "any", 0.3)
    assert ra.notes["depth"]["removed"] == rb.notes["depth"]["removed"]
    kls = [r["kl"] for r in ra.notes["depth"]["removed"]]
    assert len(kls) >= 2 and all(k >= 0 for k in kls)
    # each score is measured with the earlier removals in place: the last is the damage of them all
    assert ra.notes["depth"]["final_kl"] == pytest.approx(kls[-1], rel=1e-5)


@pytest.mark.parametrize("family", ["llama-gqa", "qwen2", "qwen3"])
def test_pruned_model_matches_the_scored_model_and_generates(family):
    m = _model(5, family)
    ref = copy.deepcopy(m)
    ad = adapter_for(m)
    res = _prune(m, "any", 0.35)
    gone = {(r["layer"], p) for r in res.notes["depth"]["removed"]
            for p in (("attention", "mlp") if r["block"] == "layer" else (r["block"],))}
    x = _calib(3, 20, seed=7)
    with torch.no_grad(), skipped(ad, ad.layers(ref), gone):
        want = ref(x).logits
    with torch.no_grad():
        got = m(x).logits
    assert torch.allclose(got, want, atol=1e-4)
    out = m.generate(x[:1, :8], max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 14)
    # generation with the KV cache gives the same tokens as without
    no_cache = m.generate(x[:1, :8], max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(out, no_cache)


def test_ratio_beyond_what_the_blocks_hold_is_refused():
    m = _model(4)
    with pytest.raises(UserError, match="--blocks attention can remove at most"):
        _prune(m, "attention", 0.5)


def test_shortlist_rescoring_stays_close():
    """A shortlist re-scores fewer candidates per round and still meets the ratio."""
    m = _model(6)
    res = _prune(m, "layer", 0.3, shortlist=2)
    assert len(res.notes["depth"]["removed"]) == 2  # 2 of 6 equal layers is the closest to 30%


@pytest.mark.parametrize("shortlist", [0, 1])
def test_every_recorded_score_is_measured_with_the_earlier_removals(shortlist):
    """Lazy re-scoring never takes a block on an old score: each removal's KL is the damage of the
    model with it and every earlier removal skipped (a stale score once let harmful blocks through)."""
    m = _model(6)
    ref = copy.deepcopy(m)
    ad = adapter_for(ref)
    removed = _prune(m, "any", 0.45, shortlist=shortlist).notes["depth"]["removed"]
    assert len(removed) >= 4
    sc = BlockScorer(ref, ad, scoring_windows(_calib(), 4), batch_size=4, stride=2)
    for r in removed:
        parts = ("attention", "mlp") if r["block"] == "layer" else (r["block"],)
        sc.remove(Unit(r["layer"], parts, 0))
        assert sc.current_kl() == pytest.approx(r["kl"], rel=1e-4, abs=1e-6)


@pytest.mark.slow
@pytest.mark.integration
def test_compress_structure_depth_end_to_end(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    p = run_cli(str(tiny_model_dir), *FAST, "--structure", "depth", "--blocks", "mlp", "--ratio", "0.3",
                "--out", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["method"]["structure"] == "depth"
    depth = report["method"]["depth"]
    assert depth["blocks"] == "mlp" and depth["removed"]
    assert report["widths"]["intermediate"].count(0) == len(depth["removed"])
    assert report["params"]["achieved_ratio_decoder"] == pytest.approx(depth["removed_fraction"], abs=0.01)


@pytest.mark.integration
def test_bad_blocks_is_one_sentence(tiny_model_dir, tmp_path):
    """An unknown --blocks value, and --blocks without --structure depth."""
    out = tmp_path / "out"
    p = run_cli(str(tiny_model_dir), *FAST, "--structure", "depth", "--blocks", "heads", "--out", str(out))
    assert_clean_failure(p, out, "'heads' is not one of 'auto', 'layer', 'attention', 'mlp', 'any'")
    p = run_cli(str(tiny_model_dir), *FAST, "--blocks", "mlp", "--out", str(out))
    assert_clean_failure(p, out, "it needs --structure depth")


@pytest.mark.integration
def test_depth_refused_out_of_core(tiny_model_dir, tmp_path):
    """--structure depth with --out-of-core on (block scores need the whole model in memory)."""
    out = tmp_path / "out"
    p = run_cli(str(tiny_model_dir), *FAST, "--structure", "depth", "--out-of-core", "on", "--out", str(out))
    assert_clean_failure(p, out, "--structure depth scores every block on the whole model in memory")


def test_blocks_auto_is_whole_layers():
    """`--blocks auto` (the documented default) removes whole layers; it stopped with "Unknown --blocks
    'auto'" after loading the model."""
    a, b = _model(6), _model(6)
    ra, rb = _prune(a, "auto", 0.3), _prune(b, "layer", 0.3)
    assert ra.notes["depth"]["removed_fraction"] == rb.notes["depth"]["removed_fraction"]
    assert [str(x) for x in ra.notes["depth"]["removed"]] == [str(x) for x in rb.notes["depth"]["removed"]]
