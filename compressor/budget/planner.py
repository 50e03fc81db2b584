"""The planner: which pruning ratio does a profile's budget force?

For every ratio of a grid (0 to 0.7 in steps of 0.05) the widths that uniform pruning would give
(the allocation's own rules: whole attention units, MLP channels for the rest, rounded to the
profile's multiple) go through the cost model (`profiles.costmodel`); the plan is the smallest
ratio whose prediction meets every budget line (memory, TTFT, TPOT, throughput). When none does,
the budget is infeasible and the plan names the closest ratio and the lines it still misses.

Under tensor parallel (a profile with `device.count` N > 1) the widths follow the shared rule of
`prune.tensor_parallel` (query and KV head counts vLLM can split over N devices, MLP widths a
multiple of N x round_to), exactly as allocation applies it; a dense model whose head counts vLLM
cannot split is not a choice (ratio 0 is skipped), and the plan's notes say which constraint applied.

Only the model's config is read. Where the profile's device is the one at hand, `fit_cost_model`
(budget/fitting.py) measures the dense architecture (and a skeleton of it: the same depth and embeddings, minimal
widths) in the runtime, with random weights, and fits the efficiency factors to the two
measurements, so that the plan predicts this device rather than a datasheet.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from profiles import Profile
from profiles.costmodel import Arch, CostModel, Prediction, Violation

from ..errors import UserError
from ..model.adapters import LayerShape
from ..model.loading import read_config
from ..prune.tensor_parallel import describe, tensor_parallel_size, widths_problems
from ..prune.widths import uniform_shapes
from .device import device_present, measurement_runtime
from .fitting import CalibrationFailed, arch_of, fit_cost_model

GRID = tuple(round(0.05 * i, 2) for i in range(15))  # 0.0 .. 0.7


class InfeasibleBudget(UserError):
    """No ratio of the grid meets the budget (exit code 3)."""

    def __init__(self, message: str):
        super().__init__(message, exit_code=3)


class NothingToPrune(UserError):
    """The dense model meets the budget already and no --ratio was given (exit code 4)."""

    def __init__(self, message: str):
        super().__init__(message, exit_code=4)


def arch_at_ratio(arch: Arch, ratio: float, attn_unit: str = "auto", round_to: int = 1, tp: int = 1) -> Arch:
    """The widths uniform pruning gives at `ratio` under tensor parallel `tp`: the allocation's own
    width function. Ratio 0 is the dense model as it is (whether or not `tp` can split it)."""
    if ratio <= 0:
        return arch
    shapes = [LayerShape(arch.q_heads[i], arch.kv_heads[i], arch.head_dim, arch.intermediate[i])
              for i in range(arch.layers)]
    after = uniform_shapes(shapes, arch.hidden, ratio, attn_unit, round_to, tp)
    return Arch(arch.hidden, arch.vocab, arch.head_dim, tuple(s.num_heads for s in after),
                tuple(s.num_kv_heads for s in after), tuple(s.intermediate_size for s in after), arch.tied_embeddings,
                arch.biased)


def shallower(arch: Arch, dropped: int) -> Arch:
    """`arch` with its last `dropped` layers gone: with uniform widths, which layers go does not change
    the cost, only how many."""
    n = arch.layers - dropped
    return replace(arch, q_heads=arch.q_heads[:n], kv_heads=arch.kv_heads[:n], intermediate=arch.intermediate[:n])


@dataclass
class PlanRow:
    ratio: float
    arch: Arch
    prediction: Prediction
    violations: list[Violation]
    tp_problem: str | None = None  # why vLLM cannot split these widths over the profile's devices

    @property
    def ok(self) -> bool:
        return not self.violations and self.tp_problem is None

    @property
    def worst_excess(self) -> float:
        return max((v.excess for v in self.violations), default=1.0)

    def as_dict(self, dense_decoder: int) -> dict:
        return {"ratio": self.ratio, "params": self.arch.total_params,
                "decoder_removed": round(1 - self.arch.decoder_params / dense_decoder, 4),
                **self.prediction.as_dict(), "meets_budget": self.ok,
                "violations": [v.sentence() for v in self.violations]
                + ([f"vLLM cannot split it: {self.tp_problem}"] if self.tp_problem else [])}


@dataclass
class Plan:
    profile: str
    rows: list[PlanRow]
    efficiency: dict
    cost_fit: dict | None = None  # the cost model fitted on this device (budget/fitting.py), if any
    tensor_parallel: int = 1  # the profile's device count: the widths split over this many devices
    chosen: PlanRow | None = None
    closest: PlanRow | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def feasible(self) -> bool:
        return self.chosen is not None

    @property
    def ratio(self) -> float:
        row = self.chosen or self.closest
        assert row is not None
        return row.ratio

    def infeasible_sentence(self) -> str:
        c = self.closest
        assert c is not None
        return (f"The budget of profile '{self.profile}' is infeasible: even at the closest ratio "
                f"{c.ratio:.2f} the predicted " + "; ".join(v.sentence() for v in c.violations) + ".")

    def as_dict(self) -> dict:
        dense = self.rows[0].arch.decoder_params
        rows = [r.as_dict(dense) for r in self.rows]
        return {
            "profile": self.profile, "feasible": self.feasible,
            "chosen_ratio": self.chosen.ratio if self.chosen else None,
            "closest_ratio": None if self.chosen else (self.closest.ratio if self.closest else None),
            "efficiency": self.efficiency, "cost_fit": self.cost_fit, "tensor_parallel": self.tensor_parallel,
            "notes": self.notes,
            "rows": rows, "predicted": True,
        }


def headroom_notes(profile: Profile, marginal: bool = False) -> list[str]:
    """The plan's reserve on the latency lines, in words (none without one); `marginal`: plans inside
    it are offered, confirmed on their exports (`budget/confirm.py`)."""
    h = profile.budget.latency_headroom
    if not h:
        return []
    inside = ("; a better plan inside the reserve is kept only if its own export, measured beside the dense "
              "export before pruning, meets the lines themselves") if marginal else ""
    return [f"planned with {h:.0%} of the TTFT and TPOT lines in reserve (the profile's latency_headroom): a "
            "plan must be predicted within that much less; the measured export is judged against the lines "
            f"themselves{inside}"]


def tensor_parallel_notes(arch: Arch, tp: int, round_to: int) -> list[str]:
    """What the plan says about tensor parallel: the constraint, and whether the dense model meets it."""
    if tp <= 1:
        return []
    notes = [describe(tp, round_to)]
    problems = widths_problems(list(arch.q_heads), list(arch.kv_heads), list(arch.intermediate), tp)
    if problems:
        notes.append(f"the dense model cannot be served with tensor parallel {tp} ({problems[0]}), so ratio 0 is "
                     "not a choice and every ratio prunes at least to the nearest shape vLLM can split")
    return notes


def make_plan(profile: Profile, arch: Arch, cost: CostModel | None = None, grid: tuple[float, ...] = GRID,
              attn_unit: str = "auto", round_to: int | None = None) -> Plan:
    cost = cost or CostModel(profile)
    rt = round_to or profile.round_to
    tp = tensor_parallel_size(profile)
    rows = []
    for r in grid:
        a = arch_at_ratio(arch, r, attn_unit, rt, tp)
        pred = cost.predict(a)
        problems = widths_problems(list(a.q_heads), list(a.kv_heads), list(a.intermediate), tp)
        rows.append(PlanRow(r, a, pred, cost.violations(pred), problems[0] if problems else None))
    plan = Plan(profile.name, rows, {**cost.efficiency.model_dump(), "source": cost.efficiency_source})
    plan.tensor_parallel = tp
    plan.chosen = next((row for row in rows if row.ok), None)
    if plan.chosen is None:
        splittable = [row for row in rows if row.tp_problem is None] or rows
        plan.closest = min(splittable, key=lambda row: (row.worst_excess, row.ratio))
    plan.notes = tensor_parallel_notes(arch, tp, rt) + headroom_notes(profile)
    return plan


def plan_for(profile: Profile, model: str | None, calibrate_here: bool | None = None, attn_unit: str = "auto",
             round_to: int | None = None, runs: int = 3, say=print) -> tuple[Plan, Arch]:
    """Read the model's config, calibrate where the device is present (unless told not to), plan."""
    config, model_dir = read_config(model)
    arch = arch_of(config)
    cost = CostModel(profile)
    cal = None
    notes = []
    want = device_present(profile) if calibrate_here is None else calibrate_here
    if want:
        if model_dir is None or not (model_dir / "tokenizer_config.json").is_file() and not (
                model_dir / "tokenizer.json").is_file():
            notes.append("no local tokenizer beside the config, so the cost model was not fitted here; "
                         "profile factors used")
        else:
            runtime, note = measurement_runtime(profile)
            if note:
                notes.append(note)
            try:
                cal = fit_cost_model(profile, config, model_dir, runtime, runs=runs, say=say)
            except CalibrationFailed as exc:
                if calibrate_here:  # asked for (--fit): the failure is the answer
                    raise
                # fitted on our own initiative: plan with the profile's factors, and say so
                notes.append(f"the cost model could not be fitted here ({str(exc).rstrip('.')}); "
                             "predictions use the profile's efficiency factors")
            else:
                cost = cost.with_efficiency(cal.efficiency, cal.source)
                notes += cal.details["notes"]
    elif calibrate_here is None:
        notes.append(f"the profile's device ({profile.device.name}) is not present here: "
                     "predictions use the profile's efficiency factors")
    plan = make_plan(profile, arch, cost, attn_unit=attn_unit, round_to=round_to)
    plan.cost_fit = cal.details if cal else None
    plan.notes = notes + plan.notes
    return plan, arch


