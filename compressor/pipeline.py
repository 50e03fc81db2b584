"""The main job, stage by stage: plan -> calibrate -> score -> allocate -> prune+compensate ->
export -> check -> report. Each stage is timed; the result is an output directory with the
weights, a model card and `report.json`."""

from __future__ import annotations

import json
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import allocation, calibration, compensation, metrics
from .adapters import Adapter, adapter_for
from .allocation import LayerScores
from .engine import LayerStats, LayerwiseEngine, peak_rss_mib
from .errors import UserError
from .output import atomic_dir, check_out_dir
from .report import REPORT_SCHEMA  # fitprune.report/2
from .surgery import LayerKeep, prune_layer


@dataclass
class Options:
    model: str | None = None
    profile: str = "cpu-2core"
    ratio: float | None = None
    metric: str = "auto"
    compensation: str = "auto"
    structure: str = "auto"  # auto = the metric's default
    attn_unit: str = "auto"
    round_to: int | None = None  # None = the profile's
    calib: str = "builtin"
    nsamples: int = 128
    seqlen: int = 512
    eval_samples: int = 40
    batch_size: int = 8
    device: str = "cpu"
    seed: int = 0
    out: Path | None = None
    export_dtype: str = "auto"
    threads: int | None = None
    trust_remote_code: bool = False
    search: bool = False
    trials: int = 20
    checks: bool = True  # after export: latency in the profile's runtime, lm-eval tasks, budget verdict
    lm_eval_backend: str = "hf"  # "vllm": also run the lm-eval tasks on the export as vLLM serves it


@dataclass
class Stages:
    seconds: dict[str, float] = field(default_factory=dict)

    def timed(self, name: str):
        stages = self

        class _T:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                stages.seconds[name] = round(stages.seconds.get(name, 0.0) + time.perf_counter() - self.t, 3)

        return _T()


def count_params(model) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    decoder = sum(p.numel() for p in model.model.layers.parameters())
    return {"total": total, "decoder": decoder, "non_embedding": decoder + sum(
        p.numel() for p in model.model.norm.parameters())}


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


def collect_stats(model, adapter: Adapter, samples: torch.Tensor, opts: Options, progress=None,
                  gram: bool = False, sample_rows: int = 0) -> tuple[list[LayerStats], dict]:
    """One layer-wise pass over the dense model, keeping every layer's statistics (benchmarks and
    searches score many metrics from one pass; with `gram` this holds every layer's Gram matrices)."""
    stats: list[LayerStats] = []

    def visit(i, layer, st: LayerStats) -> bool:
        stats.append(LayerStats(st.attn.to("cpu"), st.mlp.to("cpu")))
        return False

    engine = LayerwiseEngine(model, adapter, samples, device=opts.device, batch_size=opts.batch_size,
                             gram=gram, sample_rows=sample_rows, progress=progress)
    rep = engine.run(visit)
    return stats, _memory(rep)


def _memory(rep) -> dict:
    return {"peak_rss_mib": round(rep.peak_rss_mib, 1), "peak_device_mib": round(rep.peak_device_mib, 1)}


def score(model, adapter: Adapter, stats: list[LayerStats], metric: metrics.Metric) -> Scored:
    """Channel scores of every layer from the (still dense) weights and the collected statistics."""
    hidden = model.config.hidden_size
    scores = []
    for layer, st in zip(adapter.layers(model), stats, strict=True):
        cs = metric.fn(adapter, layer, st)
        scores.append(LayerScores(adapter.shape(layer), hidden, cs.attn.cpu(), cs.mlp.cpu()))
    return Scored(scores, stats)


def score_layers(model, adapter: Adapter, samples: torch.Tensor, metric: metrics.Metric, opts: Options,
                 progress=None, extras: list[dict] | None = None, keep_gram: bool = False) -> tuple[Scored, dict]:
    """Pass 1: one layer-wise pass over the dense model, scoring each layer while its statistics
    (Gram matrices included, if the metric reads them) are at hand, then keeping only light ones
    (or the Gram matrices too with `keep_gram`, for a least-squares compensation without a greedy pass)."""
    hidden = model.config.hidden_size
    scores: list[LayerScores] = []
    stats: list[LayerStats] = []

    def visit(i, layer, st: LayerStats) -> bool:
        if extras is not None:
            st.extra.update(extras[i])
        cs = metric.fn(adapter, layer, st)
        scores.append(LayerScores(adapter.shape(layer), hidden, cs.attn.cpu(), cs.mlp.cpu()))
        stats.append(LayerStats(st.attn.to("cpu"), st.mlp.to("cpu"), st.extra) if keep_gram else _light(st))
        return False

    engine = LayerwiseEngine(model, adapter, samples, device=opts.device, batch_size=opts.batch_size,
                             gram=metric.needs_gram or keep_gram, sample_rows=metric.sample_rows, progress=progress)
    return Scored(scores, stats), _memory(engine.run(visit))


