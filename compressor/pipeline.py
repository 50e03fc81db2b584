"""The main job as its data flow: load -> plan -> evaluate the dense model -> calibrate + score +
allocate + prune + compensate -> evaluate the pruned model -> export -> check -> report. Each
stage lives in its own package; this module only calls them in order, times them and writes the
output directory atomically."""

from __future__ import annotations

import gc
import shutil
from dataclasses import replace
from pathlib import Path

import torch

from . import outofcore
from .config import RunConfig
from .data import domain_windows, load_texts
from .errors import UserError
from .evaluate.lm_eval import Tasks
from .evaluate.perplexity import domain_perplexities, finite, finite_scores, perplexity
from .model import adapter_for
from .model.loading import load
from .output import atomic_dir
from .prune.driver import PruneResult, PruneSpec, prune
from .prune.tensor_parallel import tensor_parallel_size
from .report.schema import Report
from .steps import (
    LeverPlan,
    Prepared,
    Stages,
    announce,
    auto_structure,
    build_report,
    choose_ratio,
    finish_report,
    layer_progress,
    lever_notes_and_refusals,
    output_dir,
    prune_spec,
    quantizable,
    quantize,
    run_tasks,
)


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
        domains = domain_windows(loaded.tokenizer, cfg.seqlen, cfg.domain_windows) if cfg.domain_windows else []
    return Prepared(loaded, adapter, texts, domains)


def run(cfg: RunConfig, console=None) -> Report:
    """The whole job; returns the report (also written to OUT/report.json)."""
    from rich.console import Console

    console = console or Console(stderr=True)
    say = console.print
    stages = Stages()
    profile = run_profile(cfg, say)
    round_to = cfg.round_to or profile.round_to
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    if cfg.quantize != "none":
        from exporters.quantize import refuse_for_profile

        refuse_for_profile(cfg.quantize, profile)  # a format the device has no kernel for, before any work
    if cfg.quantize_only:
        refuse_pruning_options(cfg)
    if cfg.levers:
        refuse_levers(cfg)
    refuse_recovery(cfg)
    in_core = not outofcore.choose(cfg, say)
    if not in_core:
        return outofcore.run_out_of_core(cfg, profile, round_to, stages, console)
    prep = prepare(cfg, stages)
    if cfg.plans_levers:
        return run_levers(cfg, profile, round_to, prep, stages, console)
    if cfg.quantize_only:
        return run_quantize_only(cfg, profile, round_to, prep, stages, console)
    plan, ratio = choose_ratio(cfg, profile, round_to, stages, say)
    spec = prune_spec(cfg, ratio, round_to, tensor_parallel_size(profile))
    spec = quantizable(cfg, auto_structure(cfg, spec, prep.adapter.count_params(prep.loaded.model)["total"], say), say)
    out = output_dir(cfg, spec)
    announce(cfg, profile, spec, plan, out, say)
    model, tok = prep.loaded.model, prep.loaded.tokenizer
    before = prep.adapter.count_params(model)
    with run_tasks(prep.texts.heldout_text, cfg, profile) as tasks:
        ppl_dense, domains_dense = evaluate_model("dense", model, tok, prep, tasks, cfg, stages, say)
        targets = teacher_stage(prep, cfg, stages, say)
        result = prune_stage(prep, spec, cfg, stages, console)
        recovery = recover_stage(prep, targets, cfg, stages, say)
        ppl_pruned, domains_pruned = evaluate_model("pruned", model, tok, prep, tasks, cfg, stages, say)
        report = build_report(cfg, profile.name, prep, spec, result, before, ppl_dense, ppl_pruned,
                              cross_domain=(domains_dense, domains_pruned))
        report.recovery = recovery
        write_output(report, out, prep, profile, plan, tasks, cfg, stages, say)
    return report