def plan_for_run(profile: Profile, model: str | None, attn_unit: str, round_to: int, say=print) -> Plan:
    """The main job's plan: the chosen ratio, or one clear sentence (infeasible / nothing to prune)."""
    plan, _ = plan_for(profile, model, attn_unit=attn_unit, round_to=round_to, runs=2, say=say)
    if not plan.feasible:
        raise InfeasibleBudget(plan.infeasible_sentence() + " Pass --ratio to prune anyway.")
    if plan.chosen.ratio == 0:
        p = plan.chosen.prediction
        raise NothingToPrune(
            f"The dense model already meets every budget line of profile '{profile.name}' (predicted "
            f"{p.memory.total_gib:.2f} GiB, TTFT {p.ttft_s * 1e3:.1f} ms, TPOT {p.tpot_s * 1e3:.2f} ms, "
            f"{p.throughput_tok_s:.1f} tok/s); nothing to prune, so nothing was written. Pass --ratio to prune anyway.")
    for n in plan.notes:
        say(f"plan note: {n}")
    pred = plan.chosen.prediction
    say(f"plan: ratio {plan.chosen.ratio:.2f} is the smallest that meets every budget line of '{profile.name}' "
        f"(predicted TPOT {pred.tpot_s * 1e3:.2f} ms, TTFT {pred.ttft_s * 1e3:.1f} ms)")
    return plan