def prune_model(model, adapter: Adapter, keeps: list[LayerKeep], scored: Scored, comp: compensation.Compensation):
    for layer, keep, st in zip(adapter.layers(model), keeps, scored.stats, strict=True):
        fix = comp.fn(adapter, layer, keep, st)
        prune_layer(adapter, layer, keep, o_bias=fix.o_bias, down_bias=fix.down_bias,
                    o_weight=fix.o_weight, down_weight=fix.down_weight)
    _update_config(model, keeps)


def _update_config(model, keeps: list[LayerKeep]) -> None:
    cfg = model.config
    cfg.num_attention_heads = max(len(k.q_heads) for k in keeps)
    cfg.num_key_value_heads = max(len(k.kv_heads) for k in keeps)
    cfg.intermediate_size = max(len(k.channels) for k in keeps)


@dataclass
class PruneSpec:
    metric: str = "auto"
    compensation: str = "auto"
    structure: str = "auto"
    ratio: float = 0.2
    attn_unit: str = "auto"
    round_to: int = 64
    grad_samples: int = 8  # calibration windows used for gradients (Taylor-based metrics)
    # greedy second pass on the pruned model's activations; None = when the metric is sequential.
    # Without it a Gram-matrix compensation keeps every layer's Gram matrices from pass 1 in memory
    # (fine for small models; pass greedy=True to bound memory to one layer's). On SmolLM2 the
    # one-pass flap + lsq+bias was slightly better than greedy at ridge 0.01 (16.54 vs 16.64; rerun with
    # `benchmarks/quality.py --metrics flap --compensations lsq+bias --greedy flap:lsq+bias --ridge 0.01`).
    greedy: bool | None = None


@dataclass
class PruneResult:
    keeps: list[LayerKeep]
    memory: dict
    passes: int
    structure: str
    notes: dict = field(default_factory=dict)


