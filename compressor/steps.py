"""The steps the main job is made of, shared by the in-memory pipeline (`pipeline.run`) and the
out-of-core one (`outofcore.run_out_of_core`): stage timing and memory, the prepared inputs, the
ratio, the prune spec, the output directory, the announcement, the progress bar, the report."""

from __future__ import annotations

import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .config import RunConfig
from .data import HELDOUT, Texts
from .evaluate.lm_eval import Tasks
from .memory import StageMemory
from .model.adapters import Adapter
from .model.loading import LoadedModel
from .output import check_out_dir
from .prune import COMPENSATION, IMPORTANCE
from .prune.driver import PruneResult, PruneSpec, resolve_structure
from .report.schema import Budget, CrossDomain, Export, LayerWidths, Memory, Method, Params, Perplexity, Report


class Stages:
    """Seconds per stage, summed when a stage runs more than once, and each stage's peak memory."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.memory = StageMemory()

    @contextmanager
    def timed(self, name: str):
        t = time.perf_counter()
        self.memory.start()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t, 3)
            self.memory.stop(name)


@dataclass
class Prepared:
    """The inputs of a run after loading: the model, its adapter and the token windows."""

    loaded: LoadedModel
    adapter: Adapter
    texts: Texts
    domains: list = field(default_factory=list)  # data.Domain: evaluation text of other domains

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


def choose_ratio(cfg: RunConfig, profile, round_to: int, stages: Stages, say):
    """--ratio, or the planner's choice for the profile (then the plan is returned too)."""
    if cfg.ratio is not None:
        return None, cfg.ratio
    from .budget.planner import plan_for_run

    with stages.timed("plan"):
        plan = plan_for_run(profile, cfg.model, cfg.attn_unit, round_to, say=say)
    return plan, plan.ratio


def serving_precision(profile) -> str | None:
    """The autocast dtype in which lm-eval judges the in-memory models for a profile: bfloat16 where
    the profile serves bfloat16 (the precision the export will be served in; on CPUs with bfloat16
    instructions about twice as fast as float32), None (the model's own dtype) otherwise. What
    chooses or re-fits weights (statistics, the allocation search, compensation) and the
    perplexities stay in full precision (docs/benchmarks.md)."""
    return "bfloat16" if profile.dtype == "bfloat16" else None


def run_tasks(heldout_text: str, cfg: RunConfig, profile) -> Tasks:
    """The run's lm-eval tasks (disabled with --no-checks), scored in `serving_precision`."""
    return Tasks(heldout_text, cfg.checks, vllm=cfg.lm_eval_backend == "vllm", n_cloze=cfg.eval_items,
                 precision=serving_precision(profile))


def prune_spec(cfg: RunConfig, ratio: float, round_to: int, tensor_parallel: int = 1) -> PruneSpec:
    """`tensor_parallel`: the profile's (prune/tensor_parallel.py), which the widths must split over."""
    metric = IMPORTANCE.get(cfg.metric)
    comp = COMPENSATION.get(cfg.compensation)
    return PruneSpec(metric=metric.name, compensation=comp.name, structure=resolve_structure(cfg.structure, metric),
                     ratio=ratio, attn_unit=cfg.attn_unit, round_to=round_to, tensor_parallel=tensor_parallel)


# `--structure auto` of an in-memory run is the allocation search when it is affordable: on SmolLM2 at
# 20% removed its cross-domain perplexity increase is 48% of FLAP + bias's where global's is 58%, and at
# 50% 21% against 22% (`benchmarks/quality.py`). Its cost is ~30 generations x 7,168 validation tokens
# of forward passes: about 8 CPU minutes for SmolLM2-135M here, an hour for a 1B model on a CPU, and
# under a minute for an 8B model on a GPU. Larger models on a CPU keep the one-pass global allocation.
SEARCH_CPU_MAX_PARAMS = 400_000_000


def auto_structure(cfg: RunConfig, spec: PruneSpec, n_params: int, say) -> PruneSpec:
    """`--structure auto` with the metric's default global allocation becomes `searched` for an
    in-memory run on a GPU, or on a CPU for a model of at most SEARCH_CPU_MAX_PARAMS parameters, and
    says so. Left alone: an explicit --structure and --search (its own search). With --quantize the
    searched widths quantize too (per-layer exports; `quantizable` rounds them to a
    group-wise scheme's group)."""
    if cfg.structure != "auto" or spec.structure != "global" or cfg.search:
        return spec
    on_gpu = not cfg.device.startswith("cpu")
    if not on_gpu and n_params > SEARCH_CPU_MAX_PARAMS:
        say(f"structure [cyan]global[/]: the allocation search (--structure searched, better across domains) "
            f"would take too long for {n_params / 1e9:.1f}B parameters on a CPU")
        return spec
    say(f"structure [cyan]searched[/] (auto: the allocation search generalises best in benchmarks/quality.py; "
        f"{cfg.search_generations} generations; --structure global is the one-pass allocation)")
    return replace(spec, structure="searched")


