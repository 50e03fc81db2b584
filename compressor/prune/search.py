"""`--search`: Bayesian optimisation (Optuna TPE) over the metric mixture, the calibration subset
and the compensation, in the spirit of AdaPruner.

The calibration windows are split into chunks; one layer-wise pass collects each chunk's
statistics separately (means, variances and Gram matrices merge exactly across chunks), and
gradients for the Taylor metric are computed once. A trial then only merges the chosen chunks'
statistics, mixes the metrics' z-scored channel scores with the trial's weights, allocates,
prunes a copy of the model and measures perplexity on the *validation* region of the builtin
text (never the calibration windows, never the held-out test text that the report uses). So a
trial costs a pruning + a short evaluation, not a calibration pass.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import UserError
from ..model.adapters import Adapter
from . import COMPENSATION, IMPORTANCE, allocation
from .allocation import LayerScores, standardize
from .driver import Compute, PruneResult, PruneSpec, Scored, collect_stats, prune_model
from .engine import LayerStats

SEARCH_METRICS = ["flap", "wanda-sp", "output-approx", "taylor", "mi"]
SEARCH_COMPENSATIONS = ["bias", "lsq+bias"]


@dataclass
class Trial:
    number: int
    weights: dict[str, float]
    chunks: list[int]
    compensation: str
    val_ppl: float
    seconds: float


@dataclass
class SearchResult:
    best: Trial
    trials: list[Trial] = field(default_factory=list)
    setup_s: float = 0.0


def _merge(per_chunk: list[list[LayerStats]], chunks: list[int]) -> list[LayerStats]:
    out = []
    for i in range(len(per_chunk[0])):
        a, m = per_chunk[chunks[0]][i].attn, per_chunk[chunks[0]][i].mlp
        for c in chunks[1:]:
            a, m = a.merge(per_chunk[c][i].attn), m.merge(per_chunk[c][i].mlp)
        m.samples = [s for c in chunks for s in per_chunk[c][i].mlp.samples]
        m.sample_rows = sum(per_chunk[c][i].mlp.sample_rows for c in chunks)
        out.append(LayerStats(a, m, {}))
    return out


def mixture_scores(model, adapter: Adapter, stats: list[LayerStats], weights: dict[str, float],
                   extras: dict[str, list[dict]]) -> Scored:
    """Per layer and module: sum over metrics of weight x z-scored channel scores."""
    hidden = model.config.hidden_size
    scores = []
    for i, (layer, st) in enumerate(zip(adapter.layers(model), stats, strict=True)):
        for ex in extras.values():
            st.extra.update(ex[i])
        attn = mlp = 0
        for name, w in weights.items():
            if w <= 0:
                continue
            cs = IMPORTANCE.get(name).fn(adapter, layer, st)
            attn = attn + w * standardize(cs.attn.double().cpu())
            mlp = mlp + w * standardize(cs.mlp.double().cpu())
        scores.append(LayerScores(adapter.shape(layer), hidden, attn, mlp))
    return Scored(scores, stats)


class Search:
    """The cached statistics of one calibration set, and the trials run over them."""

    def __init__(self, model, adapter: Adapter, calib: torch.Tensor, compute: Compute, n_chunks: int = 4, say=print):
        if calib.shape[0] < n_chunks:
            raise UserError(f"--search needs at least {n_chunks} calibration windows.")
        self.model, self.adapter, self.n_chunks, self.say = model, adapter, n_chunks, say
        t0 = time.perf_counter()
        rows = max(IMPORTANCE.get(n).sample_rows for n in SEARCH_METRICS) // n_chunks
        self.per_chunk = [collect_stats(model, adapter, part, compute, gram=True, sample_rows=rows)[0]
                          for part in calib.chunk(n_chunks)]
        self.extras = {n: IMPORTANCE.get(n).precompute(model, adapter, calib[:8], device=compute.device)
                       for n in SEARCH_METRICS if IMPORTANCE.get(n).precompute is not None}
        self.setup_s = time.perf_counter() - t0
        say(f"search: cached statistics of {n_chunks} calibration chunks and gradients in {self.setup_s:.0f} s")

    tp = 1  # tensor-parallel size the widths must split over (prune/tensor_parallel.py)

    def keeps(self, trial: Trial, ratio: float, round_to: int, attn_unit: str = "auto"):
        stats = _merge(self.per_chunk, trial.chunks)
        scored = mixture_scores(self.model, self.adapter, stats, trial.weights, self.extras)
        keeps = allocation.allocate(scored.scores, ratio, "global", attn_unit, round_to, standardized=True, tp=self.tp)
        return keeps, scored

    def prune(self, model, trial: Trial, ratio: float, round_to: int, attn_unit: str = "auto"):
        """Prune `model` (the dense model or a copy of it) with a trial's configuration."""
        keeps, scored = self.keeps(trial, ratio, round_to, attn_unit)
        prune_model(model, self.adapter, keeps, scored, COMPENSATION.get(trial.compensation))
        return keeps

    def run(self, val: torch.Tensor, ratio: float, round_to: int, score: Callable[[object, torch.Tensor], float],
            trials: int = 20, seed: int = 0, attn_unit: str = "auto") -> SearchResult:
        """`score(model, windows)`: a trial's validation perplexity (lower is better), given by the
        caller so that pruning does not depend on evaluation."""
        try:
            import optuna
        except ImportError as exc:
            raise UserError("--search needs the package 'optuna' (extra 'search').") from exc
        done: list[Trial] = []

        def objective(ot: optuna.Trial) -> float:
            t = time.perf_counter()
            weights = {n: ot.suggest_float(f"w_{n}", 0.0, 1.0) for n in SEARCH_METRICS}
            if sum(weights.values()) <= 1e-6:
                weights["flap"] = 1.0
            chunks = [c for c in range(self.n_chunks) if ot.suggest_categorical(f"chunk_{c}", [True, False])] or [0]
            trial = Trial(ot.number, weights, chunks, ot.suggest_categorical("compensation", SEARCH_COMPENSATIONS),
                          float("nan"), 0.0)
            pruned = copy.deepcopy(self.model)
            self.prune(pruned, trial, ratio, round_to, attn_unit)
            trial.val_ppl = score(pruned, val)
            trial.seconds = time.perf_counter() - t
            done.append(trial)
            self.say(f"  trial {trial.number:>3}: val ppl {trial.val_ppl:8.3f}  {trial.compensation:>8}  "
                     f"chunks {chunks}  " + " ".join(f"{k}={v:.2f}" for k, v in weights.items())
                     + f"  ({trial.seconds:.0f} s)")
            return trial.val_ppl

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
        # start from the plain metrics, so the search is never worse than the best of them
        for n in ("flap", "output-approx"):
            study.enqueue_trial({**{f"w_{m}": float(m == n) for m in SEARCH_METRICS},
                                 **{f"chunk_{c}": True for c in range(self.n_chunks)}, "compensation": "lsq+bias"})
        study.optimize(objective, n_trials=trials)
        return SearchResult(min(done, key=lambda t: t.val_ppl), done, self.setup_s)


