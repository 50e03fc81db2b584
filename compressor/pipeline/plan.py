"""Planning a run: how much to prune, how, and in which weight format, before any weight changes.

One strategy per way of asking (`plan_run`): `--ratio R` (width pruning of R), `--quantize F` alone
(every weight kept), and otherwise the lever frontier (`budget/frontier.py`, one latency model):
by default every lever (width x dropped layers x weight format against every budget line), with
`--width-only` (or a method option) restricted to width in the profile's dtype. In memory the lever
plan ranks its candidates by their measured KL to the dense model (`prune/planned.py`) and prunes
with that state; out of core it keeps to width x format, ranked by the weights removed. Each
returns a `RunPlan`."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..config import RunConfig
from ..output import check_out_dir
from ..prune import COMPENSATION, IMPORTANCE
from ..prune.driver import PruneResult, PruneSpec, resolve_structure
from ..prune.tensor_parallel import tensor_parallel_size
from .stages import Stages, serving_precision


@dataclass
class RunPlan:
    """What the run executes: `spec` (ratio, method, structure), the run's config with the chosen
    weight format, the output directory, the plan the report and checks read (`record`: a planner
    plan, a `LeverPlan`, a `QuantizeOnly`, or None for --ratio) and, for the in-memory lever plan,
    its own pruning (`execute`; else the weights' `prune`), and the precision the dense and the
    pruned model are judged in (`stages.serving_precision`)."""

    spec: PruneSpec
    cfg: RunConfig
    out: Path
    record: object | None = None  # a `LeverPlan`, a `QuantizeOnly`, or None for --ratio
    execute: Callable[[], PruneResult] | None = None
    precision: str | None = None


def plan_run(cfg: RunConfig, profile, round_to: int, weights, stages: Stages, say) -> RunPlan:
    """Choose the run's plan with the strategy the options ask for, announce it, and return it.
    `weights`: the run's `Resident` or `Streamed` weights (the lever plan measures candidates on
    resident ones)."""
    tp = tensor_parallel_size(profile)
    execute = None
    if cfg.quantize_only:
        record, spec = QuantizeOnly(cfg.quantize), replace(prune_spec(cfg, 0.0, round_to, tp), structure="none")
    elif cfg.plans_levers:
        if weights.resident:
            record, spec, execute = _levers_in_memory(cfg, profile, round_to, tp, weights, stages, say)
        else:
            record, spec = _levers_out_of_core(cfg, profile, round_to, tp, stages, say)
        cfg = cfg.model_copy(update={"quantize": record.frontier.chosen.fmt})
    else:
        record, ratio = _width_ratio(cfg, profile, round_to, stages, say)
        spec = quantizable(cfg, weights.auto_structure(cfg, prune_spec(cfg, ratio, round_to, tp), say), say)
    out = output_dir(cfg, spec, name=cfg.quantize if spec.ratio == 0 else None)
    announce(cfg, profile, spec, record, out, say)
    return RunPlan(spec, cfg, out, record, execute, serving_precision(profile))


def _width_ratio(cfg: RunConfig, profile, round_to: int, stages: Stages, say):
    """--ratio, or the lever frontier restricted to width (the profile's dtype, no layer dropped):
    the least width that meets every budget line -> (the `LeverPlan` or None, ratio)."""
    if cfg.ratio is not None:
        return None, cfg.ratio
    frontier, chosen = _unscored_plan(cfg, profile, round_to, stages, say, ["none"],
                                      "width only: the least width that meets every budget line")
    pred = chosen.prediction
    say(f"plan: ratio {chosen.width:.2f} is the least width that meets every budget line of '{profile.name}' "
        f"(predicted TPOT {pred.tpot_s * 1e3:.2f} ms, TTFT {pred.ttft_s * 1e3:.1f} ms; latency "
        f"{frontier.latency_source})")
    return LeverPlan(frontier, "width only"), chosen.width


def _unscored_plan(cfg: RunConfig, profile, round_to: int, stages: Stages, say, formats: list[str] | None,
                   why: str):
    """The lever frontier with no layer dropped, ranked by the weights removed (`why`: the ranking's
    reason, in the report), in `formats` (None: every format the device has kernels for); its
    refusals, or its choice -> (frontier, chosen candidate)."""
    from ..budget.frontier import lever_plan
    from ..budget.planner import InfeasibleBudget

    with stages.timed("plan"):
        frontier, _ = lever_plan(profile, cfg.model, attn_unit=cfg.attn_unit, round_to=round_to, say=say,
                                 formats=formats, compensation=cfg.compensation, max_dropped=0, confirmable=False)
        lever_notes_and_refusals(frontier, profile, say)
        frontier.unscored = why
        chosen = frontier.choose()
        if chosen is None:  # the best candidates missed the budget at their exact shapes
            raise InfeasibleBudget(frontier.notes[-1] + " Pass --ratio to prune anyway.")
    return frontier, chosen


class QuantizeOnly:
    """The plan of a quantize-only run where the report and the checks expect one: nothing predicted."""

    prediction = None

    def __init__(self, fmt: str):
        self.fmt = fmt

    def as_dict(self) -> dict:
        return {"ratio_source": f"--quantize {self.fmt} without --ratio: no pruning, quantization only"}


def _levers_in_memory(cfg: RunConfig, profile, round_to: int, tp: int, weights, stages: Stages, say):
    """Every lever, on the weights in memory: price the frontier (budget/frontier.py), measure each
    candidate's KL (prune/planned.py), choose the least-KL one that meets the budget (one inside the
    latency reserve only once its export, measured, meets the lines: budget/confirm.py).
    -> (LeverPlan, spec, the pruning to the choice)."""
    from .. import tempdirs
    from ..budget.confirm import confirm_choice
    from ..budget.frontier import lever_plan
    from ..budget.planner import InfeasibleBudget
    from ..prune.planned import PlanQuality, estimate, kl_text

    prep = weights.prep
    model, tok = prep.loaded.model, prep.loaded.tokenizer
    anchor: dict = {}  # the dense export's runtime and (TTFT s, TPOT s), measured at planning
    dense_dir = tempdirs.make("fitprune-dense-")  # the dense export, measured at planning and beside a marginal plan

    def measure_dense(runtime: str) -> tuple[float, float]:
        """The dense model, exported in the profile's dtype and measured at batch 1."""
        from exporters import export_hf

        from ..budget.device import measure_batch1, open_runtime

        export_hf(model, tok, dense_dir, dtype=getattr(torch, profile.dtype))
        threads = profile.device.threads if profile.device.kind == "cpu" else None
        w = profile.workload
        with open_runtime(runtime, dense_dir, profile.dtype, threads) as rt:
            m = measure_batch1(rt, w.prompt_tokens, w.output_tokens, 5)
        anchor.update(runtime=runtime, latency=(m.ttft_s, m.tpot_s))
        return m.ttft_s, m.tpot_s

    spec = replace(prune_spec(cfg, 0.0, round_to, tp), structure="uniform")
    try:
        with stages.timed("plan"):
            frontier, _ = lever_plan(profile, cfg.model, attn_unit=cfg.attn_unit, round_to=round_to, say=say,
                                     measure_dense=measure_dense, compensation=cfg.compensation)
            lever_notes_and_refusals(frontier, profile, say)
            kl_ids = kl_text("self", model, tok, prep.validation, 8 * 256, cfg.seed)
            quality = PlanQuality(model, prep.adapter, prep.calib, prep.validation, spec, cfg.compute, say=say,
                                  kl_ids=kl_ids, kl_on="text the dense model generated itself")
            estimate(quality, frontier, say=say)
            chosen = frontier.choose()
            if chosen is not None and chosen.marginal:  # inside the reserve: kept only if its export meets the lines
                chosen = confirm_choice(frontier, lambda c: quality.pruned_copy(c.width, c.dropped, c.bias_free),
                                        tok, dense_dir, anchor["latency"], profile, anchor["runtime"], say=say)
            quality.close()  # the dense model back for its evaluation; the plan is executed after it
            if chosen is None:  # the best candidates missed the budget when measured (exact shapes, or the export)
                raise InfeasibleBudget(frontier.notes[-1] + " Pass --ratio to prune anyway.")
    finally:
        shutil.rmtree(dense_dir, ignore_errors=True)
    say(f"[bold]plan[/]: {chosen.levers}, {chosen.removed:.1%} of decoder weights removed, predicted TPOT "
        f"{chosen.prediction.tpot_s * 1e3:.2f} ms, TTFT {chosen.prediction.ttft_s * 1e3:.1f} ms "
        f"({frontier.rule}; latency {frontier.latency_source})")

    def execute() -> PruneResult:
        result = quality.prune(chosen.width, chosen.dropped, chosen.bias_free)
        result.notes["levers"] = {"chosen": chosen.levers, "format": chosen.fmt, "rule": frontier.rule}
        return result

    spec = replace(spec, ratio=round(chosen.removed, 4), compensation=quality.compensation(chosen.bias_free).name)
    return LeverPlan(frontier, "every lever"), spec, execute


