"""The lever plan on the weights: how much quality each candidate of the frontier loses, and pruning
the model to the chosen one (issue 12; the frontier itself is `budget.frontier`).

A candidate is (width, dropped layers, weight format). On the model in memory:
- which layers to drop: the SLEB-style iterative order of `prune.depth` (whole layers, layer 0
  stays, each removal scored on the model with the earlier ones removed), computed once for the
  deepest candidate; removal is nested, so dropping d layers drops the first d of that order;
- the width: uniform widths (`widths.uniform_shapes`) on the kept layers, whose kept units the
  metric chooses and whose halves the compensation re-fits, built and cached as the allocation
  search builds them (`evolve.Blocks`: one calibration pass, then module swaps);
- "no biases" (`Candidate.bias_free`): the same widths re-fitted by the compensation's sibling
  without biases (lsq for lsq+bias, `Compensation.bias_free`), on a second ladder of halves. Stock
  Llama holds biases only with every projection's bias switched on, and vLLM CPU's int8 W8A8 kernel
  was measured slower with them at some widths; such a candidate is offered only where its exact
  shape will be measured (`budget.frontier.ExactCheck`), the one place the difference shows;
- the format: the candidate's weights and activations quantized and dequantized by
  compressed-tensors itself (the scheme `exporters.quantize` exports, round-to-nearest scales)
  on a copy of the candidate model, so the KL includes what quantizing a pruned model costs.

Quality = KL(dense || candidate) of the next-token distributions, as the allocation search
measures it, on text the dense model samples itself (`kl_text`, the default; seeded, from its BOS
token), not on the validation windows: those are the calibration text's domain, where width
pruning's re-fit flatters width against depth (the measurement: docs/benchmarks.md, "Which KL ranks
plans as other domains do?").
"""

from __future__ import annotations

import copy
import gc
import time

import torch

from ..errors import UserError
from ..model.adapters import Adapter
from . import COMPENSATION, IMPORTANCE
from .depth import BlockScorer, choose_blocks, scoring_windows, units_of
from .driver import Compute, PruneResult, PruneSpec, collect_stats, prune_model, score
from .evolve import REMOVED, Blocks, Fitness, validation_windows
from .widths import uniform_shapes


def fake_quantized(model, fmt: str):
    """A copy of `model` whose Linear layers (not the LM head) run `fmt` as compressed-tensors
    simulates it: weights rounded to the scheme's grid with round-to-nearest scales, activations
    quantized per token where the scheme quantizes them (`exporters.quantize.apply_scheme`); the
    weights are rounded once, not on every forward pass."""
    from exporters.quantize import apply_scheme, round_weights_once

    q = copy.deepcopy(model)
    apply_scheme(q, fmt)
    round_weights_once(q)
    return q


KL_TEXTS = ("self", "validation")  # what the candidates' KL is measured on (`kl_text`)


def kl_text(source: str, model, tokenizer, validation: torch.Tensor, n_tokens: int, seed: int) -> torch.Tensor:
    """The token stream the candidates' KL is measured on: "self", `n_tokens` the dense model samples
    itself (`data.self_generated_ids`, seeded), or "validation", the validation split."""
    if source == "validation":
        return validation
    if source != "self":
        raise UserError(f"'{source}' is not a text the plan's KL can be measured on (known: {', '.join(KL_TEXTS)}).")
    from ..data import self_generated_ids

    return self_generated_ids(model, tokenizer, n_tokens, seed)


