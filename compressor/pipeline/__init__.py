"""The main job, one data flow for every model size and every way of asking:

load -> plan -> evaluate the dense model -> (teacher targets) -> prune -> (recover) -> evaluate the
pruned model in its weight format -> export -> quantize -> check -> report.

Where the weights live is the only fork: `Resident` (the model in memory) or `Streamed` (the
checkpoint's files, one layer in memory at a time, resumable), both with the same stages. How much
to prune and in which format is the plan's strategy (`plan.plan_run`). This module only calls the
stages in order."""

from __future__ import annotations

import torch

from ..config import RunConfig
from ..errors import UserError
from ..report.schema import Recovery, Report
from .plan import plan_run
from .report import build_report
from .resident import Resident, prepare
from .stages import Prepared, Stages, run_tasks
from .streamed import Streamed, choose


def run(cfg: RunConfig, console=None) -> Report:
    """The whole job; returns the report (also written to OUT/report.json)."""
    from rich.console import Console

    console = console or Console(stderr=True)
    say = console.print
    stages = Stages()
    profile = run_profile(cfg, say)
    refuse(cfg, profile)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    weights = (Streamed if choose(cfg, say) else Resident).open(cfg, stages, console)
    plan = plan_run(cfg, profile, cfg.round_to or profile.round_to, weights, stages, say)
    cfg = plan.cfg  # with the plan's weight format
    with weights.session(plan), run_tasks(weights.prep.texts.heldout_text, cfg, profile) as tasks:
        ppl_dense, cross_dense = weights.evaluate("dense", tasks)
        targets = None
        if cfg.recover_tokens and plan.spec.ratio == 0:
            say("recovery: skipped, the plan removes no weight (its format alone meets the budget)")
        elif cfg.recover_tokens:
            targets = weights.teacher()  # the dense model's, before pruning changes it
        result = weights.prune(plan)
        recovery = weights.recover(targets) if targets is not None else None
        ppl_pruned, cross_pruned = weights.evaluate("pruned", tasks, fmt=cfg.quantize)
        report = build_report(cfg, profile.name, weights.prep, plan.spec, result, weights.before, ppl_dense,
                              ppl_pruned, weights.params_after(), cross_domain=(cross_dense, cross_pruned))
        report.perplexity.precision = f"{plan.precision} autocast" if plan.precision else ""
        report.recovery = None if recovery is None else Recovery(**recovery)
        weights.write(report, plan, profile, tasks)
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


def refuse(cfg: RunConfig, profile) -> None:
    """Option combinations that cannot run, refused in one sentence before any work."""
    if cfg.quantize != "none":
        from exporters.quantize import refuse_for_profile

        refuse_for_profile(cfg.quantize, profile)  # a format the device has no kernel for
    if cfg.quantize_only:  # --quantize without --ratio: options that shape a pruning would be ignored
        for given, name in ((cfg.structure != "auto", "--structure"), (cfg.search, "--search"),
                            (cfg.metric != "auto", "--metric"), (cfg.compensation != "auto", "--compensation")):
            if given:
                raise UserError(f"--quantize {cfg.quantize} without --ratio quantizes the dense model only; {name} "
                                "shapes a pruning, so pass --ratio R too (or drop it).")
    if cfg.levers:  # --levers chooses the ratio, structure and format itself
        for given, name in ((cfg.ratio is not None, "--ratio"), (cfg.quantize != "none", "--quantize"),
                            (cfg.structure != "auto", "--structure"), (cfg.search, "--search")):
            if given:
                raise UserError(f"--levers chooses the width, the layers dropped and the weight format itself; "
                                f"drop {name}.")
    if cfg.recover_lora and not cfg.recover_tokens:
        raise UserError(f"--recover-lora {cfg.recover_lora} shapes a recovery: pass --recover-tokens N too "
                        "(or drop it).")
    if cfg.recover_tokens and cfg.quantize_only:
        raise UserError(f"--recover-tokens runs after a pruning, and --quantize {cfg.quantize} without --ratio prunes "
                        "nothing: pass --ratio R too (or drop --recover-tokens).")


__all__ = ["Prepared", "RunConfig", "Stages", "prepare", "run"]