def run_profile(cfg: RunConfig, say):
    """The run's profile: --profile (auto: this host's), with the budget lines the command line gives."""
    from profiles import load_profile
    from profiles.auto import resolve
    from profiles.schema import with_budget

    profile, changed = with_budget(load_profile(resolve(cfg.profile, say)), cfg.memory_gib, cfg.ttft_ms, cfg.tpot_ms,
                                   cfg.throughput)
    if changed:
        say(f"budget from the command line: {', '.join(changed)}")
    return profile


def refuse_pruning_options(cfg: RunConfig) -> None:
    """--quantize without --ratio quantizes only: options that shape a pruning would be ignored."""
    for given, name in ((cfg.structure != "auto", "--structure"), (cfg.search, "--search"),
                        (cfg.metric != "auto", "--metric"), (cfg.compensation != "auto", "--compensation")):
        if given:
            raise UserError(f"--quantize {cfg.quantize} without --ratio quantizes the dense model only; {name} "
                            "shapes a pruning, so pass --ratio R too (or drop it).")


def refuse_recovery(cfg: RunConfig) -> None:
    """--recover-tokens runs after a pruning (--ratio, the width-only plan or the lever plan; in memory
    or out of core); with nothing to recover it is refused before any work."""
    if cfg.recover_lora and not cfg.recover_tokens:
        raise UserError(f"--recover-lora {cfg.recover_lora} shapes a recovery: pass --recover-tokens N too "
                        "(or drop it).")
    if not cfg.recover_tokens:
        return
    if cfg.quantize_only:
        raise UserError(f"--recover-tokens runs after a pruning, and --quantize {cfg.quantize} without --ratio prunes "
                        "nothing: pass --ratio R too (or drop --recover-tokens).")