class PlanQuality:
    """KL of frontier candidates on the model in memory, and the pruning to one of them. `kl_ids`: the
    token stream the KL windows are cut from (`kl_text`; None: the validation split), and `kl_on`
    what it is, in words."""

    def __init__(self, model, adapter: Adapter, calib: torch.Tensor, validation: torch.Tensor, spec: PruneSpec,
                 compute: Compute, say=print, windows: int = 8, window_len: int = 256, top_k: int = 128,
                 kl_ids: torch.Tensor | None = None, kl_on: str = "validation text"):
        metric = IMPORTANCE.get(spec.metric)
        self.comp = COMPENSATION.get(spec.compensation)
        if self.comp.needs_reference:
            raise UserError(f"The lever plan builds its candidates from one calibration pass; the compensation "
                            f"'{self.comp.name}' needs a greedy pass with the dense model (use lsq+bias or bias).")
        self.model, self.adapter, self.calib, self.spec, self.compute, self.say = (
            model, adapter, calib, spec, compute, say)
        t0 = time.perf_counter()
        extras = metric.precompute(model, adapter, calib[: spec.grad_samples], device=compute.device) \
            if metric.precompute is not None else None
        stats, self.memory = collect_stats(model, adapter, calib, compute, gram=True, sample_rows=metric.sample_rows)
        for i, st in enumerate(stats):
            st.extra.update(extras[i] if extras else {})
        self.scored = score(model, adapter, stats, metric)
        self.blocks = self._new_blocks(self.comp)
        self._bias_free: Blocks | None = None  # built on first use (`blocks_for`)
        self.kl_on = kl_on if kl_ids is not None else "validation text"
        self.fitness = Fitness(validation_windows(validation if kl_ids is None else kl_ids, windows, window_len))
        self.fitness.cache_dense(model, top_k)
        self.order: list[int] = []  # layers in the order they are dropped (nested)
        self.order_kl: list[float] = []
        self._kl: dict[tuple, float] = {}
        self.setup_s = time.perf_counter() - t0

    def _new_blocks(self, comp) -> Blocks:
        s = self.spec
        return Blocks(self.model, self.adapter, self.scored, comp, s.attn_unit, s.round_to, s.tensor_parallel,
                      True, 2 * 2**30)

    def compensation(self, bias_free: bool = False):
        """The compensation a candidate's kept widths are re-fitted with: the run's, or for a "no
        biases" candidate its sibling without them (`Compensation.bias_free`)."""
        if not bias_free:
            return self.comp
        if self.comp.bias_free is None:
            raise UserError(f"The compensation '{self.comp.name}' has no variant without biases.")
        return COMPENSATION.get(self.comp.bias_free)

    def blocks_for(self, bias_free: bool = False) -> Blocks:
        """The pruned halves of the run's compensation, or of its sibling without biases (built on the
        dense modules, which both share)."""
        if not bias_free:
            return self.blocks
        if self._bias_free is None:
            comp = self.compensation(True)
            self._dense()
            self._bias_free = self._new_blocks(comp)
        return self._bias_free

    # ---- which layers go --------------------------------------------------------------------------
    def _dense(self) -> None:
        """Put the dense modules back in every layer, keeping the caches of pruned halves."""
        for layer, dense in zip(self.blocks.layers, self.blocks.dense, strict=True):
            Blocks._set(layer, dense)

    def drop_order(self, n: int) -> list[int]:
        """The first `n` layers of the iterative (SLEB) removal order, computed once on the dense
        model for at least half the layers (the frontier's deepest candidate), so that every
        candidate drops a prefix of one order."""
        if n <= len(self.order):
            return self.order[:n]
        self._dense()  # scored on the dense model, not on the last candidate swapped in
        layers = self.adapter.layers(self.model)
        shapes = [self.adapter.shape(layer) for layer in layers]
        hidden = self.model.config.hidden_size
        units = [u for u in units_of(shapes, hidden, "layer") if u.layer > 0]
        total = sum(u.params for u in units_of(shapes, hidden, "layer"))
        deepest = min(max(n, len(layers) // 2), len(units))
        target = sum(sorted(u.params for u in units)[:deepest])
        scorer = BlockScorer(self.model, self.adapter, scoring_windows(self.calib, 4, 256), self.compute.device,
                             self.compute.batch_size, 8)
        removals = choose_blocks(scorer, units, target, total, shortlist=4, say=lambda *_: None)
        del scorer
        self.order = [r.unit.layer for r in removals]
        self.order_kl = [r.score for r in removals]
        self.say(f"plan: layer drop order {self.order} (KL on the scoring windows after each: "
                 + ", ".join(f"{k:.3f}" for k in self.order_kl) + ")")
        return self.order[:n]

    # ---- candidates -------------------------------------------------------------------------------
    def genotype(self, width: float, dropped: int) -> list[tuple[int, int]]:
        """`evolve.Blocks` levels of the candidate: dropped layers at "removed", the rest at the
        uniform widths of `width`."""
        b, s = self.blocks, self.spec
        gone = set(self.drop_order(dropped)) if dropped else set()
        geno = []
        for i, ls in enumerate(self.scored.scores):
            if i in gone:
                geno.append((b.attn_levels[i].index(REMOVED), b.mlp_levels[i].index(0)))
                continue
            shape = ls.shape
            after = uniform_shapes([shape], ls.hidden, width, s.attn_unit, s.round_to, s.tensor_parallel)[0]
            state = (shape.num_kv_heads - after.num_kv_heads,
                     shape.heads_per_kv - after.num_heads // after.num_kv_heads)
            geno.append((b.attn_levels[i].index(state), b.mlp_levels[i].index(after.intermediate_size)))
        return geno

    @torch.no_grad()
    def kl(self, width: float, dropped: int, fmt: str = "none", bias_free: bool = False) -> float:
        """KL(dense || candidate) on the KL windows (`kl_on`); `bias_free`: its widths re-fitted by the
        compensation's sibling without biases."""
        key = (round(width, 4), dropped, fmt, bias_free)
        if key in self._kl:
            return self._kl[key]
        if width or dropped:
            self.blocks_for(bias_free).apply(self.genotype(width, dropped))
        else:
            self._dense()  # the dense weights themselves, as `prune` leaves them
        model = self.model if fmt == "none" else fake_quantized(self.model, fmt)
        kls = [self.fitness.window_kl(model, i) for i in range(len(self.fitness.windows))]
        del model
        gc.collect()  # a quantized copy is cyclic garbage (its hooks refer to it): free it before the next one
        self._kl[key] = sum(kls) / len(kls)
        return self._kl[key]

    def _keeps(self, width: float, dropped: int):
        """The candidate's keeps, with the dense modules back in the model."""
        geno = self.genotype(width, dropped)
        keeps = [self.blocks.keep(i, a, m) for i, (a, m) in enumerate(geno)]
        self.close()
        return keeps

    def prune(self, width: float, dropped: int, bias_free: bool = False) -> PruneResult:
        """Prune the model in place to the candidate (the format is applied by the exporter)."""
        keeps = self._keeps(width, dropped)
        comp = self.compensation(bias_free)
        if width or dropped:  # a format-only plan keeps the dense weights (no re-fit of full widths)
            prune_model(self.model, self.adapter, keeps, self.scored, comp)
        notes = {"plan": {"width": width, "dropped_layers": sorted(self.drop_order(dropped)) if dropped else [],
                          "drop_order": self.order, "compensation": comp.name if width else None,
                          "candidates_scored": len(self._kl), "setup_s": round(self.setup_s, 1)}}
        return PruneResult(keeps, self.memory, 1, "planned", notes)

    def pruned_copy(self, width: float, dropped: int, bias_free: bool = False):
        """A pruned copy of the model for the candidate; the model itself stays dense."""
        keeps = self._keeps(width, dropped)
        model = copy.deepcopy(self.model)
        if width or dropped:
            prune_model(model, self.adapter, keeps, self.scored, self.compensation(bias_free))
        return model

    def close(self) -> None:
        """Put the dense modules back and free the pruned halves (when the plan is not executed)."""
        self.blocks.restore()
        if self._bias_free is not None:
            self._bias_free.restore()


def estimate(quality: PlanQuality, frontier, say=print) -> None:
    """Measure the KL of every frontier candidate (in place: `candidate.kl`)."""
    t0 = time.perf_counter()
    frontier.kl_on = quality.kl_on
    n = len(frontier.candidates)
    for i, c in enumerate(frontier.candidates):
        c.kl = quality.kl(c.width, c.dropped, c.fmt, c.bias_free)
        say(f"plan: {c.levers}: KL {c.kl:.4f} (predicted TPOT {c.prediction.tpot_s * 1e3:.2f} ms)")
        if i == 0 and n > 1:  # what the rest will take, before it starts
            each = time.perf_counter() - t0
            say(f"plan: scoring the other {n - 1} candidates, about {each * (n - 1):.0f} s ({each:.1f} s each)")
    say(f"plan: {len(frontier.candidates)} candidates scored in {time.perf_counter() - t0:.0f} s")


__all__ = ["KL_TEXTS", "PlanQuality", "estimate", "fake_quantized", "kl_text"]