def prune(model, adapter: Adapter, calib: torch.Tensor, spec: PruneSpec, opts: Options,
          progress=None, extras: list[dict] | None = None, dense_stats: list[LayerStats] | None = None
          ) -> PruneResult:
    """Calibrate, score, allocate, prune and compensate `model` in place.

    One pass when the metric scores the dense model (FLAP and the like; a least-squares
    compensation then uses the Gram matrices kept from that pass). Otherwise (a greedy metric, or
    `spec.greedy`) widths are allocated first (pass 1 on the dense model; skipped for
    `uniform`, whose widths do not depend on scores), then pass 2 walks the layers in order on the
    already-pruned model's activations: statistics, scores, which units to keep (with the
    allocated widths), compensation, surgery; the next layer sees the pruned layer's outputs.

    `extras` (a metric's precomputed per-layer data) and `dense_stats` (statistics of the dense
    model, with Gram matrices and samples as the metric needs) let benchmarks and searches score
    many configurations from one calibration pass.
    """
    metric = metrics.get(spec.metric)
    comp = compensation.get(spec.compensation)
    structure = metric.default_structure if spec.structure == "auto" else spec.structure
    if structure not in ("uniform", "global"):
        raise UserError(f"Unknown structure '{spec.structure}' (use uniform, global or auto).")
    if not 0.0 < spec.ratio < 1.0:
        raise UserError(f"The pruning ratio must be between 0 and 1 (exclusive), got {spec.ratio}.")
    if metric.precompute is not None and extras is None:
        extras = metric.precompute(model, adapter, calib[: spec.grad_samples], device=opts.device)
    layers = adapter.layers(model)
    hidden = model.config.hidden_size
    two_pass = comp.needs_reference or (spec.greedy if spec.greedy is not None else metric.sequential)
    memory: dict = {}
    passes = 0
    if structure == "global" or not two_pass:
        if dense_stats is not None:
            for st, ex in zip(dense_stats, extras or [{}] * len(dense_stats), strict=True):
                st.extra.update(ex)
            scored = score(model, adapter, dense_stats, metric)
        else:
            scored, memory = score_layers(model, adapter, calib, metric, opts, progress, extras,
                                          keep_gram=comp.needs_gram and not two_pass)
            passes += 1
        keeps = allocation.allocate(scored.scores, spec.ratio, structure, spec.attn_unit, spec.round_to,
                                    standardized=metric.standardize and structure == "global")
        if not two_pass:
            prune_model(model, adapter, keeps, scored, comp)
            return PruneResult(keeps, memory, passes, structure)
    else:
        keeps = allocation.uniform_widths([adapter.shape(layer) for layer in layers], hidden, spec.ratio,
                                          spec.attn_unit, spec.round_to)
    final: list[LayerKeep] = []

    def visit(i, layer, st: LayerStats) -> bool:
        if extras is not None:
            st.extra.update(extras[i])
        cs = metric.fn(adapter, layer, st)
        ls = LayerScores(adapter.shape(layer), hidden, cs.attn.cpu(), cs.mlp.cpu())
        keep = allocation.select(ls, spec.attn_unit, keeps[i])
        fix = comp.fn(adapter, layer, keep, st)
        prune_layer(adapter, layer, keep, o_bias=fix.o_bias, down_bias=fix.down_bias,
                    o_weight=fix.o_weight, down_weight=fix.down_weight)
        final.append(keep)
        return True

    engine = LayerwiseEngine(model, adapter, calib, device=opts.device, batch_size=opts.batch_size,
                             gram=metric.needs_gram or comp.needs_gram, sample_rows=metric.sample_rows,
                             progress=progress, reference=comp.needs_reference)
    rep = engine.run(visit)
    passes += 1
    memory = {k: max(v, memory.get(k, 0.0)) for k, v in _memory(rep).items()}
    _update_config(model, final)
    return PruneResult(final, memory, passes, structure)


def resolve_structure(opts: Options, metric: metrics.Metric) -> str:
    return metric.default_structure if opts.structure == "auto" else opts.structure


@dataclass
class Prepared:
    """The inputs of a run after loading: the model, its adapter and the token windows."""

    loaded: object
    adapter: Adapter
    calib: torch.Tensor
    heldout: torch.Tensor
    validation: torch.Tensor | None = None  # token stream for searches: neither calibration nor held-out