def _levers_out_of_core(cfg: RunConfig, profile, round_to: int, tp: int, stages: Stages, say):
    """Every lever that runs out of core: width x weight format, with no layer dropped and ranked by
    the weights removed, since choosing the layers to drop and measuring the candidates' KL need the
    whole model in memory. -> (LeverPlan, spec: the chosen width, the same in every layer)."""
    frontier, chosen = _unscored_plan(
        cfg, profile, round_to, stages, say, None, "out of core: width and weight format only, no layer dropped, "
        "since choosing layers to drop and measuring the candidates' KL need the whole model in memory")
    say(f"[bold]plan[/]: {chosen.levers}, predicted TPOT {chosen.prediction.tpot_s * 1e3:.2f} ms, TTFT "
        f"{chosen.prediction.ttft_s * 1e3:.1f} ms ({frontier.rule}; latency {frontier.latency_source})")
    spec = replace(prune_spec(cfg, round(chosen.width, 4), round_to, tp), structure="uniform")
    return LeverPlan(frontier, "every lever, out of core"), quantizable(cfg.model_copy(update={"quantize": chosen.fmt}),
                                                                          spec, say)


def prune_spec(cfg: RunConfig, ratio: float, round_to: int, tensor_parallel: int = 1) -> PruneSpec:
    """`tensor_parallel`: the profile's (prune/tensor_parallel.py), which the widths must split over."""
    metric = IMPORTANCE.get(cfg.metric)
    comp = COMPENSATION.get(cfg.compensation)
    return PruneSpec(metric=metric.name, compensation=comp.name, structure=resolve_structure(cfg.structure, metric),
                     ratio=ratio, attn_unit=cfg.attn_unit, round_to=round_to, tensor_parallel=tensor_parallel)


