"""Every lever (issue 12): the frontier over (width, layers dropped, weight format) priced by a
latency table (budget/frontier.py), the KL of its candidates on the weights and the pruning to one
(prune/planned.py), `compress plan`'s frontier and `compress --levers` end to end."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml

from compressor.budget.frontier import search, shallower
from compressor.budget.latency_table import LatencyTable, TablePoint, architectures, format_problem
from compressor.model import adapter_for
from compressor.prune.driver import Compute, PruneSpec
from compressor.prune.planned import PlanQuality, fake_quantized
from profiles import load_profile
from profiles.costmodel import Arch, CostModel
from tests.conftest import assert_clean_failure, run_cli, tiny_model

SMOLLM2 = Arch(576, 49152, 64, (9,) * 30, (3,) * 30, (1536,) * 30, True)


def _table(arch: Arch, per_layer_ms: float, per_mweight_ms: dict[str, float]) -> LatencyTable:
    """A measured-looking table: TPOT = 2 ms + per_layer_ms x layers + per_mweight_ms[fmt] x decoder
    weights / 1e6, exactly (at the architectures measure_table measures)."""
    points = []
    for fmt, c in per_mweight_ms.items():
        for name, a in architectures(arch, fmt, 64):
            ms = 2 + per_layer_ms * a.layers + c * a.decoder_params / 1e6
            points.append(TablePoint(name, fmt, a.layers, a.decoder_params, 3 * ms / 1e3, ms / 1e3, {}))
    return LatencyTable({"test": True}, points, "measured in a test", True, None, [])


def test_the_table_interpolates_what_it_was_given():
    t = _table(SMOLLM2, 0.2, {"none": 0.05, "w8a8-int8": 0.03})
    a = shallower(SMOLLM2, 6)
    assert t.predict(a, "none")[1] == pytest.approx((2 + 0.2 * 24 + 0.05 * a.decoder_params / 1e6) / 1e3, rel=1e-6)
    assert t.predict(a, "w8a8-int8")[1] < t.predict(a, "none")[1]


def test_the_anchor_scales_every_prediction_by_the_dense_exports_measured_factor():
    """A host 30% slower than when the table was measured: every architecture and format 30% slower."""
    from compressor.budget.frontier import AnchoredTable

    t = _table(SMOLLM2, 0.2, {"none": 0.05, "w8a8-int8": 0.03})
    ttft, tpot = t.predict(SMOLLM2, "none")
    anchored = AnchoredTable.on(t, SMOLLM2, 1.1 * ttft, 1.3 * tpot)
    assert anchored.predict(SMOLLM2, "none") == pytest.approx((1.1 * ttft, 1.3 * tpot))
    a = shallower(SMOLLM2, 6)
    for fmt in ("none", "w8a8-int8"):
        assert anchored.predict(a, fmt)[1] == pytest.approx(1.3 * t.predict(a, fmt)[1])
        assert anchored.predict(a, fmt)[0] == pytest.approx(1.1 * t.predict(a, fmt)[0])
    assert "TPOT x1.300" in anchored.source and anchored.as_dict()["anchor"]["tpot_scale"] == pytest.approx(1.3)


def test_frontier_keeps_the_least_width_per_format_and_depth_and_every_candidate_fits():
    prof = load_profile("cpu-2core")
    table = _table(SMOLLM2, 0.2, {"none": 0.05, "w8a8-int8": 0.03})
    dense_ms = table.predict(SMOLLM2, "none")[1] * 1e3
    prof = prof.model_copy(update={"budget": prof.budget.model_copy(update={"tpot_ms": 0.7 * dense_ms})})
    f = search(prof, SMOLLM2, table, CostModel(prof), ["none", "w8a8-int8", "w4a16"])
    assert f.candidates and all(c.ok and c.prediction.tpot_s * 1e3 <= 0.7 * dense_ms for c in f.candidates)
    assert "w4a16" in f.skipped_formats and "576" in f.skipped_formats["w4a16"]  # groups of 128 vs hidden 576
    seen = {(c.fmt, c.dropped) for c in f.candidates}
    assert len(seen) == len(f.candidates)  # one per (format, depth)
    for c in f.candidates:  # the least width: one grid step less would miss the budget
        if c.width > 0:
            less = search(prof, SMOLLM2, table, CostModel(prof), [c.fmt],
                          grid=(round(c.width - 0.05, 2),), max_dropped=c.dropped)
            assert all(x.dropped != c.dropped for x in less.candidates)
    # dropping more layers once width 0 fits is never a frontier point
    for fmt in ("none", "w8a8-int8"):
        zero = [c.dropped for c in f.candidates if c.fmt == fmt and c.width == 0]
        assert len(zero) <= 1 and all(c.dropped <= min(zero) for c in f.candidates if c.fmt == fmt) if zero else True


def _budgeted(fraction: float):
    """cpu-2core with a TPOT budget of `fraction` of the dense model's on `_table`'s line -> (profile,
    table, budget ms)."""
    prof = load_profile("cpu-2core")
    table = _table(SMOLLM2, 0.2, {"none": 0.05, "w8a8-int8": 0.03})
    budget = fraction * table.predict(SMOLLM2, "none")[1] * 1e3
    return prof.model_copy(update={"budget": prof.budget.model_copy(update={"tpot_ms": budget})}), table, budget


def test_the_latency_headroom_keeps_a_reserve_below_each_latency_line():
    """`budget.latency_headroom`: a candidate predicted 5% under the TPOT line meets it with no
    headroom and misses with 8% (the sentence says which line and reserve); the frontier's
    candidates all land under the reduced line."""
    from dataclasses import replace as dc_replace

    prof, table, budget = _budgeted(0.8)
    none = prof.model_copy(update={"budget": prof.budget.model_copy(update={"latency_headroom": 0.0})})
    kept = prof.model_copy(update={"budget": prof.budget.model_copy(update={"latency_headroom": 0.08})})
    pred = dc_replace(CostModel(none).predict(SMOLLM2, "none"), tpot_s=0.95 * budget / 1e3, ttft_s=0.1)
    assert CostModel(none).violations(pred) == []
    (v,) = CostModel(kept).violations(pred)
    assert v.line == "tpot" and v.limit == pytest.approx(0.92 * budget)
    assert f"{budget:.4g} ms line less the profile's 8% latency headroom" in v.sentence()
    f = search(kept, SMOLLM2, table, CostModel(kept), ["none", "w8a8-int8"])
    assert f.candidates and all(c.prediction.tpot_s * 1e3 <= 0.92 * budget for c in f.candidates)
    loose = search(none, SMOLLM2, table, CostModel(none), ["none", "w8a8-int8"])
    assert any(c.prediction.tpot_s * 1e3 > 0.92 * budget for c in loose.candidates)


def test_choice_is_least_kl_with_weights_and_fewest_removed_without():
    prof, table, _ = _budgeted(0.8)
    f = search(prof, SMOLLM2, table, CostModel(prof), ["none", "w8a8-int8"])
    f.choose()
    assert f.chosen.removed == min(c.removed for c in f.candidates) and "fewest" in f.rule
    for i, c in enumerate(f.candidates):
        c.kl = 1.0 + i
    f.candidates[-1].kl = 0.01
    assert f.choose() is f.candidates[-1] and "least KL" in f.rule


def test_width_candidates_are_priced_with_the_biases_their_compensation_writes():
    prof, table, _ = _budgeted(0.8)
    plain = search(prof, SMOLLM2, table, CostModel(prof), ["none", "w8a8-int8"])
    biased = search(prof, SMOLLM2, table, CostModel(prof), ["none", "w8a8-int8"], biases=True)
    assert not any(c.arch.biased for c in plain.candidates)
    assert any(c.width for c in biased.candidates) and any(not c.width for c in biased.candidates)
    assert all(c.arch.biased == (c.width > 0) for c in biased.candidates)  # depth and format alone add no bias


def test_a_bias_free_sibling_comes_with_each_biased_width_candidate_when_asked():
    """`bias_free`: each width candidate whose compensation writes biases also comes without them
    (same widths, no bias switches, "(no biases)"); depth- and format-only candidates have no sibling."""
    prof, table, _ = _budgeted(0.8)
    biased = search(prof, SMOLLM2, table, CostModel(prof), ["none", "w8a8-int8"], biases=True)
    both = search(prof, SMOLLM2, table, CostModel(prof), ["none", "w8a8-int8"], biases=True, bias_free=True)
    assert not any(c.bias_free for c in biased.candidates)
    with_width = [c for c in biased.candidates if c.width]
    siblings = [c for c in both.candidates if c.bias_free]
    assert with_width and len(siblings) == len(with_width)
    for c, s in zip(with_width, siblings, strict=True):
        assert (s.width, s.dropped, s.fmt) == (c.width, c.dropped, c.fmt)
        assert c.arch.biased and not s.arch.biased and s.ok
        assert s.levers == c.levers.replace(f"width -{c.width:.0%}", f"width -{c.width:.0%} (no biases)")
        assert s.as_dict()["biases"] is False and c.as_dict()["biases"] is True
    # without biases to start from there is nothing to leave out
    plain = search(prof, SMOLLM2, table, CostModel(prof), ["none", "w8a8-int8"], bias_free=True)
    assert not any(c.bias_free for c in plain.candidates)


def _checked_frontier(measured_ms: dict[str, float], bias_free: bool = False):
    """A frontier whose candidates all have a KL, and a checker that re-prices a candidate at the TPOT
    `measured_ms` gives its levers (as `ExactCheck` does with a measurement) and records the order."""
    from dataclasses import replace as dc_replace

    prof, table, budget = _budgeted(0.8)
    cost = CostModel(prof)
    f = search(prof, SMOLLM2, table, cost, ["none", "w8a8-int8"], biases=True, bias_free=bias_free)
    for i, c in enumerate(f.candidates):
        c.kl = 1.0 + i
    order = []

    def check(c):
        order.append(c.levers)
        ms = measured_ms.get(c.levers, c.prediction.tpot_s * 1e3)
        c.reprice(dc_replace(c.prediction, tpot_s=ms / 1e3), cost)
        c.exact = True
        return c.ok

    f.checker = check
    return f, budget, order


def test_the_best_candidate_that_misses_at_its_exact_shape_gives_way_to_the_next():
    f, budget, order = _checked_frontier({})
    first, second, third = f.candidates[:3]
    f, budget, order = _checked_frontier({first.levers: 2 * budget})
    chosen = f.choose()
    assert order == [first.levers, second.levers] and chosen.levers == second.levers
    assert chosen.exact and chosen.ok and "exact shape" in f.rule and "the 1 before it" in f.rule
    missed = next(c for c in f.candidates if c.levers == first.levers)
    assert missed.exact and not missed.ok and missed.as_dict()["latency_from"] == "its exact shape, measured"
    # every checked candidate misses: nothing is chosen, and the note names them and what they missed
    f, budget, order = _checked_frontier({c.levers: 2 * budget for c in f.candidates})
    assert f.choose() is None and len(order) == f.max_checks == 4
    assert f.rule.startswith("none") and "infeasible as measured" in f.notes[-1] and first.levers in f.notes[-1]


def test_a_biased_candidate_slow_at_its_exact_shape_gives_way_to_its_sibling_without_biases():
    """The W8A8 case measured here: the candidate with biases misses at its exact shape, the same
    shape without them meets, and it is chosen ahead of candidates with a worse KL."""
    f, budget, order = _checked_frontier({}, bias_free=True)
    ranked = sorted(f.candidates, key=lambda c: c.kl)
    best = next(c for c in ranked if c.width and not c.bias_free)
    sibling = next(c for c in ranked if c.bias_free and (c.width, c.dropped, c.fmt) == (best.width, best.dropped,
                                                                                         best.fmt))
    f, budget, order = _checked_frontier({best.levers: 2 * budget}, bias_free=True)
    for c in f.candidates:  # the sibling's KL is a little worse than its biased twin's, better than the rest
        c.kl = 0.0 if c.levers == best.levers else 0.1 if c.levers == sibling.levers else c.kl
    chosen = f.choose()
    assert order == [best.levers, sibling.levers] and chosen.levers == sibling.levers
    assert chosen.bias_free and not chosen.arch.biased and chosen.exact and chosen.ok


def test_marginal_candidates_meet_the_lines_inside_the_reserve_and_are_offered_only_when_asked():
    """`search(marginal=True)`: per (format, dropped), the least width that meets the TPOT line itself
    where it is less than the least width that keeps the reserve; never the dense model itself, and
    none without a reserve."""
    prof, table, budget = _budgeted(0.8)
    cost = CostModel(prof)
    safe = search(prof, SMOLLM2, table, cost, ["none", "w8a8-int8"])
    f = search(prof, SMOLLM2, table, cost, ["none", "w8a8-int8"], marginal=True)
    assert f.marginal and not safe.marginal and not any(c.marginal for c in safe.candidates)
    near = [c for c in f.candidates if c.marginal]
    assert near and [c for c in f.candidates if not c.marginal] == safe.candidates
    keep = {(c.fmt, c.dropped): c.width for c in safe.candidates}
    for c in near:
        assert budget * 0.95 < c.prediction.tpot_s * 1e3 <= budget
        assert c.within_lines and not c.ok and c.violations[0].headroom == 0.05
        assert c.width < keep.get((c.fmt, c.dropped), 1.0) and (c.fmt, c.dropped, c.width) != ("none", 0, 0)
        assert c.as_dict()["marginal"] is True
    bare = prof.model_copy(update={"budget": prof.budget.model_copy(update={"latency_headroom": 0.0})})
    loose = search(bare, SMOLLM2, table, CostModel(bare), ["none"], marginal=True)
    assert not loose.marginal and not any(c.marginal for c in loose.candidates)


def _marginal_best(fallback: bool = True):
    """A frontier offering marginal candidates whose best by KL is marginal (and, with `fallback`,
    candidates that keep the reserve among the rest) -> (frontier, cost, budget ms, the marginal best)."""
    prof, table, budget = _budgeted(0.8)
    cost = CostModel(prof)
    f = search(prof, SMOLLM2, table, cost, ["none", "w8a8-int8"], marginal=True)
    for i, c in enumerate(f.candidates):
        c.kl = 1.0 + i
    best = next(c for c in f.candidates if c.marginal)
    best.kl = 0.01
    if not fallback:
        f.candidates = [c for c in f.candidates if c.marginal]
    return f, cost, budget, best


def test_a_marginal_best_plan_is_chosen_and_its_export_decides():
    """The best plan by KL meets the lines but not the reserve: it is chosen; its export measured
    under the line keeps it, over the line gives way to the fallback (the best plan after it that
    keeps the reserve), and with no fallback nothing is chosen and the note says why."""
    f, cost, budget, best = _marginal_best()
    assert f.choose() is best and f.fallback is None
    assert "not the 5% reserve" in f.rule and "else the best plan that keeps the reserve" in f.rule
    kept = f.confirm(0.05, 0.99 * budget / 1e3, cost, "measured in a test")
    assert kept is best and best.confirmed and best.prediction.tpot_s == pytest.approx(0.99 * budget / 1e3)
    assert "it meets the lines, so it is kept" in f.rule and f.fallback is None
    assert f.as_dict()["chosen"]["latency_from"] == "its export, measured in turn with the dense export"
    assert f.as_dict()["missed_on_export"] is None
    assert f.as_dict()["chosen"]["meets_budget"] is True and f.as_dict()["chosen"]["keeps_reserve"] is False

    f, cost, budget, best = _marginal_best()
    f.choose()
    fallback = min((c for c in f.candidates if c.ok), key=lambda c: c.kl)
    assert f.confirm(0.05, 1.02 * budget / 1e3, cost, "measured in a test") is fallback and f.chosen is fallback
    assert f.fallback is fallback and f.missed_on_export is best and f.as_dict()["missed_on_export"]["levers"] == \
        best.levers
    assert best.confirmed and not best.within_lines and f"the fallback, {fallback.levers}, is chosen" in f.rule
    assert f.confirm(0.05, 2 * budget / 1e3, cost, "again") is fallback  # a choice that keeps the reserve stays

    f, cost, budget, best = _marginal_best(fallback=False)
    assert f.choose() is best
    assert f.confirm(0.05, 1.02 * budget / 1e3, cost, "measured in a test") is None and f.fallback is None
    assert "infeasible as measured" in f.notes[-1] and best.levers in f.notes[-1]


def test_plans_inside_the_reserve_have_their_own_exact_checks_and_the_fallback_is_checked_when_needed():
    """With a checker, candidates inside the reserve by their price and those keeping it each get up
    to `max_checks` exact-shape checks, so the first never use up the others'. A candidate that keeps
    the reserve by the fit but measures between the reserve and the line at its exact shape is a
    marginal choice; the fallback is checked only once the marginal choice's export has missed."""
    f, budget, order = _checked_frontier({})
    first = sorted(f.candidates, key=lambda c: c.kl)[0]
    f, budget, order = _checked_frontier({first.levers: 0.97 * budget})
    f.marginal = True
    chosen = f.choose()
    assert chosen.levers == first.levers and chosen.marginal and order == [first.levers]
    second = sorted(f.candidates, key=lambda c: c.kl)[1]
    cost = CostModel(_budgeted(0.8)[0])
    assert f.confirm(0.05, 1.01 * budget / 1e3, cost, "a test") is f.fallback and f.fallback.levers == second.levers
    assert order == [first.levers, second.levers] and f.fallback.exact

    # four candidates inside the reserve that miss at their exact shapes leave the four checks of the others
    from dataclasses import replace as dc_replace

    base, budget, _ = _checked_frontier({})
    ranked = sorted(base.candidates, key=lambda c: c.kl)
    f, budget, order = _checked_frontier({c.levers: 2 * budget for c in ranked[:6]})
    f.marginal = True
    ranked = sorted(f.candidates, key=lambda c: c.kl)
    for c in ranked[:6]:  # the six best by KL, priced 3% under the line: inside the reserve
        c.reprice(dc_replace(c.prediction, tpot_s=0.97 * budget / 1e3), cost)
        assert c.marginal
    chosen = f.choose()
    assert order == [c.levers for c in ranked[:4]] + [ranked[6].levers] and chosen is ranked[6] and chosen.ok