def run_search(model, adapter: Adapter, calib: torch.Tensor, validation: torch.Tensor, spec: PruneSpec, cfg,
               score: Callable[[object, torch.Tensor], float], say=print) -> PruneResult:
    """`--search`: choose metric mixture, calibration subset and compensation on the validation
    region (`score`: perplexity of a model on windows), then prune `model` with the best trial.
    `cfg` is the run's configuration."""
    from ..data import contiguous_chunks

    val = contiguous_chunks(validation, cfg.seqlen, 8)
    searcher = Search(model, adapter, calib, cfg.compute, say=say)
    searcher.tp = spec.tensor_parallel  # every trial's widths split over the profile's devices
    found = searcher.run(val, spec.ratio, spec.round_to, score, trials=cfg.trials, seed=cfg.seed,
                         attn_unit=spec.attn_unit)
    best = found.best
    say(f"search: best trial {best.number}, validation perplexity {best.val_ppl:.3f}")
    keeps = searcher.prune(model, best, spec.ratio, spec.round_to, spec.attn_unit)
    notes = {"search": {"best": best.__dict__, "trials": [t.__dict__ for t in found.trials],
                        "setup_s": round(found.setup_s, 1), "objective": "perplexity on the builtin validation region"}}
    return PruneResult(keeps, {}, 1, "global", notes)
