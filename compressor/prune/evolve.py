"""`--structure searched`: a per-layer allocation found by an evolutionary search against the dense
model's outputs (EvoPress, Sieberling et al. 2024; Týr-the-Pruner), over width and depth together.

Every decoder layer has two blocks, attention and MLP, and each block a ladder of *levels*, dense
first: attention steps through the layer's allowed attention states (`allocation.attention_steps`,
which respects tensor parallel) and ends in "attention removed"; the MLP keeps multiples of
`round_to` x `tp` channels (`widths.round_channels`) down to 0, "MLP removed". Which units a level
keeps is the metric's choice (`allocation._keep_state`), so a level is a width, not a new ranking.

Why it is cheap: one `collect_stats(..., gram=True)` pass over the dense model gives every layer's
statistics, and a one-pass compensation (`lsq+bias` by default) of a layer's attention half depends
only on that half's kept units and statistics, and likewise for the MLP. So a pruned+compensated
half is built once per (layer, level), on demand, and cached; a candidate model is then a set of
module swaps plus one forward pass.

Fitness: KL(dense || pruned) of the next-token distributions on windows of the *validation* text
(neither calibration nor held-out). The dense model's top-k log-probabilities are cached; the KL is
that of the two distributions coarsened to {the dense top-k tokens, everything else} (a lower bound
of the full KL that keeps memory at k values per token). Lower is better.

Search: start from the `global` (FLAP) allocation mapped to levels, so the result can only improve
on it by the fitness. A mutation moves one block one level (up or down) and then rebalances with
opposite one-level moves of other blocks until the removed weights are back in the budget window
(the requested ratio of decoder weights, within half an MLP step). Each generation scores its
offspring on the first few validation windows, the best few of them on all windows (EvoPress's
multi-stage selection; the first windows are shared, so a survivor only pays for the rest), and the
parent is replaced only by a strictly better child: the fitness never gets worse, and a fixed seed
gives the same result.
"""

from __future__ import annotations

import copy
import random
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UserError
from ..model.adapters import Adapter
from ..model.precision import autocast_to
from . import COMPENSATION, IMPORTANCE, allocation
from .allocation import LayerScores
from .compensation import Compensation
from .driver import Compute, PruneResult, PruneSpec, Scored, collect_stats, prune_model, score
from .surgery import LayerKeep, prune_layer
from .tensor_parallel import attention_states, removed_weights
from .widths import layer_params, resolve_attn_unit, round_channels

REMOVED = None  # the attention "state" of a removed attention block
# A start this close to the dense model leaves the fitness nothing to tell children apart by (a
# random toy model's outputs are near uniform whatever is pruned); SmolLM2 at 20% starts at ~0.27.
NEGLIGIBLE_KL = 1e-6
HALVES = {"attn": ("input_layernorm", "self_attn"), "mlp": ("post_attention_layernorm", "mlp")}


@dataclass(frozen=True)
class SearchSettings:
    """How hard the search looks. A generation scores `offspring` x `first_windows` + `survivors` x
    (`windows` - `first_windows`) windows (less the layers before each child's first change). What
    the number of generations buys: docs/benchmarks.md, "How good is quality across domains?"."""

    generations: int = 30
    offspring: int = 8  # children per generation, scored on the first `first_windows` windows
    survivors: int = 2  # of those, scored on all `windows`
    windows: int = 8  # validation windows of `window_len` tokens for the final stage
    first_windows: int = 2
    window_len: int = 256
    top_k: int = 128  # dense log-probabilities kept per token
    seed: int = 0
    depth: bool = True  # allow the zero levels (attention removed, MLP removed)
    cache_bytes: int = 2 * 2**30  # cached pruned halves beyond this are evicted (least recently used first)
    # the candidates' and the dense model's forward passes under autocast to this dtype (None: the
    # model's own; the pruned halves are built in full precision either way). bfloat16 halves the time
    # but chose worse allocations at 50% (docs/benchmarks.md), so no default uses it.
    precision: str | None = None