def test_format_problem_names_the_width_a_group_does_not_divide():
    assert format_problem("w8a8-int8", SMOLLM2) is None
    assert "576" in format_problem("w4a16", SMOLLM2)
    ok = Arch(1024, 1000, 128, (8,), (2,), (2048,))
    assert format_problem("w4a16", ok) is None
    # every layer's widths count, not the first one's; a removed block (width 0) holds nothing
    assert "1984" in format_problem("w4a16", Arch(1024, 1000, 128, (8, 8), (2, 2), (2048, 1984)))
    assert format_problem("w4a16", Arch(1024, 1000, 128, (0, 8), (0, 2), (0, 2048))) is None


# ---- on the weights -------------------------------------------------------------------------------

def _setup(layers: int = 4):
    model = tiny_model("llama-gqa", layers=layers)
    with torch.no_grad():
        model.lm_head.weight.mul_(8)  # peaked next-token distributions: KL differences well above rounding
    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(0, 128, (8, 32), generator=gen)
    val = torch.randint(0, 128, (2000,), generator=gen)
    spec = PruneSpec(metric="flap", compensation="lsq+bias", ratio=0.0, round_to=8, structure="uniform")
    return model, adapter_for(model), calib, val, spec


def test_plan_quality_orders_candidates_and_prunes_to_one():
    torch.set_num_threads(1)
    model, adapter, calib, val, spec = _setup()
    dense = copy.deepcopy(model)
    q = PlanQuality(model, adapter, calib, val, spec, Compute(batch_size=4), say=lambda *_: None, windows=4,
                    window_len=64)
    assert q.kl(0.0, 0, "none") == pytest.approx(0.0, abs=1e-6)  # the dense model itself
    assert q.kl(0.0, 0, "w8a8-int8") > 1e-7  # quantization costs something
    one, two = q.kl(0.0, 1), q.kl(0.0, 2)
    assert 0 < one < two  # nested drop order: two layers hurt more than the first alone
    assert q.kl(0.3, 0) > q.kl(0.1, 0) > 0
    order = q.drop_order(2)
    assert 0 not in order and len(set(order)) == 2
    expected = q.kl(0.1, 1)
    res = q.prune(0.1, 1)
    layers = adapter.layers(model)
    gone = order[0]
    assert type(layers[gone].self_attn).__name__ == "NoAttention" and type(layers[gone].mlp).__name__ == "NoMLP"
    # what was measured is what was made: the pruned model's KL equals the candidate's
    from compressor.prune.evolve import Fitness, validation_windows

    fit = Fitness(validation_windows(val, 4, 64))
    fit.cache_dense(dense, 128)
    kl = sum(fit.window_kl(model, i) for i in range(4)) / 4
    assert kl == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert res.structure == "planned" and res.notes["plan"]["dropped_layers"] == [gone]


