"""The main job as its data flow: load -> plan -> evaluate the dense model -> calibrate + score +
allocate + prune + compensate -> evaluate the pruned model -> export -> check -> report. Each
stage lives in its own package; this module only calls them in order, times them and writes the
output directory atomically."""

from __future__ import annotations

import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import RunConfig
from .data import HELDOUT, Texts, load_texts
from .evaluate.lm_eval import Tasks
from .evaluate.perplexity import perplexity
from .model import adapter_for
from .model.adapters import Adapter
from .model.loading import LoadedModel, load
from .output import atomic_dir, check_out_dir
from .prune import COMPENSATION, IMPORTANCE
from .prune.driver import PruneResult, PruneSpec, prune, resolve_structure
from .prune.engine import peak_rss_mib
from .report.schema import Export, LayerWidths, Memory, Method, Params, Perplexity, Report


class Stages:
    """Seconds per stage, summed when a stage runs more than once."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def timed(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t, 3)


@dataclass
class Prepared:
    """The inputs of a run after loading: the model, its adapter and the token windows."""

    loaded: LoadedModel
    adapter: Adapter
    texts: Texts

    # the windows under the names the benchmarks and tests use
    @property
    def calib(self) -> torch.Tensor:
        return self.texts.calib

    @property
    def heldout(self) -> torch.Tensor:
        return self.texts.heldout

    @property
    def validation(self) -> torch.Tensor:
        return self.texts.validation


def prepare(cfg: RunConfig, stages: Stages | None = None) -> Prepared:
    """Load the model (stage "load") and its calibration and held-out text (stage "data")."""
    stages = stages or Stages()
    with stages.timed("load"):
        loaded = load(cfg.model, trust_remote_code=cfg.trust_remote_code)
        adapter = adapter_for(loaded.model)
        cfg.check_model(loaded.model.config)
    with stages.timed("data"):
        texts = load_texts(cfg.calib, loaded.tokenizer, loaded.model, cfg.nsamples, cfg.seqlen, cfg.eval_samples,
                           cfg.seed)
    return Prepared(loaded, adapter, texts)


def run(cfg: RunConfig, console=None) -> Report:
    """The whole job; returns the report (also written to OUT/report.json)."""
    from rich.console import Console

    from profiles import load_profile

    console = console or Console(stderr=True)
    say = console.print
    stages = Stages()
    profile = load_profile(cfg.profile)
    round_to = cfg.round_to or profile.round_to
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    prep = prepare(cfg, stages)
    plan, ratio = choose_ratio(cfg, profile, round_to, stages, say)
    spec = prune_spec(cfg, ratio, round_to)
    out = output_dir(cfg, spec)
    announce(cfg, profile, spec, plan, out, say)
    model, tok = prep.loaded.model, prep.loaded.tokenizer
    before = prep.adapter.count_params(model)
    with Tasks(prep.texts.heldout_text, cfg.checks, vllm=cfg.lm_eval_backend == "vllm") as tasks:
        ppl_dense = evaluate_model("dense", model, tok, prep, tasks, cfg, stages, say)
        result = prune_stage(prep, spec, cfg, stages, console)
        ppl_pruned = evaluate_model("pruned", model, tok, prep, tasks, cfg, stages, say)
        report = build_report(cfg, profile.name, prep, spec, result, before, ppl_dense, ppl_pruned)
        write_output(report, out, prep, profile, plan, tasks, cfg, stages, say)
    return report


def choose_ratio(cfg: RunConfig, profile, round_to: int, stages: Stages, say):
    """--ratio, or the planner's choice for the profile (then the plan is returned too)."""
    if cfg.ratio is not None:
        return None, cfg.ratio
    from .budget.planner import plan_for_run

    with stages.timed("plan"):
        plan = plan_for_run(profile, cfg.model, cfg.attn_unit, round_to, say=say)
    return plan, plan.ratio


def prune_spec(cfg: RunConfig, ratio: float, round_to: int) -> PruneSpec:
    metric = IMPORTANCE.get(cfg.metric)
    comp = COMPENSATION.get(cfg.compensation)
    return PruneSpec(metric=metric.name, compensation=comp.name, structure=resolve_structure(cfg.structure, metric),
                     ratio=ratio, attn_unit=cfg.attn_unit, round_to=round_to)


def output_dir(cfg: RunConfig, spec: PruneSpec) -> Path:
    """--out, or out/MODEL-METRIC-PERCENT; refused now if it exists and is not empty."""
    if cfg.out:
        out = Path(cfg.out)
    else:
        slug = Path(cfg.model.rstrip("/")).name.replace(".gguf", "").lower() if cfg.model else "smollm2-135m"
        out = Path("out") / f"{slug or 'model'}-{spec.metric}-{int(spec.ratio * 100)}"
    check_out_dir(out)
    return out


def announce(cfg: RunConfig, profile, spec: PruneSpec, plan, out: Path, say) -> None:
    say(f"[bold]plan[/]: profile [cyan]{profile.name}[/] ({profile.device.name}), remove {spec.ratio:.0%} of decoder "
        f"weights, metric [cyan]{spec.metric}[/], compensation [cyan]{spec.compensation}[/], structure "
        f"[cyan]{spec.structure}[/], widths rounded to {spec.round_to}, calibration {cfg.nsamples} x {cfg.seqlen} "
        f"tokens from '{cfg.calib}', output {out}"
        + (f" (ratio from the plan: {plan.efficiency['source']})" if plan else " (ratio from --ratio)"))