def prepare(opts: Options, say=print) -> tuple[Prepared, dict]:
    from . import models

    t = {}
    t0 = time.perf_counter()
    loaded = models.load(opts.model, trust_remote_code=opts.trust_remote_code)
    adapter = adapter_for(loaded.model)
    t["load"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    tok = loaded.tokenizer
    builtin = calibration.load_source("builtin", tok)
    heldout = calibration.contiguous_chunks(builtin.region("test"), opts.seqlen, opts.eval_samples)
    if opts.calib == "builtin":
        src = builtin
    else:
        src = calibration.load_source(opts.calib, tok, model=loaded.model, n_tokens=opts.nsamples * opts.seqlen,
                                      seed=opts.seed)
    calib = calibration.sample_windows(src.region("calibration"), opts.nsamples, opts.seqlen, opts.seed)
    t["data"] = round(time.perf_counter() - t0, 3)
    return Prepared(loaded, adapter, calib, heldout, builtin.region("validation")), t


def run_search(model, adapter: Adapter, prep: Prepared, spec: PruneSpec, opts: Options, say=print) -> PruneResult:
    """`--search`: choose metric mixture, calibration subset and compensation on the validation
    region, then prune `model` with the best trial."""
    from .search import Search

    if opts.trials < 1:
        raise UserError("--trials must be at least 1.")
    val = calibration.contiguous_chunks(prep.validation, opts.seqlen, 8)
    searcher = Search(model, adapter, prep.calib, opts, say=say)
    found = searcher.run(val, spec.ratio, spec.round_to, trials=opts.trials, seed=opts.seed, attn_unit=spec.attn_unit)
    best = found.best
    say(f"search: best trial {best.number}, validation perplexity {best.val_ppl:.3f}")
    keeps = searcher.prune(model, best, spec.ratio, spec.round_to, spec.attn_unit)
    notes = {"search": {"best": best.__dict__, "trials": [t.__dict__ for t in found.trials],
                        "setup_s": round(found.setup_s, 1), "objective": "perplexity on the builtin validation region"}}
    return PruneResult(keeps, {}, 1, "global", notes)


def run(opts: Options, console=None) -> dict:
    """The whole job; returns the report (also written to OUT/report.json)."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from exporters import export_hf
    from profiles import load_profile
    from runtimes.accuracy import perplexity

    console = console or Console(stderr=True)
    stages = Stages()
    profile = load_profile(opts.profile)
    metric = metrics.get(opts.metric)
    comp = compensation.get(opts.compensation)
    structure = resolve_structure(opts, metric)
    if structure not in ("uniform", "global"):
        raise UserError(f"Unknown structure '{opts.structure}' (use uniform, global or auto).")
    ratio = opts.ratio  # None: the planner's choice, after loading
    if ratio is not None and not 0.0 < ratio < 1.0:
        raise UserError(f"The pruning ratio must be between 0 and 1 (exclusive), got {ratio}.")
    round_to = opts.round_to or profile.round_to
    if opts.out:
        check_out_dir(Path(opts.out))
    if opts.threads:
        torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    prep, t = prepare(opts)
    stages.seconds.update(t)
    plan = None
    if ratio is None:
        from .planner import plan_for_run

        with stages.timed("plan"):
            plan = plan_for_run(profile, opts.model, opts.attn_unit, round_to, say=console.print)
        ratio = plan.ratio
    out = Path(opts.out) if opts.out else Path("out") / f"{_model_slug(opts.model)}-{metric.name}-{int(ratio * 100)}"
    check_out_dir(out)

    console.print(
        f"[bold]plan[/]: profile [cyan]{profile.name}[/] ({profile.device.name}), remove {ratio:.0%} of decoder "
        f"weights, metric [cyan]{metric.name}[/], compensation [cyan]{comp.name}[/], structure [cyan]{structure}[/], "
        f"widths rounded to {round_to}, calibration {opts.nsamples} x {opts.seqlen} tokens from '{opts.calib}', "
        f"output {out}" + (f" (ratio from the plan: {plan.efficiency['source']})" if plan else " (ratio from --ratio)")
    )
    model, tok, adapter = prep.loaded.model, prep.loaded.tokenizer, prep.adapter
    before = count_params(model)

    with stages.timed("perplexity_dense"):
        ppl_dense = perplexity(model, prep.heldout)
    console.print(f"dense held-out perplexity: {ppl_dense:.3f}")
    if opts.checks:
        from . import checks

        task_dir = Path(tempfile.mkdtemp(prefix="fitprune-tasks-"))
        checks.write_tasks(task_dir, checks.heldout_text())
        with stages.timed("lm_eval"):
            tasks_dense = checks.task_scores(model, tok, task_dir, opts.device, say=console.print)

    n_layers = len(adapter.layers(model))
    spec = PruneSpec(metric=metric.name, compensation=comp.name, structure=structure, ratio=ratio,
                     attn_unit=opts.attn_unit, round_to=round_to)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} layers"),
                  TimeElapsedColumn(), console=console, transient=False) as bar:
        task = bar.add_task("calibrate + score + prune", total=n_layers)

        def progress(i, n):
            if i == 1 and bar.tasks[task].completed == n:  # second pass (greedy / least squares)
                bar.reset(task, total=n, description="greedy pass: prune + re-fit")
            bar.update(task, completed=i)

        with stages.timed("pruning_step"):
            if opts.search:
                result = run_search(model, adapter, prep, spec, opts, say=console.print)
            else:
                result = prune(model, adapter, prep.calib, spec, opts, progress=progress)
    keeps, mem = result.keeps, result.memory
    after = count_params(model)
    with stages.timed("perplexity_pruned"):
        ppl_pruned = perplexity(model, prep.heldout)
    console.print(f"pruned held-out perplexity: {ppl_pruned:.3f}")
    if opts.checks:
        with stages.timed("lm_eval"):
            tasks_pruned = checks.task_scores(model, tok, task_dir, opts.device, say=console.print)

    report = {
        "schema": REPORT_SCHEMA,
        "created_unix": int(time.time()),
        "model": prep.loaded.source,
        "profile": profile.name,
        "method": {
            "metric": "search" if opts.search else metric.name,
            "compensation": "search" if opts.search else comp.name, "structure": result.structure,
            "attn_unit": opts.attn_unit,
            "ratio_requested": ratio, "round_to": round_to, "calib": opts.calib, "nsamples": opts.nsamples,
            "seqlen": opts.seqlen, "seed": opts.seed, "passes": result.passes, **result.notes,
        },
        "params": {
            "before": before, "after": after,
            "achieved_ratio_decoder": round(1 - after["decoder"] / before["decoder"], 4),
            "achieved_ratio_total": round(1 - after["total"] / before["total"], 4),
        },
        "widths": {
            "q_heads": [len(k.q_heads) for k in keeps], "kv_heads": [len(k.kv_heads) for k in keeps],
            "intermediate": [len(k.channels) for k in keeps],
        },
        "perplexity": {
            "dense": round(ppl_dense, 4), "pruned": round(ppl_pruned, 4),
            "relative_increase": round(ppl_pruned / ppl_dense - 1, 4),
            "text": "builtin held-out region (last 20% of the pydoc topics token stream)",
            "windows": int(prep.heldout.shape[0]), "seqlen": int(prep.heldout.shape[1]), "measured": True,
            "device": opts.device,
        },
        "memory": {**mem, "what": "peak process RSS during calibration (and peak device memory on CUDA)"},
        "host": {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
                 "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
    }
    dtype = model.dtype if opts.export_dtype == "auto" else getattr(torch, opts.export_dtype)
    with atomic_dir(out) as tmp:
        with stages.timed("export"):
            res = export_hf(model, tok, tmp, dtype=dtype)
        report["export"] = {"format": res.format, "architecture": res.architecture, "dtype": str(dtype).replace(
            "torch.", ""), "files": res.files}
        report["plan"] = plan.as_dict() if plan else {"ratio_source": "--ratio"}
        if opts.checks:
            from .report import finish

            try:
                with stages.timed("checks"):
                    finish(report, tmp, profile, plan, prep, tasks_dense, tasks_pruned, say=console.print,
                           task_dir=task_dir if opts.lm_eval_backend == "vllm" else None)
            finally:
                shutil.rmtree(task_dir, ignore_errors=True)
        report["seconds"] = stages.seconds
        report["peak_rss_mib_total"] = round(peak_rss_mib(), 1)
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
        (tmp / "README.md").write_text(model_card(report))
        if opts.checks:
            from .report import markdown

            (tmp / "report.md").write_text(markdown(report))
    report["output"] = str(out)
    return report


def _model_slug(model: str | None) -> str:
    if not model:
        return "smollm2-135m"
    return Path(model.rstrip("/")).name.replace(".gguf", "").lower() or "model"


def model_card(r: dict) -> str:
    m, p, ppl = r["method"], r["params"], r["perplexity"]
    ppl_label = f"held-out perplexity ({ppl['windows']} x {ppl['seqlen']} tokens, {ppl['device']})"
    return f"""---
library_name: transformers
tags: [fitprune, structured-pruning]
---
# {Path(r['model']).name} pruned with fitprune

- Method: metric `{m['metric']}`, compensation `{m['compensation']}`, structure `{m['structure']}`,
  {m['ratio_requested']:.0%} of decoder weights requested, widths rounded to {m['round_to']}.
- Calibration: {m['nsamples']} x {m['seqlen']} tokens from `{m['calib']}`, seed {m['seed']}.
- Parameters: {p['before']['total']:,} -> {p['after']['total']:,} total; decoder {p['before']['decoder']:,} ->
  {p['after']['decoder']:,} ({p['achieved_ratio_decoder']:.1%} removed).
- Format: {r['export']['format']} (`{r['export']['architecture']}`, {r['export']['dtype']}).

## Measured
| | dense | pruned |
|---|---|---|
| {ppl_label} | {ppl['dense']:.3f} | {ppl['pruned']:.3f} |

Per-layer widths (query heads / KV heads / MLP channels): {r['widths']['q_heads']} / {r['widths']['kv_heads']} /
{r['widths']['intermediate']}.

## Load
```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("PATH")  # fitprune-format exports: add trust_remote_code=True
```
"""