@dataclass
class Fitness:
    """KL(dense || pruned) on fixed validation windows, per window (so stages share windows)."""

    windows: torch.Tensor  # [n, L]
    top_lp: list[torch.Tensor] = field(default_factory=list)  # per window [L-1, k] dense log-probs
    top_ix: list[torch.Tensor] = field(default_factory=list)
    rest_lp: list[torch.Tensor] = field(default_factory=list)  # per window [L-1] log of the dense tail mass
    evaluations: int = 0  # window forward passes of pruned models
    precision: str | None = None  # SearchSettings.precision

    @torch.no_grad()
    def cache_dense(self, model, top_k: int) -> None:
        for w in self.windows:
            with autocast_to(next(model.parameters()).device, self.precision):
                lp = self._log_probs(model, w)
            self.add_dense(lp, top_k)

    def add_dense(self, log_probs: torch.Tensor, top_k: int) -> None:
        """Keep the dense model's top-k log-probabilities of the next window (in window order)."""
        vals, idx = log_probs.topk(min(top_k, log_probs.shape[-1]), dim=-1)
        self.top_lp.append(vals)
        self.top_ix.append(idx)
        self.rest_lp.append(_log1mexp(torch.logsumexp(vals, -1)))

    @staticmethod
    def _log_probs(model, window: torch.Tensor) -> torch.Tensor:
        device = next(model.parameters()).device
        logits = model(input_ids=window[None].to(device), use_cache=False).logits[0, :-1].float()
        return torch.log_softmax(logits, -1).cpu()

    @torch.no_grad()
    def window_kl(self, model, i: int) -> float:
        """Mean over the window's tokens of the coarsened KL(dense || pruned)."""
        return self.kl_of(i, model(input_ids=self.windows[i][None].to(next(model.parameters()).device),
                                   use_cache=False).logits[0, :-1])

    @torch.no_grad()
    def kl_of(self, i: int, logits: torch.Tensor) -> float:
        """The same from the pruned model's logits for window i (all but its last token)."""
        lq = torch.log_softmax(logits.float(), -1).cpu()
        self.evaluations += 1
        lp, ix, rest_p = self.top_lp[i], self.top_ix[i], self.rest_lp[i]
        lq_top = lq.gather(-1, ix)
        rest_q = _log1mexp(torch.logsumexp(lq_top, -1))
        kl = (lp.exp() * (lp - lq_top)).sum(-1) + rest_p.exp() * (rest_p - rest_q)
        return float(kl.mean())


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, floored so a top-k holding all the mass stays finite."""
    return torch.log((-torch.expm1(x.clamp(max=0.0))).clamp_min(1e-12))


class Runner:
    """Forward passes that start at a given decoder layer from the inputs the parent had there: a
    child differs from its parent in a few blocks, so the layers before the first of them need not
    run again (about a quarter of the decoder's work on average)."""

    def __init__(self, model, adapter: Adapter, precision: str | None = None):
        self.model, self.layers, self.precision = model, adapter.layers(model), precision
        self.norm, self.head = adapter.decoder(model).norm, model.lm_head
        self.kwargs: dict | None = None  # the layers' keyword arguments (masks, rotary): one window length

    @torch.no_grad()
    def full(self, window: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(logits, every layer's input) of the model as it is."""
        inputs: list[torch.Tensor] = []

        def hook(_mod, args, kwargs):
            inputs.append(args[0] if args else kwargs["hidden_states"])
            if self.kwargs is None:
                self.kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}

        handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in self.layers]
        try:
            device = next(self.model.parameters()).device
            with autocast_to(device, self.precision):
                logits = self.model(input_ids=window[None].to(device), use_cache=False).logits[0, :-1]
        finally:
            for h in handles:
                h.remove()
        return logits, inputs

    @torch.no_grad()
    def partial(self, start: int, prefix: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The same, running only layers `start`.. from `prefix[start]` (the layers before are unchanged)."""
        inputs = list(prefix[:start])
        h = prefix[start]
        with autocast_to(self.head.weight.device, self.precision):
            for layer in self.layers[start:]:
                inputs.append(h)
                out = layer(h, **self.kwargs)
                h = out[0] if isinstance(out, tuple) else out
            return self.head(self.norm(h))[0, :-1], inputs


class Blocks:
    """Every layer's level ladders, what each level removes, and the pruned halves built on demand."""

    def __init__(self, model, adapter: Adapter, scored: Scored, comp: Compensation, attn_unit: str,
                 round_to: int, tp: int, depth: bool, cache_bytes: int):
        self.model, self.adapter, self.scored, self.comp = model, adapter, scored, comp
        self.layers = adapter.layers(model)
        self.hidden = model.config.hidden_size
        self.cache_bytes = cache_bytes
        # a half is (the norm in front of the block, the block): removing a block also replaces its
        # norm (`surgery._remove_attention`), and the module names are the Llama layout's, as surgery's
        self.dense = [{"attn": self._get(lyr, "attn"), "mlp": self._get(lyr, "mlp")} for lyr in self.layers]
        self.attn_levels: list[list] = []
        self.mlp_levels: list[list[int]] = []
        self.attn_removed: list[list[int]] = []  # weights removed at each level
        self.mlp_removed: list[list[int]] = []
        self.total = 0
        for ls in scored.scores:
            s, h = ls.shape, ls.hidden
            states: list = list(attention_states(s, resolve_attn_unit(attn_unit, s), tp))
            full_attn = h * s.head_dim * (2 * s.num_heads + 2 * s.num_kv_heads)
            widths = sorted({round_channels(k, s.intermediate_size, round_to, tp)
                             for k in range(s.intermediate_size + 1)}, reverse=True)
            if depth:
                states.append(REMOVED)
                widths.append(0)
            self.attn_levels.append(states)
            self.mlp_levels.append(widths)
            self.attn_removed.append([full_attn if st is REMOVED else removed_weights(s, h, st) for st in states])
            self.mlp_removed.append([3 * h * (s.intermediate_size - w) for w in widths])
            self.total += layer_params(s, h)
        self._cache: OrderedDict[tuple, tuple[nn.Module, nn.Module]] = OrderedDict()  # (layer, kind, level)
        self._cached_bytes = 0
        self.built = 0  # halves built (compensation + surgery)

    # ---- genotypes: one (attention level, MLP level) per layer ---------------------------------------
    def removed(self, geno) -> int:
        return sum(self.attn_removed[i][a] + self.mlp_removed[i][m] for i, (a, m) in enumerate(geno))

    def keep(self, i: int, a: int, m: int) -> LayerKeep:
        ls: LayerScores = self.scored.scores[i]
        state = self.attn_levels[i][a]
        keep = allocation._keep_state(ls, state if state is not REMOVED else (0, 0), self.mlp_levels[i][m])
        if state is REMOVED:
            keep.q_heads, keep.kv_heads = [], []
        return keep

    def levels_of(self, keeps: list[LayerKeep]) -> list[tuple[int, int]]:
        """The genotype of an allocation (e.g. `global`'s), whose widths are all on the ladders."""
        geno = []
        for i, (ls, k) in enumerate(zip(self.scored.scores, keeps, strict=True)):
            s = ls.shape
            if k.kv_heads:
                state = (s.num_kv_heads - len(k.kv_heads), s.heads_per_kv - len(k.q_heads) // len(k.kv_heads))
            else:
                state = REMOVED
            geno.append((self.attn_levels[i].index(state), self.mlp_levels[i].index(len(k.channels))))
        return geno

    # ---- candidates ------------------------------------------------------------------------------
    def _build(self, i: int, a: int, m: int) -> None:
        """Prune+compensate a copy of dense layer i to levels (a, m) and cache both halves: each half's
        compensation reads only its own kept units and statistics, so the pair is two independent halves."""
        layer = self.layers[i]
        now = {kind: self._get(layer, kind) for kind in HALVES}
        self._set(layer, self.dense[i])
        work = copy.deepcopy(layer)
        self._set(layer, now)
        keep = self.keep(i, a, m)
        fix = self.comp(self.adapter, work, keep, self.scored.stats[i])
        prune_layer(self.adapter, work, keep, o_bias=fix.o_bias, down_bias=fix.down_bias,
                    o_weight=fix.o_weight, down_weight=fix.down_weight)
        self.built += 1
        for key in ((i, "attn", a), (i, "mlp", m)):
            if key not in self._cache:
                self._cache[key] = self._get(work, key[1])
                self._cached_bytes += sum(_nbytes(mod) for mod in self._cache[key])
        while self._cached_bytes > self.cache_bytes and len(self._cache) > 2:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= sum(_nbytes(mod) for mod in old)

    def _half(self, i: int, kind: str, level: int, other: int) -> tuple[nn.Module, nn.Module]:
        # the dense level too is built (through the same compensation call, which leaves a half that
        # keeps every unit as it is): candidates are exactly what `prune_model` makes of their keeps
        key = (i, kind, level)
        if key not in self._cache:
            self._build(i, *((level, other) if kind == "attn" else (other, level)))
        self._cache.move_to_end(key)
        return self._cache[key]

    @staticmethod
    def _get(layer, kind: str) -> tuple[nn.Module, nn.Module]:
        return tuple(getattr(layer, name) for name in HALVES[kind])

    @staticmethod
    def _set(layer, halves: dict) -> None:
        for kind, mods in halves.items():
            for name, mod in zip(HALVES[kind], mods, strict=True):
                setattr(layer, name, mod)

    def apply(self, geno) -> None:
        """Make the model in memory the candidate `geno` (module swaps only)."""
        for i, (a, m) in enumerate(geno):
            self._set(self.layers[i], {"attn": self._half(i, "attn", a, m), "mlp": self._half(i, "mlp", m, a)})

    def apply_layer(self, i: int, a: int, m: int) -> None:
        """Make layer i (materialised) the candidate's levels (a, m)."""
        self._set(self.layers[i], {"attn": self._half(i, "attn", a, m), "mlp": self._half(i, "mlp", m, a)})

    def restore_layer(self, i: int) -> None:
        self._set(self.layers[i], self.dense[i])

    def restore(self) -> None:
        for layer, dense in zip(self.layers, self.dense, strict=True):
            self._set(layer, dense)
        self._cache.clear()
        self._cached_bytes = 0


def _nbytes(mod: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in mod.parameters())


class Evolution:
    """The (1 + lambda) search with multi-stage selection over `Blocks` genotypes."""

    def __init__(self, blocks: Blocks, fitness: Fitness, settings: SearchSettings, lo: int, hi: int, say=print):
        self.blocks, self.fitness, self.s, self.lo, self.hi, self.say = blocks, fitness, settings, lo, hi, say
        self.rng = random.Random(settings.seed)
        self._kl: dict[tuple, list[float]] = {}  # genotype -> per-window KL measured so far
        self.runner = Runner(blocks.model, blocks.adapter, settings.precision)
        self.parent: tuple | None = None
        self._inputs: dict[tuple, dict[int, list[torch.Tensor]]] = {}  # genotype -> window -> layer inputs

    def kl(self, geno, n_windows: int) -> float:
        return self.kl_many([geno], n_windows)[0]

    def kl_many(self, genos, n_windows: int) -> list[float]:
        """Each genotype's mean KL over the first `n_windows` windows, measuring only what is missing;
        a child starts from its parent's inputs at the first layer where they differ."""
        parent = self._inputs.get(self.parent, {}) if self.parent is not None else {}
        todo = []  # (genotype, window, first layer to run, the parent's layer inputs for that window)
        for geno in genos:
            key = tuple(geno)
            done = self._kl.setdefault(key, [])
            start = next((i for i, (a, b) in enumerate(zip(key, self.parent or (), strict=False)) if a != b), 0)
            todo += [(key, w, start if start > 0 and w in parent else 0, parent.get(w))
                     for w in range(len(done), n_windows)]
        for (key, w, _, _), (logits, inputs) in zip(todo, self._forward(todo), strict=True):
            self._inputs.setdefault(key, {})[w] = inputs
            self._kl[key].append(self.fitness.kl_of(w, logits))
        return [sum(self._kl[tuple(g)][:n_windows]) / n_windows for g in genos]

    def _forward(self, todo):
        """(logits, every layer's input) of each (genotype, window, start, prefix), in order: the model
        in memory made each candidate in turn (module swaps)."""
        applied = None
        for key, w, start, prefix in todo:
            if key != applied:
                self.blocks.apply(key)
                applied = key
            yield self.runner.partial(start, prefix) if start > 0 else self.runner.full(self.fitness.windows[w])

    def _keep_inputs(self, *genos) -> None:
        """Forget the layer inputs of every genotype but these (memory: one per window and layer)."""
        keep = {tuple(g) for g in genos}
        self._inputs = {k: v for k, v in self._inputs.items() if k in keep}

    # ---- mutation --------------------------------------------------------------------------------
    def _moves(self, geno, direction: int, exclude: tuple | None, removed: int, bound: int | None):
        """(layer, kind, cost) of every one-level move in `direction` (+1: remove more) whose new
        removed total stays on the right side of `bound` (None: any)."""
        b = self.blocks
        out = []
        for i, (a, m) in enumerate(geno):
            for kind, lvl, table in (("attn", a, b.attn_removed[i]), ("mlp", m, b.mlp_removed[i])):
                nxt = lvl + direction
                if not 0 <= nxt < len(table) or (i, kind) == exclude:
                    continue
                cost = table[nxt] - table[lvl]
                new = removed + cost
                if bound is not None and (new < bound if direction < 0 else new > bound):
                    continue
                out.append((i, kind, cost))
        return out

    def mutate(self, geno) -> list[tuple[int, int]] | None:
        """One block one level up or down, then opposite moves of other blocks until the removed
        weights are back in [lo, hi]; None when no such rebalancing was found."""
        g = [list(x) for x in geno]
        removed = self.blocks.removed(geno)
        direction = self.rng.choice((1, -1))
        first = self._moves(g, direction, None, removed, None)
        if not first:
            return None
        i, kind, cost = self.rng.choice(first)
        g[i][0 if kind == "attn" else 1] += direction
        removed += cost
        for _ in range(4 * len(g) + 8):
            if self.lo <= removed <= self.hi:
                out = [tuple(x) for x in g]
                return out if out != list(geno) else None
            back = -1 if removed > self.hi else 1
            # prefer moves that land in the window; otherwise any move towards it that does not overshoot it
            bound = self.lo if back < 0 else self.hi
            moves = self._moves(g, back, (i, kind), removed, bound)
            if not moves:
                return None
            j, k2, c2 = self.rng.choice(moves)
            g[j][0 if k2 == "attn" else 1] += back
            removed += c2
        return None

    # ---- the loop --------------------------------------------------------------------------------
    def run(self, start) -> tuple[list[tuple[int, int]], list[dict]]:
        s = self.s
        t0 = time.perf_counter()
        parent = list(start)
        best = self.kl(parent, s.windows)
        self.parent = tuple(parent)
        start_kl = best
        trajectory = [self._point(0, best, parent, t0)]
        self.say(f"search: generation 0 (the global allocation): KL {best:.5f}, removed "
                 f"{trajectory[0]['removed']:.2%}")
        if best < NEGLIGIBLE_KL:
            self.say(f"search: the start is indistinguishable from the dense model (KL {best:.1e} < "
                     f"{NEGLIGIBLE_KL:.0e}); nothing to search")
            return parent, trajectory
        for gen in range(1, s.generations + 1):
            children: list = []
            tries = 0
            while len(children) < s.offspring and tries < 20 * s.offspring:
                tries += 1
                child = self.mutate(parent)
                if child is not None and child not in children:
                    children.append(child)
            if children:
                scores = self.kl_many(children, s.first_windows)
                first = [c for _, c in sorted(zip(scores, children, strict=True), key=lambda x: x[0])][: s.survivors]
                self._keep_inputs(parent, *first)
                kl, child = min(zip(self.kl_many(first, s.windows), first, strict=True), key=lambda x: x[0])
                if kl < best:
                    parent, best = child, kl
                    self.parent = tuple(parent)
                self._keep_inputs(parent)
            trajectory.append(self._point(gen, best, parent, t0))
            p = trajectory[-1]
            self.say(f"search: generation {gen}/{s.generations}: best KL {best:.5f} (start {start_kl:.5f}), "
                     f"removed {p['removed']:.2%}, {p['seconds']:.0f} s")
        return parent, trajectory

    def _point(self, gen: int, kl: float, geno, t0: float) -> dict:
        removed = self.blocks.removed(geno) / self.blocks.total
        return {"generation": gen, "kl": round(kl, 6), "removed": round(removed, 5),
                "seconds": round(time.perf_counter() - t0, 1)}


def budget_window(blocks: Blocks, ratio: float, start_removed: int) -> tuple[int, int]:
    """[lo, hi] removed weights a candidate may have: the target ratio within half the largest MLP
    step, but never more than 1% of the decoder weights either side (on a toy model one MLP step is
    a third of the layer, and the search would drift to removing far less than asked), widened to
    hold the start (the `global` allocation overshoots by rounding)."""
    target = ratio * blocks.total
    step = max(max(b - a for a, b in zip(t, t[1:], strict=False)) if len(t) > 1 else 0 for t in blocks.mlp_removed)
    half = min(step / 2, 0.01 * blocks.total)
    lo, hi = int(target - half), int(target + half)
    return min(lo, start_removed), max(hi, start_removed)


def validation_windows(validation: torch.Tensor, n: int, length: int) -> torch.Tensor:
    """`n` windows of `length` tokens spread evenly over the validation stream."""
    total = validation.numel() // length
    if total < 1:
        raise UserError(f"The validation text has {validation.numel()} tokens, fewer than one search window of "
                        f"{length}.")
    picks = torch.linspace(0, total - 1, min(n, total)).round().long().unique()
    return torch.stack([validation[i * length:(i + 1) * length] for i in picks.tolist()])


def prune_searched(model, adapter: Adapter, calib: torch.Tensor, validation: torch.Tensor, spec: PruneSpec,
                   compute: Compute, say=print, progress=None, settings: SearchSettings | None = None,
                   dense_stats: list | None = None, **overrides) -> PruneResult:
    """Search the per-layer allocation (width and depth) for `spec.ratio` of the decoder weights and
    leave `model` pruned in place to the best one found. `overrides` replace `settings` fields
    (e.g. `generations=20`); `dense_stats` (from `collect_stats(..., gram=True)` on this dense model)
    saves the calibration pass when a benchmark already made it."""
    if not 0.0 < spec.ratio < 1.0:
        raise UserError(f"The pruning ratio must be between 0 and 1 (exclusive), got {spec.ratio}.")
    metric = IMPORTANCE.get(spec.metric)
    comp: Compensation = COMPENSATION.get(spec.compensation)
    refuse_compensation(comp)
    t0, cpu0 = time.perf_counter(), time.process_time()
    extras = None
    if metric.precompute is not None:
        extras = metric.precompute(model, adapter, calib[: spec.grad_samples], device=compute.device)
    if dense_stats is None:
        stats, memory = collect_stats(model, adapter, calib, compute, progress=progress, gram=True,
                                      sample_rows=metric.sample_rows)
    else:
        stats, memory = [copy.copy(st) for st in dense_stats], {}
    for i, st in enumerate(stats):
        st.extra.update(extras[i] if extras else {})
    scored = score(model, adapter, stats, metric)
    keeps, notes = search_keeps(model, adapter, scored, spec, validation, compute, say, settings, t0=t0, cpu0=cpu0,
                                **overrides)
    prune_model(model, adapter, keeps, scored, comp)
    return PruneResult(keeps, memory, 1, "searched", notes)


def refuse_compensation(comp: Compensation) -> None:
    if comp.needs_reference:
        raise UserError(f"--structure searched builds every candidate from one calibration pass; the compensation "
                        f"'{comp.name}' needs a greedy pass with the dense model alongside (use lsq+bias or bias).")


def search_keeps(weights, adapter: Adapter, scored: Scored, spec: PruneSpec, validation: torch.Tensor,
                 compute: Compute, say=print, settings: SearchSettings | None = None, t0: float | None = None,
                 cpu0: float | None = None, **overrides) -> tuple[list[LayerKeep], dict]:
    """The search on the dense model's scored statistics (Gram matrices included): the kept units of
    every layer and the report's notes. `weights`: the model in memory (candidates are module swaps
    of it), or a `model.lazy.LazyModel` (each batch of candidates measured in one sweep over the
    decoder, one layer in memory at a time: `StreamedEvolution`); the same search either way."""
    s = settings or SearchSettings()
    if overrides:
        s = SearchSettings(**{**s.__dict__, **overrides})
    t0 = time.perf_counter() if t0 is None else t0
    cpu0 = time.process_time() if cpu0 is None else cpu0
    streamed = hasattr(weights, "materialize")
    model = weights.model if streamed else weights
    metric = IMPORTANCE.get(spec.metric)
    comp: Compensation = COMPENSATION.get(spec.compensation)
    refuse_compensation(comp)
    start_keeps = allocation.allocate(scored.scores, spec.ratio, "global", spec.attn_unit, spec.round_to,
                                      standardized=metric.standardize, tp=spec.tensor_parallel)
    blocks = Blocks(model, adapter, scored, comp, spec.attn_unit, spec.round_to, spec.tensor_parallel, s.depth,
                    s.cache_bytes)
    start = blocks.levels_of(start_keeps)
    lo, hi = budget_window(blocks, spec.ratio, blocks.removed(start))
    if streamed:
        s = SearchSettings(**{**s.__dict__, "precision": None})  # the checkpoint's dtype, as the passes
    fitness = Fitness(validation_windows(validation, s.windows, s.window_len), precision=s.precision)
    first = min(s.first_windows, len(fitness.windows))
    s = SearchSettings(**{**s.__dict__, "windows": len(fitness.windows), "first_windows": first})
    if streamed:
        evo = StreamedEvolution(blocks, fitness, s, lo, hi, weights, adapter, compute.device, say)
        for logits, _ in evo.sweep([(None, w, 0, None) for w in range(len(fitness.windows))]):
            fitness.add_dense(torch.log_softmax(logits.float(), -1).cpu(), s.top_k)
    else:
        fitness.cache_dense(model, s.top_k)
        evo = Evolution(blocks, fitness, s, lo, hi, say)
    setup_s = time.perf_counter() - t0
    say(f"search: statistics and the dense model's outputs on {len(fitness.windows)} x {s.window_len} validation "
        f"tokens in {setup_s:.0f} s; budget {lo / blocks.total:.2%}-{hi / blocks.total:.2%} of the decoder weights"
        + ("; each generation one sweep over the decoder per stage, one layer in memory at a time" if streamed
           else ""))
    best, trajectory = evo.run(start)
    start_kl, best_kl = trajectory[0]["kl"], trajectory[-1]["kl"]
    keeps = [blocks.keep(i, a, m) for i, (a, m) in enumerate(best)]
    built = blocks.built
    blocks.restore()
    seconds = time.perf_counter() - t0
    notes = {"search": {
        "method": "evolutionary (EvoPress-style) over per-layer attention and MLP levels, attention/MLP removal "
                  "included" if s.depth else "evolutionary (EvoPress-style) over per-layer attention and MLP widths",
        "fitness": f"KL(dense || pruned) of next-token distributions (top-{s.top_k} coarsened) on "
                   f"{len(fitness.windows)} x {s.window_len} validation tokens",
        "generations": s.generations, "offspring": s.offspring, "survivors": s.survivors, "seed": s.seed,
        "precision": f"{s.precision} autocast" if s.precision else "the model's dtype",
        "streamed": streamed,
        "start": "global", "start_kl": start_kl, "kl": best_kl, "trajectory": trajectory,
        "removed_fraction": round(blocks.removed(best) / blocks.total, 5),
        "start_removed_fraction": round(blocks.removed(start) / blocks.total, 5),
        "attention_removed": [i for i, k in enumerate(keeps) if not k.q_heads],
        "mlp_removed": [i for i, k in enumerate(keeps) if not k.channels],
        "candidates_built": built, "window_evaluations": fitness.evaluations,
        "setup_s": round(setup_s, 1), "seconds": round(seconds, 1),
        "cpu_seconds": round(time.process_time() - cpu0, 1)}}  # wall time on a shared machine says little
    n = notes["search"]
    say(f"search: KL {start_kl:.5f} -> {best_kl:.5f} in {seconds:.0f} s; attention removed in layers "
        f"{n['attention_removed'] or 'none'}, MLP removed in layers {n['mlp_removed'] or 'none'}")
    return keeps, notes


class StreamedEvolution(Evolution):
    """The same search for a model whose weights stay in its checkpoint (`lazy`): each batch of
    candidates (a stage of a generation) is measured in one sweep over the decoder that reads every
    layer once and runs each candidate's windows through its own halves of it (`Blocks`), then the
    final norm and the LM head. Memory: one dense layer, the cached halves, and every candidate's
    layer inputs for its windows (what its children start from)."""

    def __init__(self, blocks: Blocks, fitness: Fitness, settings: SearchSettings, lo: int, hi: int, lazy,
                 adapter: Adapter, device: str, say=print):
        from .engine import LayerwiseEngine, _to

        super().__init__(blocks, fitness, settings, lo, hi, say)
        self.lazy, self.adapter, self.device = lazy, adapter, device
        engine = LayerwiseEngine(lazy.model, adapter, fitness.windows, device=device, batch_size=1, lazy=lazy,
                                 observe=False)
        self.embedded, by_batch = engine.capture_inputs()  # every window's input to layer 0
        self.kwargs = _to(by_batch[1], device)

    def _forward(self, todo):
        return self.sweep(todo)

    @torch.no_grad()
    def sweep(self, items):
        """(logits, every layer's input) of each (genotype or None for the dense model, window, first
        layer to run, the parent's layer inputs), in order, from one pass over the decoder."""
        states = [[list(prefix[:start]), prefix[start], start] if start > 0
                  else [[], self.embedded[w: w + 1].to(self.device), 0] for _, w, start, prefix in items]
        for i, layer in enumerate(self.blocks.layers):
            if all(st[2] > i for st in states):
                continue
            self.lazy.materialize(layer, f"model.layers.{i}", self.device)
            try:
                for (key, *_), st in zip(items, states, strict=True):
                    if st[2] > i:
                        continue
                    if key is not None:
                        self.blocks.apply_layer(i, *key[i])
                    try:
                        st[0].append(st[1])
                        out = layer(st[1], **self.kwargs)
                        st[1] = out[0] if isinstance(out, tuple) else out
                    finally:
                        self.blocks.restore_layer(i)
            finally:
                self.lazy.release(layer)  # the dense halves are back in place: only they are released
        model = self.lazy.model
        norm = self.lazy.materialize(self.adapter.decoder(model).norm, "model.norm", self.device)
        head = self.lazy.materialize(model.lm_head, "lm_head", self.device)
        try:
            for st in states:
                yield head(norm(st[1]))[0, :-1], st[0]
        finally:
            self.lazy.release(norm)
            self.lazy.release(head)