def evaluate_model(which: str, model, tok, prep: Prepared, tasks: Tasks, cfg: RunConfig, stages: Stages,
                   say) -> float:
    """Held-out perplexity (stage perplexity_WHICH) and the lm-eval tasks (stage lm_eval) of the model in memory."""
    with stages.timed(f"perplexity_{which}"):
        ppl = perplexity(model, prep.heldout)
    say(f"{which} held-out perplexity: {ppl:.3f}")
    with stages.timed("lm_eval"):
        tasks.score(which, model, tok, cfg.device, say=say)
    return ppl


def prune_stage(prep: Prepared, spec: PruneSpec, cfg: RunConfig, stages: Stages, console) -> PruneResult:
    """Calibrate, score, allocate, prune and compensate the model in place (or search first)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    model, adapter = prep.loaded.model, prep.adapter
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} layers"),
                  TimeElapsedColumn(), console=console, transient=False) as bar:
        task = bar.add_task("", total=len(adapter.layers(model)), visible=False)

        def progress(pass_name: str, done: int, total: int) -> None:
            if bar.tasks[task].description != pass_name:  # the driver started another pass
                bar.reset(task, total=total, description=pass_name, visible=True)
            bar.update(task, completed=done)

        with stages.timed("pruning_step"):
            if cfg.search:
                from .prune.search import run_search

                return run_search(model, adapter, prep.calib, prep.validation, spec, cfg, say=console.print)
            return prune(model, adapter, prep.calib, spec, cfg.compute, progress=progress)


def build_report(cfg: RunConfig, profile_name: str, prep: Prepared, spec: PruneSpec, result: PruneResult,
                 before: dict, ppl_dense: float, ppl_pruned: float) -> Report:
    model = prep.loaded.model
    after = prep.adapter.count_params(model)
    return Report(
        created_unix=int(time.time()), model=prep.loaded.source, profile=profile_name,
        method=Method(metric="search" if cfg.search else spec.metric,
                      compensation="search" if cfg.search else spec.compensation, structure=result.structure,
                      attn_unit=cfg.attn_unit, ratio_requested=spec.ratio, round_to=spec.round_to, calib=cfg.calib,
                      nsamples=cfg.nsamples, seqlen=cfg.seqlen, seed=cfg.seed, passes=result.passes, **result.notes),
        params=Params(before=before, after=after,
                      achieved_ratio_decoder=round(1 - after["decoder"] / before["decoder"], 4),
                      achieved_ratio_total=round(1 - after["total"] / before["total"], 4)),
        widths=LayerWidths(q_heads=[len(k.q_heads) for k in result.keeps],
                           kv_heads=[len(k.kv_heads) for k in result.keeps],
                           intermediate=[len(k.channels) for k in result.keeps]),
        perplexity=Perplexity(dense=round(ppl_dense, 4), pruned=round(ppl_pruned, 4),
                              relative_increase=round(ppl_pruned / ppl_dense - 1, 4), text=HELDOUT,
                              windows=int(prep.heldout.shape[0]), seqlen=int(prep.heldout.shape[1]), measured=True,
                              device=cfg.device),
        memory=Memory(**result.memory, what="peak process RSS during calibration (and peak device memory on CUDA)"),
        host={"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
              "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
    )


def write_output(report: Report, out: Path, prep: Prepared, profile, plan, tasks: Tasks, cfg: RunConfig,
                 stages: Stages, say) -> None:
    """Export, check (latency, accuracy, verdict, plot) and write the report files, all into a
    temporary sibling of `out` renamed into place only when complete."""
    from exporters import export_hf

    from .report.card import model_card
    from .report.markdown import markdown

    model, tok = prep.loaded.model, prep.loaded.tokenizer
    dtype = model.dtype if cfg.export_dtype == "auto" else getattr(torch, cfg.export_dtype)
    with atomic_dir(out) as tmp:
        with stages.timed("export"):
            res = export_hf(model, tok, tmp, dtype=dtype)
        report.export = Export(format=res.format, architecture=res.architecture,
                               dtype=str(dtype).replace("torch.", ""), files=res.files)
        report.plan = plan.as_dict() if plan else {"ratio_source": "--ratio"}
        if cfg.checks:
            from .evaluate.checks import check_export

            with stages.timed("checks"):
                check_export(report, tmp, profile, plan, prep.loaded.source, tasks, say=say)
            report.plot = _plot(report, tmp / "report.png", say)
        report.seconds = stages.seconds
        report.peak_rss_mib_total = round(peak_rss_mib(), 1)
        (tmp / "report.json").write_text(report.to_json())
        (tmp / "README.md").write_text(model_card(report))
        if cfg.checks:
            (tmp / "report.md").write_text(markdown(report))
    report.output = str(out)


def _plot(report: Report, path: Path, say) -> str | None:
    try:
        from .report.plot import plot

        plot(report, path)
    except ImportError:
        say("no plot: matplotlib is not installed (extra 'eval')")
        return None
    return path.name


__all__ = ["Prepared", "RunConfig", "Stages", "prepare", "run"]