def teacher_stage(prep: Prepared, cfg: RunConfig, stages: Stages, say):
    """With --recover-tokens: the recovery text and the dense model's top-k targets on it (stage
    recover_teacher), before pruning changes the model; else None."""
    if not cfg.recover_tokens:
        return None
    from .recover.distill import recovery_windows, teacher_targets

    with stages.timed("recover_teacher"):
        n = max(4, min(256, -(-cfg.recover_tokens // cfg.seqlen)))  # unique windows: the budget's, at most 256
        windows = recovery_windows(cfg.calib, prep.loaded.tokenizer, prep.loaded.model, n, cfg.seqlen, cfg.seed)
        targets = teacher_targets(prep.loaded.model, windows)
    say(f"recovery text: {n} windows of {cfg.seqlen} tokens (the calibration sources and the dense model's own "
        "samples); the dense model's top-32 next-token log-probabilities kept")
    return targets


def recover_stage(prep: Prepared, targets, cfg: RunConfig, stages: Stages, say) -> dict | None:
    """With targets: the pruned model's perplexities before recovery, then `distill` in place (stage
    recover); the report's recovery section. None without."""
    if targets is None:
        return None
    from .recover.distill import distill

    model = prep.loaded.model
    with stages.timed("perplexity_before_recovery"):
        held, cross = perplexities("pruned, before recovery,", model, prep, say)
    with stages.timed("recover"):
        res = distill(model, targets, cfg.recover_tokens, lora_rank=cfg.recover_lora,
                      decoder_layers=prep.adapter.layers(model), say=say, seed=cfg.seed)
    say(f"recovery: {res.tokens:,} tokens in {res.seconds:.0f} s ({res.mode}), KL to the dense model "
        f"{res.loss_first:.4f} -> {res.loss_last:.4f}")
    return {**res.as_dict(), "tokens_requested": cfg.recover_tokens, "unique_tokens": int(targets.windows.numel()),
            "text": "the calibration sources' calibration region and the dense model's own samples, half each",
            "before": {"heldout_perplexity": round(held, 4),
                       "cross_domain_perplexity": round(cross["geomean"], 4) if cross else None,
                       "device": cfg.device}}


def run_quantize_only(cfg: RunConfig, profile, round_to: int, prep: Prepared, stages: Stages, console) -> Report:
    """`--quantize F` without `--ratio`: every weight kept, the export quantized to F and measured
    like any other run; the pruned model's figures are the quantized model's (compressed-tensors'
    fake quantization in torch, as the lever plan judges a weight format)."""
    from .prune.planned import fake_quantized
    from .prune.surgery import LayerKeep

    say = console.print
    model, tok, adapter = prep.loaded.model, prep.loaded.tokenizer, prep.adapter
    spec = replace(prune_spec(cfg, 0.0, round_to, tensor_parallel_size(profile)), structure="none")
    out = output_dir(cfg, spec, name=cfg.quantize)
    say(f"[bold]plan[/]: profile [cyan]{profile.name}[/] ({profile.device.name}), no pruning: the export is quantized "
        f"to [cyan]{cfg.quantize}[/] (--quantize without --ratio), output {out}")
    shapes = [adapter.shape(layer) for layer in adapter.layers(model)]
    keeps = [LayerKeep(list(range(s.num_heads)), list(range(s.num_kv_heads)), list(range(s.intermediate_size)))
             for s in shapes]
    result = PruneResult(keeps, {}, 0, "none (quantize only)", notes={"quantize_only": cfg.quantize})
    before = adapter.count_params(model)
    with run_tasks(prep.texts.heldout_text, cfg, profile) as tasks:
        ppl_dense, domains_dense = evaluate_model("dense", model, tok, prep, tasks, cfg, stages, say)
        judged = fake_quantized(model, cfg.quantize)
        ppl_pruned, domains_pruned = evaluate_model("pruned", judged, tok, prep, tasks, cfg, stages, say)
        del judged
        gc.collect()  # the quantized copy is cyclic garbage (its hooks refer to it)
        report = build_report(cfg, profile.name, prep, spec, result, before, ppl_dense, ppl_pruned,
                              cross_domain=(domains_dense, domains_pruned))
        write_output(report, out, prep, profile, QuantizeOnly(cfg.quantize), tasks, cfg, stages, say)
    return report


class QuantizeOnly:
    """The plan of a quantize-only run where the report and the checks expect one: no fitted cost
    model, so the checks measure the dense model themselves."""

    cost_fit = None
    prediction = None

    def __init__(self, fmt: str):
        self.fmt = fmt

    def as_dict(self) -> dict:
        return {"ratio_source": f"--quantize {self.fmt} without --ratio: no pruning, quantization only"}


def refuse_levers(cfg: RunConfig) -> None:
    """--levers chooses the ratio, structure and format itself."""
    for given, name in ((cfg.ratio is not None, "--ratio"), (cfg.quantize != "none", "--quantize"),
                        (cfg.structure != "auto", "--structure"), (cfg.search, "--search")):
        if given:
            raise UserError(f"--levers chooses the width, the layers dropped and the weight format itself; drop "
                            f"{name}.")


def run_levers(cfg: RunConfig, profile, round_to: int, prep: Prepared, stages: Stages, console) -> Report:
    """The main job with every lever: price the frontier (budget/frontier.py), measure each
    candidate's KL on the weights (prune/planned.py), prune to the least-KL one that meets the budget
    (a choice inside the latency reserve only once its export, measured, meets the lines:
    budget/confirm.py), export it in its weight format, and measure it like any other run."""
    from . import tempdirs

    dense_dir = tempdirs.make("fitprune-dense-")  # the dense export, measured at planning and beside a marginal plan
    try:
        return _run_levers(cfg, profile, round_to, prep, stages, console, dense_dir)
    finally:
        shutil.rmtree(dense_dir, ignore_errors=True)


def _run_levers(cfg: RunConfig, profile, round_to: int, prep: Prepared, stages: Stages, console,
                dense_dir: Path) -> Report:
    from .budget.confirm import confirm_choice
    from .budget.frontier import lever_plan
    from .budget.planner import InfeasibleBudget
    from .prune.planned import PlanQuality, estimate, fake_quantized, kl_text

    say = console.print
    anchor: dict = {}  # the dense export's runtime and (TTFT s, TPOT s), measured at planning

    def measure_dense(runtime: str) -> tuple[float, float]:
        """The dense model in memory, exported in the profile's dtype and measured at batch 1."""
        from exporters import export_hf

        from .budget.device import measure_batch1, open_runtime

        export_hf(prep.loaded.model, prep.loaded.tokenizer, dense_dir, dtype=getattr(torch, profile.dtype))
        threads = profile.device.threads if profile.device.kind == "cpu" else None
        w = profile.workload
        with open_runtime(runtime, dense_dir, profile.dtype, threads) as rt:
            m = measure_batch1(rt, w.prompt_tokens, w.output_tokens, 5)
        anchor.update(runtime=runtime, latency=(m.ttft_s, m.tpot_s))
        return m.ttft_s, m.tpot_s

    with stages.timed("plan"):
        frontier, _ = lever_plan(profile, cfg.model, attn_unit=cfg.attn_unit, round_to=round_to, say=say,
                                 measure_dense=measure_dense, compensation=cfg.compensation)
    lever_notes_and_refusals(frontier, profile, say)
    spec = replace(prune_spec(cfg, 0.0, round_to, tensor_parallel_size(profile)), structure="uniform")
    model, tok = prep.loaded.model, prep.loaded.tokenizer
    before = prep.adapter.count_params(model)
    with run_tasks(prep.texts.heldout_text, cfg, profile) as tasks:
        ppl_dense, domains_dense = evaluate_model("dense", model, tok, prep, tasks, cfg, stages, say)
        targets = teacher_stage(prep, cfg, stages, say)  # ranked by their damage before recovery, then recovered
        with stages.timed("pruning_step"):
            kl_ids = kl_text("self", model, tok, prep.validation, 8 * 256, cfg.seed)
            quality = PlanQuality(model, prep.adapter, prep.calib, prep.validation, spec, cfg.compute, say=say,
                                  kl_ids=kl_ids, kl_on="text the dense model generated itself")
            estimate(quality, frontier, say=say)
            chosen = frontier.choose()
            if chosen is not None and chosen.marginal:  # inside the reserve: kept only if its export meets the lines
                chosen = confirm_choice(frontier, lambda c: quality.pruned_copy(c.width, c.dropped, c.bias_free), tok,
                                        dense_dir, anchor["latency"], profile, anchor["runtime"], say=say)
            if chosen is None:  # the best candidates missed the budget when measured (exact shapes, or the export)
                quality.close()
                raise InfeasibleBudget(frontier.notes[-1] + " Pass --ratio to prune anyway.")
            say(f"[bold]plan[/]: {chosen.levers}, {chosen.removed:.1%} of decoder weights removed, predicted TPOT "
                f"{chosen.prediction.tpot_s * 1e3:.2f} ms, TTFT {chosen.prediction.ttft_s * 1e3:.1f} ms "
                f"({frontier.rule}; latency {frontier.latency_source})")
            result = quality.prune(chosen.width, chosen.dropped, chosen.bias_free)
            result.notes["levers"] = {"chosen": chosen.levers, "format": chosen.fmt, "rule": frontier.rule}
        if targets is not None and not chosen.removed:
            say("recovery: skipped, the plan removes no weight (its format alone meets the budget)")
            targets = None
        recovery = recover_stage(prep, targets, cfg, stages, say)
        spec = replace(spec, ratio=round(chosen.removed, 4), compensation=quality.compensation(chosen.bias_free).name)
        cfg = cfg.model_copy(update={"quantize": chosen.fmt})
        out = output_dir(cfg, spec)
        # the plan's quality with its weight format: compressed-tensors' own fake quantization in torch
        judged = model if chosen.fmt == "none" else fake_quantized(model, chosen.fmt)
        ppl_pruned, domains_pruned = evaluate_model("pruned", judged, tok, prep, tasks, cfg, stages, say)
        del judged
        gc.collect()  # the quantized copy is cyclic garbage (its hooks refer to it)
        report = build_report(cfg, profile.name, prep, spec, result, before, ppl_dense, ppl_pruned,
                              cross_domain=(domains_dense, domains_pruned))
        report.recovery = recovery
        write_output(report, out, prep, profile, LeverPlan(frontier, "every lever"), tasks, cfg, stages, say)
    return report


def evaluate_model(which: str, model, tok, prep: Prepared, tasks: Tasks, cfg: RunConfig, stages: Stages,
                   say) -> tuple[float, dict | None]:
    """In-domain held-out perplexity and cross-domain perplexity (stage perplexity_WHICH) and the
    lm-eval tasks (stage lm_eval) of the model in memory: (held-out perplexity, cross-domain figures or None)."""
    with stages.timed(f"perplexity_{which}"):
        ppl, cross = perplexities(which, model, prep, say)
    with stages.timed("lm_eval"):
        tasks.score(which, model, tok, cfg.device, say=say)
    finite_scores(getattr(tasks, which, None), f"{which} model's lm-eval score")
    return ppl, cross


def perplexities(which: str, model, prep: Prepared, say) -> tuple[float, dict | None]:
    """In-domain held-out perplexity and cross-domain perplexity of the model in memory, said and
    checked finite: (held-out perplexity, `domain_perplexities` or None)."""
    ppl = finite(perplexity(model, prep.heldout), f"{which} held-out perplexity")
    cross = domain_perplexities(model, prep.domains) if prep.domains else None
    say(f"{which} held-out perplexity (in-domain): {ppl:.3f}")
    if cross:
        finite(cross["geomean"], f"{which} cross-domain perplexity")
        each = ", ".join(f"{k} {v:.2f}" for k, v in cross["domains"].items())
        say(f"{which} cross-domain perplexity: {cross['geomean']:.3f} (geometric mean; {each})")
    return ppl, cross


def prune_stage(prep: Prepared, spec: PruneSpec, cfg: RunConfig, stages: Stages, console) -> PruneResult:
    """Calibrate, score, allocate, prune and compensate the model in place (or search first)."""
    model, adapter = prep.loaded.model, prep.adapter
    with layer_progress(console, len(adapter.layers(model))) as progress, stages.timed("pruning_step"):
        if cfg.search:
            from .prune.search import run_search

            return run_search(model, adapter, prep.calib, prep.validation, spec, cfg, perplexity, say=console.print)
        if spec.structure == "depth":
            from .prune.depth import prune_depth

            return prune_depth(model, adapter, prep.calib, spec, cfg.compute, say=console.print, blocks=cfg.blocks)
        if spec.structure == "searched":
            from .prune.evolve import prune_searched

            return prune_searched(model, adapter, prep.calib, prep.validation, spec, cfg.compute, say=console.print,
                                  progress=progress, generations=cfg.search_generations, seed=cfg.seed)
        return prune(model, adapter, prep.calib, spec, cfg.compute, progress=progress, say=console.print,
                     passes=cfg.passes)


def write_output(report: Report, out: Path, prep: Prepared, profile, plan, tasks: Tasks, cfg: RunConfig,
                 stages: Stages, say) -> None:
    """Export, check (latency, accuracy, verdict, plot) and write the report files, all into a
    temporary sibling of `out` renamed into place only when complete."""
    from exporters import export_hf

    model, tok = prep.loaded.model, prep.loaded.tokenizer
    dtype = model.dtype if cfg.export_dtype == "auto" else getattr(torch, cfg.export_dtype)
    with atomic_dir(out) as tmp:
        with stages.timed("export"):
            res = export_hf(model, tok, tmp, dtype=dtype)
        quantize(tmp, res, cfg, stages, say)  # before the checks: latency and accuracy are the quantized model's
        finish_report(report, tmp, res, dtype, prep.loaded.source, profile, plan, tasks, cfg, stages, say)
    report.output = str(out)


__all__ = ["Prepared", "RunConfig", "Stages", "prepare", "run", "write_output"]