def test_a_bias_free_candidate_is_refitted_without_biases_and_pruned_as_measured():
    """`bias_free`: the kept widths re-fitted by the compensation's sibling without biases (lsq for
    lsq+bias): its own KL, an export with no biases, and `pruned_copy` leaves the model dense."""
    from compressor.errors import UserError
    from compressor.prune.evolve import Fitness, validation_windows

    torch.set_num_threads(1)
    model, adapter, calib, val, spec = _setup()
    dense = copy.deepcopy(model)
    q = PlanQuality(model, adapter, calib, val, spec, Compute(batch_size=4), say=lambda *_: None, windows=4,
                    window_len=64)
    assert q.compensation(True).name == "lsq" and not q.compensation(True).adds_bias
    with_bias, without = q.kl(0.3, 1), q.kl(0.3, 1, bias_free=True)
    assert without > 0 and without != pytest.approx(with_bias, rel=1e-6)
    q._kl.clear()  # measured again after the sibling's ladder was built: the two do not disturb each other
    assert q.kl(0.3, 1) == pytest.approx(with_bias, rel=1e-6) and q.kl(0.3, 1, bias_free=True) == pytest.approx(
        without, rel=1e-6)
    fit = Fitness(validation_windows(val, 4, 64))
    fit.cache_dense(dense, 128)
    copied = q.pruned_copy(0.3, 1, bias_free=True)
    assert sum(fit.window_kl(copied, i) for i in range(4)) / 4 == pytest.approx(without, rel=1e-4, abs=1e-6)
    assert sum(fit.window_kl(model, i) for i in range(4)) / 4 == pytest.approx(0.0, abs=1e-6)  # still dense
    res = q.prune(0.3, 1, bias_free=True)
    kept = [lyr for lyr in adapter.layers(model) if type(lyr.mlp).__name__ != "NoMLP"]
    assert all(lyr.mlp.down_proj.bias is None and lyr.self_attn.o_proj.bias is None for lyr in kept)
    assert res.notes["plan"]["compensation"] == "lsq"
    assert sum(fit.window_kl(model, i) for i in range(4)) / 4 == pytest.approx(without, rel=1e-4, abs=1e-6)
    # a compensation without a sibling refuses in one sentence
    model, adapter, calib, val, spec = _setup(layers=2)
    spec = PruneSpec(metric="flap", compensation="lsq", ratio=0.0, round_to=8, structure="uniform")
    q = PlanQuality(model, adapter, calib, val, spec, Compute(batch_size=4), say=lambda *_: None, windows=2,
                    window_len=64)
    with pytest.raises(UserError, match="no variant without biases"):
        q.kl(0.3, 0, bias_free=True)