# `--structure auto` is the allocation search where it is affordable: it generalises best
# (`benchmarks/quality.py`), and costs ~30 generations of forward passes over the validation windows
# (10 minutes for SmolLM2 on a 2-core CPU, docs/benchmarks.md, "The README's first run"), growing with
# the model's size. Larger models on a CPU keep the one-pass global allocation.
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
        from ..config import refuse_out_dir

        refuse_out_dir(out)  # the default one too: an unwritable working directory is refused before the work
    check_out_dir(out)
    return out


def lever_notes_and_refusals(frontier, profile, say) -> None:
    """Print the lever frontier's notes; an infeasible budget, or a dense model that already meets it,
    ends the run in one sentence."""
    from ..budget.planner import InfeasibleBudget, NothingToPrune

    for n in frontier.notes:
        say(f"plan note: {n}")
    if not frontier.feasible:
        raise InfeasibleBudget(frontier.notes[-1] + " Pass --ratio to prune anyway.")
    if any(c.removed == 0 and c.fmt == "none" for c in frontier.candidates):
        raise NothingToPrune(f"The dense model already meets every budget line of profile '{profile.name}' (predicted "
                             f"from {frontier.latency_source}); nothing to prune, so nothing was written.")


class LeverPlan:
    """The lever frontier where the report and the checks expect a plan: the checks compare the
    measured export with its choice's `prediction`. `source`: how the run came to it."""

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
        + (" (ratio from --ratio)" if plan is None else f" (the plan, {plan.source}: {plan.frontier.chosen.levers})"))


