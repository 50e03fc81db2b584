"""The run's report: built from the stages' results (`build_report`), then, once the export is in
its folder, quantized (`quantize`), checked and written beside it (`finish_report`)."""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch

from ..config import RunConfig
from ..data import HELDOUT
from ..evaluate.lm_eval import Tasks
from ..prune.driver import PruneResult, PruneSpec
from ..report.schema import (
    Accuracy,
    Budget,
    CrossDomain,
    Export,
    Host,
    Latency,
    LayerWidths,
    Memory,
    Method,
    Params,
    Perplexity,
    PlanSection,
    Report,
)
from .stages import Prepared, Stages


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
                      nsamples=cfg.nsamples, seqlen=cfg.seqlen, seed=cfg.seed, passes=result.passes,
                      dtype=str(prep.loaded.model.dtype).replace("torch.", ""), **result.notes),
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
        host=Host(machine=platform.machine(), processor=platform.processor() or platform.machine(),
                  torch_threads=torch.get_num_threads(), torch=torch.__version__),
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
    from ..report.card import model_card
    from ..report.markdown import markdown

    report.export = Export(format=res.format, architecture=res.architecture,
                           dtype=str(dtype).replace("torch.", ""), files=res.files)
    report.plan = PlanSection(**(plan.as_dict() if plan else {"ratio_source": "--ratio"}))
    if cfg.checks:
        from ..evaluate.checks import check_export

        with stages.timed("checks"):
            latency, accuracy, budget = check_export(
                report.perplexity.model_dump(), folder, profile, plan, source, tasks, say=say, runtime=cfg.runtime)
            report.latency, report.accuracy, report.budget = Latency(**latency), Accuracy(**accuracy), Budget(**budget)
        from ..evaluate.perplexity import finite_scores

        finite_scores(report.accuracy.lm_eval, "lm-eval score")  # vLLM's scores of the export too
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
        from ..report.plot import plot

        plot(report, path)
    except ImportError:
        say("no plot: matplotlib is not installed (extra 'eval')")
        return None
    return path.name
