"""The pruning driver: calibrate, score, allocate, prune and compensate a model in place, with
the layer-wise engine doing one or two passes over the decoder.

Progress is reported through a callback `progress(pass_name, layers_done, layers_total)` that the
driver calls per layer, naming the pass it is in, so a progress bar never has to guess.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import UserError
from ..memory import available_bytes
from ..model.adapters import Adapter
from ..model.lazy import Resident
from . import COMPENSATION, IMPORTANCE, STRUCTURES, allocation
from .allocation import LayerScores
from .compensation import Compensation
from .engine import LayerStats, LayerwiseEngine
from .importance import Metric
from .surgery import LayerKeep, prune_layer

Progress = Callable[[str, int, int], None]  # (pass name, layers done, layers in the pass)

PASS_ONE = "calibrate + score"
PASS_ONE_PRUNE = "calibrate + score + prune"
PASS_GREEDY = "greedy pass: prune + re-fit"
PASS_WRITE = "prune + write"
PASS_REFIT = "pass 2: re-fit + write"


@dataclass(frozen=True)
class Compute:
    """Where and how the engine runs: the compute device and the calibration batch size."""

    device: str = "cpu"
    batch_size: int = 8


@dataclass
class Scored:
    """What the calibration pass leaves per layer: channel scores and the input statistics."""

    scores: list[LayerScores]
    stats: list[LayerStats]


def _light(st: LayerStats) -> LayerStats:
    """Keep what compensation by bias needs (mean, variance); drop Gram matrices and samples."""
    a, m = st.attn.to("cpu"), st.mlp.to("cpu")
    a.gram = m.gram = None
    a.samples, m.samples = [], []
    return LayerStats(a, m, st.extra)


def _memory(rep) -> dict:
    return {"peak_rss_mib": round(rep.peak_rss_mib, 1), "peak_device_mib": round(rep.peak_device_mib, 1)}


def _engine_progress(progress: Progress | None, name: str):
    return None if progress is None else (lambda done, total: progress(name, done, total))


def collect_stats(model, adapter: Adapter, samples: torch.Tensor, compute: Compute, progress: Progress | None = None,
                  gram: bool = False, sample_rows: int = 0) -> tuple[list[LayerStats], dict]:
    """One layer-wise pass over the dense model, keeping every layer's statistics (benchmarks and
    searches score many metrics from one pass; with `gram` this holds every layer's Gram matrices)."""
    stats: list[LayerStats] = []

    def visit(i, layer, st: LayerStats) -> bool:
        stats.append(LayerStats(st.attn.to("cpu"), st.mlp.to("cpu")))
        return False

    engine = LayerwiseEngine(model, adapter, samples, device=compute.device, batch_size=compute.batch_size,
                             gram=gram, sample_rows=sample_rows, progress=_engine_progress(progress, "calibrate"))
    return stats, _memory(engine.run(visit))


def _layer_scores(metric: Metric, adapter: Adapter, layer, st: LayerStats, hidden: int) -> LayerScores:
    cs = metric(adapter, layer, st)
    return LayerScores(adapter.shape(layer), hidden, cs.attn.cpu(), cs.mlp.cpu())


def score(model, adapter: Adapter, stats: list[LayerStats], metric: Metric) -> Scored:
    """Channel scores of every layer from the (still dense) weights and the collected statistics."""
    hidden = model.config.hidden_size
    scores = [_layer_scores(metric, adapter, layer, st, hidden)
              for layer, st in zip(adapter.layers(model), stats, strict=True)]
    return Scored(scores, stats)


def score_layers(model, adapter: Adapter, samples: torch.Tensor, metric: Metric, compute: Compute,
                 progress: Progress | None = None, extras: list[dict] | None = None, keep_gram: bool = False,
                 pass_name: str = PASS_ONE) -> tuple[Scored, dict]:
    """Pass 1: one layer-wise pass over the dense model, scoring each layer while its statistics
    (Gram matrices included, if the metric reads them) are at hand, then keeping only light ones
    (or the Gram matrices too with `keep_gram`, for a least-squares compensation without a greedy pass)."""
    hidden = model.config.hidden_size
    scores: list[LayerScores] = []
    stats: list[LayerStats] = []

    def visit(i, layer, st: LayerStats) -> bool:
        if extras is not None:
            st.extra.update(extras[i])
        scores.append(_layer_scores(metric, adapter, layer, st, hidden))
        stats.append(LayerStats(st.attn.to("cpu"), st.mlp.to("cpu"), st.extra) if keep_gram else _light(st))
        return False

    engine = LayerwiseEngine(model, adapter, samples, device=compute.device, batch_size=compute.batch_size,
                             gram=metric.needs_gram or keep_gram, sample_rows=metric.sample_rows,
                             progress=_engine_progress(progress, pass_name))
    return Scored(scores, stats), _memory(engine.run(visit))