def quantizable(cfg: RunConfig, spec: PruneSpec, say) -> PruneSpec:
    """With --quantize every structure quantizes (uniform exports in the family's own architecture,
    per-layer ones in fitprune's, whose vLLM plugin builds its layers with vLLM's quantization
    config). A group-wise scheme (one scale per group of input channels) needs every pruned MLP
    width to be a multiple of its group, so the MLP widths round to one, saying so."""
    from math import lcm

    from exporters.quantize import SCHEMES

    scheme = SCHEMES.get(cfg.quantize)
    if scheme is None or scheme.group_size is None or spec.round_to % scheme.group_size == 0:
        return spec
    round_to = lcm(spec.round_to, scheme.group_size)
    say(f"MLP widths round to [cyan]{round_to}[/] instead of {spec.round_to}: --quantize {cfg.quantize} scales "
        f"groups of {scheme.group_size} input channels")
    return replace(spec, round_to=round_to)


def output_dir(cfg: RunConfig, spec: PruneSpec, name: str | None = None) -> Path:
    """--out, or out/MODEL-METRIC-PERCENT (out/MODEL-NAME with `name`); refused now if it exists and
    is not empty."""
    if cfg.out:
        out = Path(cfg.out)
    else:
        slug = Path(cfg.model.rstrip("/")).name.replace(".gguf", "").lower() if cfg.model else "smollm2-135m"
        out = Path("out") / f"{slug or 'model'}-{name or f'{spec.metric}-{int(spec.ratio * 100)}'}"
        from .config import refuse_out_dir

        refuse_out_dir(out)  # the default one too: an unwritable working directory is refused before the work
    check_out_dir(out)
    return out


def lever_notes_and_refusals(frontier, profile, say) -> None:
    """Print the lever frontier's notes; an infeasible budget, or a dense model that already meets it,
    ends the run in one sentence."""
    from .budget.planner import InfeasibleBudget, NothingToPrune

    for n in frontier.notes:
        say(f"plan note: {n}")
    if not frontier.feasible:
        raise InfeasibleBudget(frontier.notes[-1] + " Pass --ratio to prune anyway.")
    if any(c.removed == 0 and c.fmt == "none" for c in frontier.candidates):
        raise NothingToPrune(f"The dense model already meets every budget line of profile '{profile.name}' (predicted "
                             f"from {frontier.latency_source}); nothing to prune, so nothing was written.")


class LeverPlan:
    """The lever frontier where the report and the checks expect a plan: it has no fitted cost model
    (`cost_fit`), so the checks measure the dense model themselves. `source`: how the run came to it."""

    cost_fit = None

    def __init__(self, frontier, source: str = "--levers"):
        self.frontier, self.source = frontier, source
        self.prediction = frontier.chosen.prediction  # the checks compare the measured export with this

    def as_dict(self) -> dict:
        return {"ratio_source": self.source, "predicted": True, **self.frontier.as_dict()}


def announce(cfg: RunConfig, profile, spec: PruneSpec, plan, out: Path, say) -> None:
    if spec.ratio == 0:  # a weight format alone
        say(f"[bold]plan[/]: profile [cyan]{profile.name}[/] ({profile.device.name}), every weight kept, quantized "
            f"to [cyan]{cfg.quantize}[/]; output {out}")
        return
    say(f"[bold]plan[/]: profile [cyan]{profile.name}[/] ({profile.device.name}), remove {spec.ratio:.0%} of decoder "
        f"weights, metric [cyan]{spec.metric}[/], compensation [cyan]{spec.compensation}[/], structure "
        f"[cyan]{spec.structure}[/], widths rounded to {spec.round_to}"
        + (f" and split for tensor parallel {spec.tensor_parallel}" if spec.tensor_parallel > 1 else "")
        + f", calibration {cfg.nsamples} x {cfg.seqlen} "
        f"tokens from '{cfg.calib}' on {cfg.device}, output {out}"
        + (" (ratio from --ratio)" if plan is None else f" (the lever plan: {plan.frontier.chosen.levers})"
           if isinstance(plan, LeverPlan) else f" (ratio from the plan: {plan.efficiency['source']})"))