def test_the_kl_is_measured_on_text_the_dense_model_generates_itself():
    """`kl_text("self")`: seeded samples of the dense model (the same twice), cut into the KL windows;
    "validation" is the validation split; anything else is refused in one sentence."""
    from types import SimpleNamespace

    from compressor.errors import UserError
    from compressor.prune.planned import kl_text

    torch.set_num_threads(1)
    model, adapter, calib, val, spec = _setup(layers=2)
    tok = SimpleNamespace(bos_token_id=1, eos_token_id=2)
    ids = kl_text("self", model, tok, val, 300, seed=0)
    assert ids.shape == (300,) and ids.dtype == torch.long and int(ids.max()) < model.config.vocab_size
    assert torch.equal(ids, kl_text("self", model, tok, val, 300, seed=0))
    assert kl_text("validation", model, tok, val, 300, seed=0) is val
    with pytest.raises(UserError, match="not a text"):
        kl_text("held-out", model, tok, val, 300, seed=0)
    q = PlanQuality(model, adapter, calib, val, spec, Compute(batch_size=4), say=lambda *_: None, windows=2,
                    window_len=128, kl_ids=ids, kl_on="text the dense model generated itself")
    assert torch.equal(q.fitness.windows[0], ids[:128]) and q.kl_on == "text the dense model generated itself"
    assert q.kl(0.0, 1) > 0