def prune_model(model, adapter: Adapter, keeps: list[LayerKeep], scored: Scored, comp: Compensation) -> None:
    """Compensate and cut every layer to its `keeps` entry, from statistics collected earlier."""
    for layer, keep, st in zip(adapter.layers(model), keeps, scored.stats, strict=True):
        _cut(adapter, layer, keep, comp(adapter, layer, keep, st))
    adapter.set_config_widths(model.config, keeps)


def _cut(adapter: Adapter, layer, keep: LayerKeep, fix) -> None:
    prune_layer(adapter, layer, keep, o_bias=fix.o_bias, down_bias=fix.down_bias,
                o_weight=fix.o_weight, down_weight=fix.down_weight)


@dataclass
class PruneSpec:
    metric: str = "auto"
    compensation: str = "auto"
    structure: str = "auto"
    ratio: float = 0.2
    attn_unit: str = "auto"
    round_to: int = 64
    tensor_parallel: int = 1  # the widths must split over this many devices (prune/tensor_parallel.py)
    grad_samples: int = 8  # calibration windows used for gradients (Taylor-based metrics)
    # greedy second pass on the pruned model's activations; None = when the metric is sequential.
    # Without it a Gram-matrix compensation keeps every layer's Gram matrices from pass 1 in memory
    # (pass greedy=True to bound memory to one layer's).
    greedy: bool | None = None


@dataclass
class PruneResult:
    keeps: list[LayerKeep]
    memory: dict
    passes: int
    structure: str
    notes: dict = field(default_factory=dict)


def resolve_structure(structure: str, metric: Metric) -> str:
    resolved = metric.default_structure if structure == "auto" else structure
    if resolved not in STRUCTURES:
        raise UserError(f"Unknown structure '{structure}' (use uniform, global or auto).")
    return resolved


# ---- out of core --------------------------------------------------------------------------------

class LayerSink:
    """Where an out-of-core prune puts each finished layer (the streaming export): `add(i, layer)`
    returns True when what was added so far is safely on disk; `state()` says what is."""

    def begin(self, keeps: list[LayerKeep]) -> None:  # pragma: no cover - an interface
        """The allocated widths, before the first layer arrives."""

    def add(self, index: int, layer) -> bool:  # pragma: no cover
        raise NotImplementedError

    def state(self) -> list[dict]:  # pragma: no cover
        raise NotImplementedError


def gram_bytes(shapes) -> int:
    """What keeping every layer's float64 Gram matrices (o_proj and down_proj inputs) takes."""
    return sum(8 * ((s.num_heads * s.head_dim) ** 2 + s.intermediate_size ** 2) for s in shapes)


def refit_bytes(shape, hidden: int) -> int:
    """Working memory of one least-squares re-fit of down_proj in float64 beside its Gram matrix: the
    system matrix and its factorisation, the weights, the right-hand side and the solution."""
    d = shape.intermediate_size
    return 8 * (2 * d * d + 4 * hidden * d)


def plan_passes(metric: Metric, comp: Compensation, greedy: bool | None, shapes, hidden: int,
                free_bytes: int, passes: str = "auto") -> tuple[str, str]:
    """How an out-of-core prune walks the model: ("one-pass", why) keeps pass 1's Gram matrices,
    ("two-pass", why) recomputes one layer's Gram at a time in pass 2 on the dense activations,
    ("greedy", why) re-scores each layer on the pruned model's activations. One pass is chosen when
    its predicted memory fits in 80% of what is free."""
    if comp.needs_reference or (greedy if greedy is not None else metric.sequential):
        return "greedy", f"the {'compensation' if comp.needs_reference else 'metric'} is sequential"
    if not comp.needs_gram:
        return "one-pass", f"'{comp.name}' needs no Gram matrices"
    if passes in ("one", "two"):
        return f"{passes}-pass", "asked for with --passes"
    work = max(refit_bytes(s, hidden) for s in shapes)
    one = gram_bytes(shapes) + work
    two = gram_bytes(shapes[:1]) + work
    gib = 2**30
    if one <= 0.8 * free_bytes:
        return "one-pass", (f"every layer's Gram matrices and a re-fit ({one / gib:.2f} GiB) fit in the free memory "
                            f"({free_bytes / gib:.1f} GiB)")
    warn = "" if two <= free_bytes else "; warning: even that may not fit"
    return "two-pass", (f"every layer's Gram matrices and a re-fit ({one / gib:.2f} GiB) do not fit in the free "
                        f"memory ({free_bytes / gib:.1f} GiB): pass 2 recomputes one layer's at a time "
                        f"({two / gib:.2f} GiB){warn}")