@contextmanager
def layer_progress(console, layers: int):
    """A progress bar over the layers, restarted with the pass's name whenever the driver starts
    another pass; yields the `progress(pass_name, done, total)` callback the drivers call."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} layers"),
                  TimeElapsedColumn(), console=console, transient=False) as bar:
        task = bar.add_task("", total=layers, visible=False)

        def progress(pass_name: str, done: int, total: int) -> None:
            if bar.tasks[task].description != pass_name:  # the driver started another pass
                bar.reset(task, total=total, description=pass_name, visible=True)
            bar.update(task, completed=done)

        yield progress


def build_report(cfg: RunConfig, profile_name: str, prep: Prepared, spec: PruneSpec, result: PruneResult,
                 before: dict, ppl_dense: float, ppl_pruned: float, after: dict | None = None,
                 cross_domain: tuple[dict | None, dict | None] = (None, None)) -> Report:
    """The report of a run; `after` (parameter counts of the pruned model) defaults to the model in memory;
    `cross_domain`: `domain_perplexities` of the dense and the pruned model (None: not measured)."""
    model = prep.loaded.model
    after = after or prep.adapter.count_params(model)
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
                              device=cfg.device, cross_domain=_cross_domain(prep, *cross_domain)),
        memory=Memory(**result.memory, what="peak host RSS during the pruning step (calibration, scoring, pruning, "
                                            "compensation), and peak device memory on CUDA"),
        host={"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
              "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
    )


def _cross_domain(prep: Prepared, dense: dict | None, pruned: dict | None) -> CrossDomain | None:
    if not dense or not pruned:
        return None
    described = {d.name: d for d in prep.domains}
    return CrossDomain(
        dense=round(dense["geomean"], 4), pruned=round(pruned["geomean"], 4),
        relative_increase=round(pruned["geomean"] / dense["geomean"] - 1, 4),
        domains={k: {"dense": round(v, 4), "pruned": round(pruned["domains"][k], 4),
                     "description": described[k].description} for k, v in dense["domains"].items()},
        windows=int(prep.domains[0].windows.shape[0]), seqlen=int(prep.domains[0].windows.shape[1]))


def quantize(folder: Path, res, cfg: RunConfig, stages: Stages, say, done: dict | None = None) -> dict | None:
    """--quantize: the export in `folder` becomes a compressed-tensors checkpoint (stage "quantize"),
    one decoder layer in memory at a time, so out-of-core runs quantize too; `res` (the export's
    ExportResult) then names the scheme and the new weight files. Returns what the report records
    (None without --quantize); `done`: that record of a quantization already made (a resumed run)."""
    if cfg.quantize == "none":
        return None
    q = done
    if q is None:
        from exporters.quantize import quantize_export

        with stages.timed("quantize"):
            q = quantize_export(folder, cfg.quantize)
    res.format = f"{res.format} + compressed-tensors {q['scheme']} ({q['format']})"
    res.files = [*(f for f in res.files if not f.endswith((".safetensors", ".safetensors.index.json"))), *q["files"]]
    say(f"quantized the export: {q['scheme']} ({q['what']}), {q['method']}, with {q['library']}")
    return q


def finish_report(report: Report, folder: Path, res, dtype, source: str, profile, plan, tasks: Tasks,
                  cfg: RunConfig, stages: Stages, say) -> None:
    """After the export is in `folder`: check it (latency, accuracy, verdict, plot) and write
    report.json, the model card and report.md beside it."""
    from .report.card import model_card
    from .report.markdown import markdown

    report.export = Export(format=res.format, architecture=res.architecture,
                           dtype=str(dtype).replace("torch.", ""), files=res.files)
    report.plan = plan.as_dict() if plan else {"ratio_source": "--ratio"}
    if cfg.checks:
        from .evaluate.checks import check_export

        with stages.timed("checks"):
            report.latency, report.accuracy, budget = check_export(
                report.perplexity.model_dump(), folder, profile, plan, source, tasks, say=say, runtime=cfg.runtime)
            report.budget = Budget(**budget)
        from .evaluate.perplexity import finite_scores

        finite_scores((report.accuracy or {}).get("lm_eval"), "lm-eval score")  # vLLM's scores of the export too
        report.plot = _plot(report, folder / "report.png", say)
        tasks.keep_log(folder)
    report.seconds = stages.seconds
    report.memory.stages, report.memory.stages_what = stages.memory.peaks, stages.memory.what()
    # the process's peak: the stages' peaks (each stage resets the kernel's high-water mark, which
    # getrusage reads too), or getrusage where the kernel could not reset it
    report.peak_rss_mib_total = round(max([_process_peak_mib()]
                                          + [v["peak_rss_mib"] for v in stages.memory.peaks.values()]), 1)
    (folder / "report.json").write_text(report.to_json())
    (folder / "README.md").write_text(model_card(report))
    if cfg.checks:
        (folder / "report.md").write_text(markdown(report))


def _process_peak_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _plot(report: Report, path: Path, say) -> str | None:
    try:
        from .report.plot import plot

        plot(report, path)
    except ImportError:
        say("no plot: matplotlib is not installed (extra 'eval')")
        return None
    return path.name