def test_fake_quantization_changes_outputs_a_little():
    model = tiny_model("llama-gqa", layers=2).eval()
    x = torch.randint(0, model.config.vocab_size, (1, 16))
    with torch.no_grad():
        a = model(input_ids=x).logits
        b = fake_quantized(model, "w8a8-int8")(input_ids=x).logits
        again = model(input_ids=x).logits
    assert 0 < (a - b).abs().max() < 0.05 * a.abs().max()
    assert torch.equal(a, again)  # the copy is quantized, not the model
    import copy

    from exporters.quantize import apply_scheme

    per_call = copy.deepcopy(model)  # weights rounded once give the library's per-call rounding exactly
    apply_scheme(per_call, "w8a8-int8")
    with torch.no_grad():
        assert torch.equal(per_call(input_ids=x).logits, b)


# ---- the commands -----------------------------------------------------------------------------------

def test_plan_command_prints_the_frontier_and_picks_a_mix(tmp_path):
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
           "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32,
           "vocab_size": 128256, "head_dim": 128, "tie_word_embeddings": False}
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    p = run_cli("plan", "--profile", "a10g-24gb", str(tmp_path / "m"), "--no-fit", "--json", str(tmp_path / "p.json"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert "every lever for a10g-24gb" in p.stdout and "choice:" in p.stdout
    plan = json.loads((tmp_path / "p.json").read_text())
    assert plan["latency_source"].startswith("predicted from datasheet")
    assert {c["format"] for c in plan["frontier"]} >= {"none", "w8a8-int8"}
    assert plan["chosen"]["meets_budget"] and plan["chosen"]["levers"] in {c["levers"] for c in plan["frontier"]}


def test_levers_refuses_what_it_chooses_itself(tmp_path, tiny_model_dir):
    out = tmp_path / "o"
    p = run_cli(str(tiny_model_dir), "--levers", "--ratio", "0.2", "--out", str(out))
    assert_clean_failure(p, out, "--levers chooses the width, the layers dropped and the weight format itself")


def _tiny_gpu_profile(tmp_path, tiny_model_dir, runtime: str = "torch"):
    """A GPU profile (not here: datasheet latency) whose TPOT the dense tiny model just misses; in
    vLLM its device has weight-format kernels."""
    from compressor.budget.frontier import predict
    from compressor.budget.latency_table import datasheet_table
    from compressor.budget.shapes import arch_of
    from compressor.model.loading import read_config
    from profiles.schema import Profile

    base = load_profile("a10g-24gb").model_dump(exclude={"efficiency"})
    base.update(name="tiny-gpu", runtime=runtime, dtype="float32" if runtime == "torch" else "bfloat16", round_to=8)
    base["workload"].update(max_context=64, concurrency=2, prompt_tokens=16, output_tokens=4)
    base["budget"] = {"memory_headroom": 0.1, "ttft_ms": None, "tpot_ms": None, "min_throughput_tok_s": None}
    config = read_config(str(tiny_model_dir))[0]
    prof = Profile.model_validate(base)
    table = datasheet_table(prof, config, ["none", "w8a8-int8"])
    dense = predict(CostModel(prof), table, arch_of(config), "none").tpot_s
    if runtime == "torch":
        base["budget"]["tpot_ms"] = dense * 1e3 * 0.999  # the dense model just misses it
    else:  # ... and W8A8 alone meets it
        base["budget"]["tpot_ms"] = (dense + predict(CostModel(prof), table, arch_of(config), "w8a8-int8").tpot_s) * 500
    path = tmp_path / "tiny-gpu.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def test_out_of_core_plans_width_and_format_and_quantizes_without_a_calibration_pass(tmp_path, tiny_model_dir,
                                                                                     capsys):
    """Out of core, the default plan is every lever that runs there (no dropped layer, ranked by
    weights removed): a weight format alone wins, the layers are copied as they are (no calibration
    pass), the export is quantized, and the pruned perplexity is the quantized model's."""
    from compressor.cli import main

    out = tmp_path / "o"
    args = [str(tiny_model_dir), "--profile", str(_tiny_gpu_profile(tmp_path, tiny_model_dir, "vllm")), "--out-of-core",
            "on", "--nsamples", "4", "--seqlen", "32", "--no-checks", "--domain-windows", "0", "--out", str(out)]
    assert main(args) == 0
    text = " ".join(capsys.readouterr().err.split())
    assert "plan: w8a8-int8" in text and "out of core: width and weight format only" in text
    assert "every weight kept, quantized to w8a8-int8" in text and "run the main job" not in text
    r = json.loads((out / "report.json").read_text())
    assert r["plan"]["ratio_source"] == "every lever, out of core" and r["plan"]["chosen"]["format"] == "w8a8-int8"
    assert r["plan"]["chosen"]["dropped_layers"] == 0 and r["params"]["achieved_ratio_decoder"] == 0
    assert r["method"]["out_of_core"] == "copied: nothing pruned" and r["method"]["passes"] == 0
    assert "compressed-tensors w8a8-int8" in r["export"]["format"]
    ppl = r["perplexity"]
    assert ppl["pruned"] != ppl["dense"] and ppl["pruned"] == pytest.approx(ppl["dense"], rel=0.1)


@pytest.mark.slow
def test_levers_end_to_end_on_a_profile_that_is_not_here(tmp_path, tiny_model_dir):
    """A GPU profile (datasheet latency) whose TPOT the dense tiny model misses: the run (with no
    --ratio, so planned with every lever by default) measures the frontier's KLs, prunes to the
    least-KL plan, recovers it (--recover-tokens) and records the frontier in its report."""

    path = _tiny_gpu_profile(tmp_path, tiny_model_dir)
    out = tmp_path / "o"
    # no --ratio and no method option: every lever is the default plan
    p = run_cli(str(tiny_model_dir), "--profile", str(path), "--nsamples", "4", "--seqlen", "32",
                "--no-checks", "--domain-windows", "0", "--recover-tokens", "300", "--out", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads((out / "report.json").read_text())
    assert r["plan"]["ratio_source"] == "every lever" and r["plan"]["chosen"]["meets_budget"]
    assert r["plan"]["chosen"]["decoder_removed"] > 0 and r["recovery"]["tokens"] >= 300
    assert {"recover_teacher", "recover"} <= set(r["seconds"])
    assert all(c["kl"] is not None for c in r["plan"]["frontier"]) and "least KL" in r["plan"]["rule"]
    assert r["method"]["structure"] == "planned" and r["method"]["levers"]["chosen"] == r["plan"]["chosen"]["levers"]
    assert r["params"]["achieved_ratio_decoder"] == pytest.approx(r["plan"]["chosen"]["decoder_removed"], abs=0.02)
    from compressor.recover.distill import full_lr

    # the learning rate follows what the plan removed (the decoder's share, as the report counts it)
    assert r["recovery"]["lr"] == full_lr(1 - r["params"]["achieved_ratio_decoder"])
    from compressor.report.markdown import markdown

    md = markdown(r)  # the report's page names the lever plan and lists its frontier, the choice marked
    assert f"chosen by the lever plan: {r['plan']['chosen']['levers']}" in md and "## Plan (every lever)" in md
    assert md.count("| chosen |") == 1 and len([ln for ln in md.splitlines() if ln.startswith("| ")]) >= len(
        r["plan"]["frontier"]) + 1


@pytest.mark.slow
def test_levers_on_this_machine_measure_the_table_and_anchor_it_on_the_dense_export(tmp_path, tiny_model_dir):
    """A CPU profile (this machine) in torch: the run measures the latency table (cached under
    FITPRUNE_CACHE_DIR), measures the real dense export and anchors the table on it; a TPOT budget no
    plan can meet ends in one sentence, exit 3, nothing written."""
    import os

    base = load_profile("cpu-2core").model_dump(exclude={"efficiency"})
    base.update(name="tiny-cpu", runtime="torch", dtype="float32", round_to=8)
    base["workload"].update(max_context=64, concurrency=2, prompt_tokens=16, output_tokens=4)
    base["budget"] = {"memory_headroom": 0.1, "ttft_ms": None, "tpot_ms": 0.001, "min_throughput_tok_s": None}
    path = tmp_path / "tiny-cpu.yaml"
    path.write_text(yaml.safe_dump(base))
    out = tmp_path / "o"
    env_before = os.environ.get("FITPRUNE_CACHE_DIR")
    os.environ["FITPRUNE_CACHE_DIR"] = str(tmp_path / "cache")
    try:
        p = run_cli(str(tiny_model_dir), "--profile", str(path), "--levers", "--nsamples", "4", "--seqlen", "32",
                    "--no-checks", "--domain-windows", "0", "--out", str(out))
    finally:
        if env_before is None:
            os.environ.pop("FITPRUNE_CACHE_DIR")
        else:
            os.environ["FITPRUNE_CACHE_DIR"] = env_before
    assert_clean_failure(p, out, "infeasible", code=3)
    text = " ".join(p.stderr.split())
    assert "the dense export measured in torch" in text and "scaled by" in text
    assert list((tmp_path / "cache").rglob("*.json"))  # the table was measured and cached


def test_a_marginal_choice_is_confirmed_on_its_real_export_measured_beside_the_dense_one(tmp_path, tiny_model_dir,
                                                                                        monkeypatch):
    """`budget/confirm.py` end to end in the torch runtime: the plan's export and the dense export are
    measured in turn in both load orders (3 engine loads), and the ratio times the dense latency
    measured at planning decides. The tiny plan here is the dense weights themselves (ratio about 1),
    so an anchor at half the line keeps it and one at twice the line gives way to the fallback; no
    temporary directory is left."""
    import glob
    import os
    import tempfile
    from dataclasses import replace as dc_replace

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compressor.budget.confirm import confirm_choice, export_in_format
    from compressor.budget.frontier import Candidate, Frontier

    base = load_profile("cpu-2core").model_dump(exclude={"efficiency"})
    base.update(name="tiny-cpu", runtime="torch", dtype="float32", round_to=8)
    # one thread and 32 tokens a request: a tiny model's 4-token requests on two threads measured a ratio of
    # 0.43 between the same weights in CI, where the other pytest worker shares the two cores
    base["device"]["threads"] = 1
    base["workload"].update(max_context=64, concurrency=1, prompt_tokens=16, output_tokens=32)
    base["budget"].update(tpot_ms=50.0, ttft_ms=None, min_throughput_tok_s=None)
    path = tmp_path / "tiny-cpu.yaml"
    path.write_text(yaml.safe_dump(base))
    prof = load_profile(str(path))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    dense = tmp_path / "dense"
    dense.mkdir()
    export_in_format(model, tok, dense, "float32", "none")
    arch = Arch.from_config(json.loads((dense / "config.json").read_text()))
    cost = CostModel(prof)
    # a private temporary folder: tests in other workers (pytest -n) make their own confirm folders
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "fitprune-confirm-*")))

    def frontier():
        pred = cost.predict(arch)
        near = Candidate(0.0, 0, "none", arch, pred, [], 0.0, kl=0.0)
        near.reprice(dc_replace(pred, tpot_s=0.048), cost)  # 2 ms under the 50 ms line, inside the 5% reserve
        keep = Candidate(0.1, 0, "none", arch, pred, [], 0.1, kl=1.0)
        keep.reprice(dc_replace(pred, tpot_s=0.020), cost)
        f = Frontier("tiny-cpu", "a test's prices", [near, keep], ["none"], marginal=True)
        assert f.choose() is near and near.marginal and f.fallback is None
        return f, near, keep

    said = []
    for anchor_ms, kept in ((25.0, True), (100.0, False)):
        f, near, keep = frontier()
        chosen = confirm_choice(f, lambda c: model, tok, dense, (0.01, anchor_ms / 1e3), prof, "torch", runs=5,
                                say=said.append)
        assert chosen is (near if kept else keep) and near.confirmed
        ratio = near.prediction.tpot_s * 1e3 / anchor_ms
        print(f"same weights: x{ratio:.3f}")
        assert 0.5 < ratio < 2  # the same weights: a ratio about 1
        assert "in both load orders" in near.prediction.efficiency
        assert ("kept" if kept else f"taking {keep.levers}") in said[-1]
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "fitprune-confirm-*"))) == before