def prune(weights, adapter: Adapter, calib: torch.Tensor, spec: PruneSpec, compute: Compute,
          sink: LayerSink | None = None, work=None, free_bytes: int | None = None, progress: Progress | None = None,
          say=None, passes: str = "auto", extras: list[dict] | None = None,
          dense_stats: list[LayerStats] | None = None, search=None) -> PruneResult:
    """Calibrate, score, allocate, prune and compensate a model layer by layer: the one driver for
    every model size. `weights` is the model itself (resident in memory, pruned in place) or a
    `model.lazy.LazyModel` (out of core: one layer in memory at a time, each finished layer handed
    to `sink` in order); the same model gives the same pruned weights either way.

    Pass 1 scores every layer on the dense model (keeping its Gram matrices only where they fit:
    `plan_passes`); allocation fixes the widths; pass 2 cuts and compensates each layer (from pass
    1's statistics, or recomputed on the dense activations, or greedily on the pruned model's own).
    `work` (`prune.resume.WorkState`) makes both passes resumable. `search(scores, stats)` -> (keeps,
    notes) replaces the allocation (`--structure searched`: `evolve.search_keeps`). Resident only: `extras` (a
    metric's precomputed per-layer data, else computed here) and `dense_stats` (statistics of the
    dense model with what the metric needs) let searches score many configurations from one pass."""
    lazy = weights if hasattr(weights, "materialize") else Resident(weights)
    resident = isinstance(lazy, Resident)
    metric: Metric = IMPORTANCE.get(spec.metric)
    comp: Compensation = COMPENSATION.get(spec.compensation)
    structure = resolve_structure(spec.structure, metric)
    if not 0.0 < spec.ratio < 1.0:
        raise UserError(f"The pruning ratio must be between 0 and 1 (exclusive), got {spec.ratio}.")
    if metric.precompute is not None and extras is None:
        if not resident:
            raise UserError(f"The metric '{metric.name}' needs gradients through the whole model, which the "
                            "out-of-core path does not compute; use --out-of-core off (the model in memory) or "
                            "another metric.")
        extras = metric.precompute(lazy.model, adapter, calib[: spec.grad_samples], device=compute.device)
    model = lazy.model
    layers = adapter.layers(model)
    hidden = model.config.hidden_size
    shapes = [adapter.shape(layer) for layer in layers]
    mode, why = plan_passes(metric, comp, spec.greedy, shapes, hidden,
                            available_bytes() if free_bytes is None else free_bytes, passes)
    if dense_stats is not None and mode == "two-pass":
        mode, why = "one-pass", "the dense statistics were given"
    if structure == "searched" and (search is None or mode != "one-pass"):
        raise UserError("--structure searched builds its candidates from every layer's statistics kept in memory, "
                        f"and here {why}: use --structure global (the one-pass allocation).")
    if say is not None and (not resident or mode == "two-pass"):
        say(f"{'in memory' if resident else 'out of core'}: {mode} ({why})")
    engine_args = dict(device=compute.device, batch_size=compute.batch_size, lazy=lazy)
    memory: dict = {}
    passes_run = 0

    def extra(i: int, st: LayerStats) -> None:
        if extras is not None:
            st.extra.update(extras[i])

    # pass 1: scores (and light statistics) of every layer, resumable layer by layer
    if structure == "global" or mode != "greedy":
        keep_gram = mode == "one-pass" and comp.needs_gram
        scores: list[LayerScores] = []
        stats: list[LayerStats] = []
        start = work.pass1_done if work is not None else 0
        for i in range(start):
            sc, st = work.load_pass1_layer(i, shapes[i], hidden)
            scores.append(sc)
            stats.append(st)

        def visit(i, layer, st: LayerStats) -> bool:
            extra(i, st)
            scores.append(_layer_scores(metric, adapter, layer, st, hidden))
            stats.append(LayerStats(st.attn.to("cpu"), st.mlp.to("cpu"), st.extra) if keep_gram else _light(st))
            return False

        def saved(i, layer, acts) -> None:
            if work is not None:
                work.save_pass1_layer(i, scores[i], stats[i], acts)

        if dense_stats is not None and resident:
            for i, st in enumerate(dense_stats):
                extra(i, st)
            scored = score(model, adapter, dense_stats, metric)
            scores, stats = scored.scores, scored.stats
        elif start < len(layers):
            name = PASS_ONE if mode != "one-pass" else PASS_ONE_PRUNE if resident else PASS_ONE
            engine = LayerwiseEngine(model, adapter, calib, gram=metric.needs_gram or keep_gram,
                                     sample_rows=metric.sample_rows, on_done=saved,
                                     progress=_engine_progress(progress, name), **engine_args)
            memory = _memory(engine.run(visit, start=start, resume_inputs=work.acts("pass1", start) if start else None))
            passes_run += 1
        keeps = work.allocation() if work is not None else None
        notes = work.state.get("search_notes") or {} if work is not None else {}
        if keeps is None:
            if structure == "searched":
                keeps, notes = search(scores, stats)
            else:
                keeps = allocation.allocate(scores, spec.ratio, structure, spec.attn_unit, spec.round_to,
                                            standardized=metric.standardize and structure == "global",
                                            tp=spec.tensor_parallel)
            if work is not None:
                work.state["search_notes"] = notes
                work.save_allocation(keeps)
    else:
        stats, notes = [], {}
        keeps = allocation.uniform_widths(shapes, hidden, spec.ratio, spec.attn_unit, spec.round_to,
                                          spec.tensor_parallel)

    # pass 2: cut, compensate and hand out every layer, resumable at the sink's durable points
    if sink is not None:
        sink.begin(keeps)
    done = work.pass2_done if work is not None else 0
    final: list[LayerKeep] = work.keeps() if work is not None else []

    def finished(i, layer, acts) -> None:
        if sink is not None and sink.add(i, layer) and work is not None:
            work.save_pass2(i + 1, final, sink.state(), acts)

    if mode == "one-pass" or (mode == "two-pass" and not comp.needs_gram):
        for i in range(done, len(layers)):  # the statistics are at hand: no forward pass needed
            layer = lazy.materialize(layers[i], f"model.layers.{i}", "cpu" if resident else compute.device)
            _cut(adapter, layer, keeps[i], comp(adapter, layer, keeps[i], stats[i]))
            final.append(keeps[i])
            finished(i, layer, None)
            lazy.release(layer)
            if progress and not resident:
                progress(PASS_WRITE, i + 1, len(layers))
    else:
        greedy = mode == "greedy"

        def visit2(i, layer, st: LayerStats) -> bool:
            extra(i, st)
            if greedy:
                keep = allocation.select(_layer_scores(metric, adapter, layer, st, hidden), spec.attn_unit, keeps[i])
            else:
                keep = keeps[i]
                st.extra.update(stats[i].extra)
            _cut(adapter, layer, keep, comp(adapter, layer, keep, st))
            final.append(keep)
            return greedy  # greedy: later layers see this layer's pruned outputs; else the dense ones

        if done < len(layers):
            engine = LayerwiseEngine(model, adapter, calib, gram=metric.needs_gram or comp.needs_gram,
                                     sample_rows=metric.sample_rows if greedy else 0,
                                     reference=comp.needs_reference, on_done=finished,
                                     progress=_engine_progress(progress, PASS_GREEDY if greedy else PASS_REFIT),
                                     **engine_args)
            rep = engine.run(visit2, start=done, resume_inputs=work.acts("pass2", done) if done else None)
            memory = {k: max(v, memory.get(k, 0.0)) for k, v in _memory(rep).items()}
            passes_run += 1
    adapter.set_config_widths(model.config, final)
    return PruneResult(final, memory, passes_run, structure,
                       notes=notes if resident else {**notes, "out_of_core": mode})


def copy_out_of_core(lazy, adapter: Adapter, sink: LayerSink, work=None,
                     progress: Progress | None = None) -> PruneResult:
    """A plan that prunes nothing (a weight format alone): every layer handed to `sink` as it is, one
    in memory at a time, with no calibration pass. Resumable at the sink's durable points, as pass 2."""
    layers = adapter.layers(lazy.model)
    keeps = [LayerKeep(list(range(s.num_heads)), list(range(s.num_kv_heads)), list(range(s.intermediate_size)))
             for s in (adapter.shape(layer) for layer in layers)]
    sink.begin(keeps)
    done = work.pass2_done if work is not None else 0
    for i in range(done, len(layers)):
        layer = lazy.materialize(layers[i], f"model.layers.{i}", "cpu")
        if sink.add(i, layer) and work is not None:
            work.save_pass2(i + 1, keeps, sink.state(), None)
        lazy.release(layer)
        if progress:
            progress(PASS_WRITE, i + 1, len(layers))
    return PruneResult(keeps, {}, 0, "none", notes={"out_of_core": "copied: nothing pruned"})

