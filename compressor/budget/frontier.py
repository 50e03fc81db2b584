"""The plan as a search over every lever: width, depth and weight format.

A candidate is (width, dropped layers, format), with or without its compensation's biases
(`bias_free`). Each is priced by the latency table (`budget.latency_table`: measured, or the
datasheet, labelled) for TTFT and TPOT and by the cost model for memory and throughput. Per
(format, dropped) the frontier keeps the least width meeting every budget line with the profile's
latency headroom in reserve, and, where latency is measured here, a *marginal* candidate meeting
the lines but not the reserve, which is chosen only once its own export meets the lines
(`budget/confirm.py`), else `Frontier.fallback`. The choice is the least KL to the dense model
(`prune.planned.PlanQuality`) when the weights are at hand, else the fewest weights removed; the
report names the rule. The measurements behind these rules: docs/benchmarks.md, "Does the lever plan
beat single levers?" and "Why is the latency table measured the way it is?".
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from profiles import Profile
from profiles.costmodel import Arch, CostModel, Prediction, Violation

from ..prune.tensor_parallel import tensor_parallel_size, widths_problems
from .latency_table import format_problem
from .planner import GRID, arch_at_ratio, headroom_notes, shallower, tensor_parallel_notes


@dataclass
class Candidate:
    width: float  # fraction of the kept layers' weights removed by width pruning
    dropped: int  # whole decoder layers removed
    fmt: str  # "none" (the profile's dtype) or a quantized weight format
    arch: Arch
    prediction: Prediction
    violations: list[Violation]
    removed: float  # fraction of the dense decoder's weights removed, width and depth together
    kl: float | None = None  # predicted quality loss: KL(dense || candidate) on `Frontier.kl_on`
    exact: bool = False  # its latency is its own shape's measurement (`ExactCheck`), not the table's fit
    bias_free: bool = False  # its widths re-fitted without biases (`Compensation.bias_free`): no bias switches
    # the lines it misses without the profile's latency headroom (`violations` keeps the reserve)
    line_violations: list[Violation] = field(default_factory=list)
    confirmed: bool = False  # its latency is its real export's, measured in turn with the dense export (`confirm`)

    @property
    def ok(self) -> bool:
        """It meets every budget line with the profile's latency reserve kept."""
        return not self.violations

    @property
    def within_lines(self) -> bool:
        """It meets every budget line itself (the reserve aside)."""
        return not self.line_violations

    @property
    def marginal(self) -> bool:
        """It meets the lines but not the reserve below them: chosen only when its export confirms it."""
        return self.within_lines and not self.ok

    def reprice(self, prediction: Prediction, cost: CostModel) -> None:
        """A new price (a measurement): both sets of violations follow it."""
        self.prediction = prediction
        self.violations, self.line_violations = cost.violations(prediction), cost.violations(prediction, reserve=False)

    @property
    def levers(self) -> str:
        parts = []
        if self.dropped:
            parts.append(f"drop {self.dropped} layers")
        if self.width:
            parts.append(f"width -{self.width:.0%}" + (" (no biases)" if self.bias_free else ""))
        if self.fmt != "none":
            parts.append(self.fmt)
        return " + ".join(parts) or "dense"

    def as_dict(self) -> dict:
        return {"levers": self.levers, "width": self.width, "dropped_layers": self.dropped, "format": self.fmt,
                "biases": self.arch.biased,
                "decoder_removed": round(self.removed, 4), "params": self.arch.total_params,
                **self.prediction.as_dict(), "meets_budget": self.within_lines, "keeps_reserve": self.ok,
                "kl": self.kl,
                "latency_from": ("its export, measured in turn with the dense export" if self.confirmed else
                                 "its exact shape, measured" if self.exact else "the table's fit"),
                "marginal": self.marginal, "violations": [v.sentence() for v in self.violations]}


@dataclass
class Frontier:
    profile: str
    latency_source: str  # where TTFT/TPOT come from: a measured table or the datasheet roofline
    candidates: list[Candidate]  # per (format, dropped): the least width meeting the budget
    formats: list[str]
    skipped_formats: dict[str, str] = field(default_factory=dict)  # format -> why it is not a lever here
    chosen: Candidate | None = None
    rule: str = ""  # how `chosen` was chosen
    notes: list[str] = field(default_factory=list)
    kl_on: str = "validation text"  # what the candidates' KL was measured on (`prune.planned.kl_text`)
    # why the candidates have no KL, when they have none (the ranking's words say it)
    unscored: str = "the weights were not read, so quality was not estimated; run the main job to choose by measured KL"
    # measures a candidate at its exact shape before it is chosen (`ExactCheck`); None: the fit decides
    checker: object = field(default=None, repr=False, compare=False)
    max_checks: int = 4
    # candidates inside the reserve are offered (`search(marginal=True)`); the choice may be one of them
    marginal: bool = False
    # where a marginal `chosen` missed on its export: the best candidate after it that keeps the reserve
    fallback: Candidate | None = None
    missed_on_export: Candidate | None = None  # the marginal choice whose export missed the lines (`confirm`)
    _ranked: list[Candidate] = field(default_factory=list, repr=False, compare=False)

    @property
    def feasible(self) -> bool:
        return any(c.within_lines for c in self.candidates)

    def passes(self, c: Candidate) -> bool:
        return c.ok or (self.marginal and c.within_lines)

    def rank(self) -> list[Candidate]:
        """The candidates best first: the least KL where every candidate has one; else the fewest weights
        removed (format order breaks ties: the dense dtype first), then the lowest predicted TPOT.
        Sets `rule` to the ranking's words."""
        order = {f: i for i, f in enumerate(self.formats)}
        if all(c.kl is not None for c in self.candidates):
            self.rule = f"least KL to the dense model on {self.kl_on} (measured on the weights)"
            return sorted(self.candidates, key=lambda c: (c.kl, c.removed, c.prediction.tpot_s))
        self.rule = f"fewest decoder weights removed ({self.unscored})"
        return sorted(self.candidates, key=lambda c: (round(c.removed, 4), order[c.fmt], c.prediction.tpot_s))

    def _walk(self, ranked: list[Candidate], accept, marginal_checks: int) -> tuple[Candidate | None, list[Candidate]]:
        """The first of `ranked` that `accept`s, each measured at its exact shape first where there is a
        `checker`: at most `max_checks` of the candidates that keep the reserve by their price and
        `marginal_checks` of those inside it (the rest are passed over), so that plans inside the
        reserve never use up the checks of the others. -> (the one found or None, those that missed)."""
        left = {False: self.max_checks, True: marginal_checks}
        missed = []
        for c in ranked:
            if self.checker is not None:
                if not left[c.marginal]:
                    if not any(left.values()):
                        break
                    continue
                left[c.marginal] -= 1
                self.checker(c)
            if accept(c):
                return c, missed
            missed.append(c)
        return None, missed

    def choose(self) -> Candidate | None:
        """The best candidate by `rank` that meets the budget. With a `checker`, the best candidates
        are measured at their exact shapes in that order (up to `max_checks` of each kind: `_walk`)
        and the first that still meets the budget is chosen; when none does, nothing is. A marginal
        choice (`Candidate.marginal`) is kept only once its export confirms it (`confirm`)."""
        self.fallback = self.missed_on_export = None
        if not self.feasible:
            self.chosen, self.rule = None, "no candidate meets the budget"
            return None
        self._ranked = self.rank()
        self.chosen, missed = self._walk(self._ranked, self.passes, self.max_checks)
        c = self.chosen
        if c is not None:
            if self.checker is not None:
                self.rule += "; measured at its exact shape before pruning, it meets the " + (
                    "lines" if c.marginal else "budget")
                if missed:
                    self.rule += f" (the {len(missed)} before it by that rule did not, at theirs)"
            if c.marginal:
                h = c.violations[0].headroom if c.violations else 0
                self.rule += (f"{',' if self.checker is not None else '; it meets the lines'} but not the {h:.0%} "
                              "reserve below them, so its export is measured before it is kept (else the best plan "
                              "that keeps the reserve is)")
            return c
        self.rule = f"none: the best {len(missed)} by that rule, measured at their exact shapes, missed the budget"
        self.notes.append(f"The budget of profile '{self.profile}' is infeasible as measured: the table's fit "
                          f"predicted it met, but the best {len(missed)} candidates measured at their exact shapes "
                          "missed it (" + "; ".join(f"{c.levers}: " + ", ".join(v.sentence() for v in c.violations)
                                                    for c in missed) + ").")
        return None

    def confirm(self, ttft_s: float, tpot_s: float, cost: CostModel, how: str) -> Candidate | None:
        """The marginal choice's export measured at (`ttft_s`, `tpot_s`), on the plan's scale (`how`
        says how): kept if it meets the lines themselves, else the `fallback` is chosen: the best
        candidate ranked after it that keeps the reserve (measured at its exact shape first, where
        there is a checker; candidates inside the reserve by their price are not tried), None where
        there is none. A choice that keeps the reserve needs no confirmation."""
        c = self.chosen
        if c is None or not c.marginal:
            return c
        before = c.prediction.tpot_s
        scale = before / tpot_s if tpot_s > 0 else 1.0
        c.reprice(replace(c.prediction, ttft_s=ttft_s, tpot_s=tpot_s,
                          throughput_tok_s=c.prediction.throughput_tok_s * scale, efficiency=how), cost)
        c.confirmed = True
        measured = f"its export measured {tpot_s * 1e3:.2f} ms TPOT, {ttft_s * 1e3:.1f} ms TTFT ({how})"
        if c.within_lines:
            self.rule += f"; {measured}: it meets the lines, so it is kept"
            return c
        ranked = self._ranked or self.rank()
        self.missed_on_export = c
        self.fallback, _ = self._walk(ranked[ranked.index(c) + 1:], lambda x: x.ok, 0)
        self.rule += (f"; {measured}: " + "; ".join(v.sentence() for v in c.line_violations)
                      + (f"; so the fallback, {self.fallback.levers}, is chosen" if self.fallback else
                         "; no candidate that keeps the reserve was left to fall back on"))
        if self.fallback is None:
            self.notes.append(f"The budget of profile '{self.profile}' is infeasible as measured: the best plan, "
                              f"{c.levers}, missed it on its export (" + "; ".join(
                                  v.sentence() for v in c.line_violations) + ") and no plan that keeps the "
                              "reserve was found.")
        self.chosen = self.fallback
        return self.chosen

    def as_dict(self) -> dict:
        return {"profile": self.profile, "latency_source": self.latency_source, "formats": self.formats,
                "kl_on": self.kl_on,
                "skipped_formats": self.skipped_formats, "rule": self.rule, "notes": self.notes,
                "chosen": self.chosen.as_dict() if self.chosen else None,
                "missed_on_export": self.missed_on_export.as_dict() if self.missed_on_export else None,
                "frontier": [c.as_dict() for c in self.candidates]}


@dataclass
class AnchoredTable:
    """A latency table scaled to agree with one real measurement of the dense model's export, taken
    just before planning: one factor for TTFT and one for TPOT, for every architecture and format.

    A factor, not a shift: what it corrects is mostly the host's speed at the moment, which scales
    every kernel alike, and the table's points are stored on one reference's scale (the figures:
    docs/benchmarks.md, "Why is the latency table measured the way it is?")."""

    table: object
    ttft_scale: float
    tpot_scale: float

    @classmethod
    def on(cls, table, arch: Arch, ttft_s: float, tpot_s: float) -> AnchoredTable:
        """Anchor `table` on the dense model `arch` measured at (`ttft_s`, `tpot_s`) in the dense dtype."""
        ttft, tpot = table.predict(arch, "none")
        return cls(table, ttft_s / ttft, tpot_s / tpot)

    @property
    def source(self) -> str:
        return (f"{self.table.source}, scaled to the dense export measured there (TPOT x{self.tpot_scale:.3f}, "
                f"TTFT x{self.ttft_scale:.3f})")

    @property
    def notes(self) -> list[str]:
        return list(getattr(self.table, "notes", []))

    def formats(self) -> list[str]:
        return self.table.formats()

    def predict(self, arch: Arch, fmt: str = "none") -> tuple[float, float]:
        ttft, tpot = self.table.predict(arch, fmt)
        return ttft * self.ttft_scale, tpot * self.tpot_scale

    def as_dict(self) -> dict:
        return {**self.table.as_dict(), "source": self.source,
                "anchor": {"ttft_scale": self.ttft_scale, "tpot_scale": self.tpot_scale}}


class ExactCheck:
    """Measures a candidate at its exact shape before it is chosen (`latency_table.measure_exact`:
    random weights, its widths, depth, biases and format, in turn with the table's reference) and
    re-prices it with that point. `table` is the table the frontier was priced with (anchored or
    not); `base` the measured table under it, which gains the exact points (and its cache)."""

    def __init__(self, table, profile: Profile, config: dict, model_dir, cost: CostModel, runs: int = 3, say=print):
        self.table, self.profile, self.config, self.model_dir = table, profile, config, model_dir
        self.cost, self.runs, self.say = cost, runs, say

    @property
    def base(self):
        return self.table.table if isinstance(self.table, AnchoredTable) else self.table

    def _set_base(self, base) -> None:
        if isinstance(self.table, AnchoredTable):
            self.table.table = base
        else:
            self.table = base

    def __call__(self, c: Candidate) -> bool:
        from .latency_table import exact_shape, measure_exact
        from .shapes import arch_of

        if exact_shape(c.arch) is None:  # per-layer widths: the fit is all there is
            return c.ok
        before = c.prediction.tpot_s
        if self.base.exact(c.arch, c.fmt) is not None:  # measured earlier (cached): already its price
            verdict = f"plan: {c.levers} was measured at its exact shape before: TPOT {before * 1e3:.2f} ms"
        else:
            # the full architecture in another format is the table's own "full" point: priced, not measured again
            full = exact_shape(c.arch) == exact_shape(arch_of(self.config))
            if not full:
                self.say(f"plan: measuring {c.levers} at its exact shape (TPOT predicted by the fit: "
                         f"{before * 1e3:.2f} ms)")
            self._set_base(measure_exact(self.base, self.profile, self.config, self.model_dir, [(c.arch, c.fmt)],
                                         self.runs, self.say))
            c.prediction = predict(self.cost, self.table, c.arch, c.fmt)
            point = self.base.exact(c.arch, c.fmt)
            how = "is the latency table's full point" if point and "exact_from" in point.measurement else "measured"
            verdict = (f"plan: {c.levers} {how}: {c.prediction.tpot_s * 1e3:.2f} ms TPOT at its exact shape "
                       f"({c.prediction.tpot_s / before - 1:+.1%} against the fit)")
        c.reprice(c.prediction, self.cost)
        c.exact = True
        self.say(f"{verdict}: " + ("meets the budget" if c.ok else
                                   ("meets the lines, not the reserve: " if c.within_lines else "")
                                   + "; ".join(v.sentence() for v in c.violations)))
        return c.ok


def exact_check(table, profile: Profile, config: dict, model_dir, cost: CostModel, runs: int = 3,
                say=print) -> ExactCheck | None:
    """An `ExactCheck` where the table was measured here (and so can gain points); None otherwise."""
    check = ExactCheck(table, profile, config, model_dir, cost, runs, say)
    if model_dir is None or not getattr(check.base, "measured", False) or getattr(check.base, "path", None) is None:
        return None
    return check


def predict(cost: CostModel, table, arch: Arch, fmt: str) -> Prediction:
    """TTFT and TPOT from the latency table; memory from the cost model in `fmt`; throughput from the
    roofline, scaled by how far the table's batch-1 decode step is from the roofline's."""
    roof = cost.predict(arch, fmt)
    ttft, tpot = table.predict(arch, fmt)
    throughput = roof.throughput_tok_s * roof.tpot_s / tpot if tpot > 0 else roof.throughput_tok_s
    return Prediction(roof.memory, ttft, tpot, throughput, table.source)


def search(profile: Profile, arch: Arch, table, cost: CostModel, formats: list[str], attn_unit: str = "auto",
           round_to: int | None = None, grid: tuple[float, ...] = GRID, max_dropped: int | None = None,
           biases: bool = False, bias_free: bool = False, marginal: bool = False) -> Frontier:
    """Every (format, dropped) pair's least grid width that meets the budget (see the module doc).
    `biases`: width pruning's compensation adds biases (`Compensation.adds_bias`), so a candidate
    with a width removed is priced as an export with the config's bias switches on. `bias_free`:
    each such candidate also comes without them (its compensation's sibling without biases), for
    kernels that are slower with biases than without: only a measurement of its exact shape tells
    them apart (`ExactCheck`), so offer them where one will be made. `marginal`: each pair also offers
    the least width that meets the lines but not the reserve below them, where it is less than the
    reserve's (never the dense model itself): offer them where the chosen plan's export can be
    measured before it is kept (`Frontier.confirm`). Under tensor parallel (the profile's device
    count) every candidate has widths vLLM can split over the devices, as allocation gives them, and
    a dense model that cannot be split is no candidate."""
    rt = round_to or profile.round_to
    tp = tensor_parallel_size(profile)
    max_dropped = arch.layers // 2 if max_dropped is None else max_dropped
    marginal = marginal and profile.budget.latency_headroom > 0
    frontier = Frontier(profile.name, table.source, [], [], marginal=marginal)

    def widest(found: Candidate | None, near: Candidate | None) -> Candidate | None:
        """`near` (priced against the lines themselves) where it removes less width than `found`."""
        if near is None or (found is not None and near.width >= found.width):
            return None
        return near

    for fmt in formats:
        why = format_problem(fmt, replace(arch, q_heads=(0,) * arch.layers, intermediate=(0,) * arch.layers))
        if why:  # the hidden size itself: no width pruning can help
            frontier.skipped_formats[fmt] = why
            continue
        frontier.formats.append(fmt)
        for dropped in range(max_dropped + 1):
            base = shallower(arch, dropped)
            found = least_width(arch, base, dropped, fmt, table, cost, attn_unit, rt, grid, biases, tp=tp)
            near = None
            if marginal:
                near = widest(found, least_width(arch, base, dropped, fmt, table, cost, attn_unit, rt, grid, biases,
                                                 reserve=False, tp=tp))
                if near and (fmt, dropped, near.width) == ("none", 0, 0):
                    near = None  # the dense model itself: that it meets the lines is no plan
            for c in (found, near):
                if c is None:
                    continue
                frontier.candidates.append(c)
                if c.width and biases and bias_free:
                    plain = least_width(arch, base, dropped, fmt, table, cost, attn_unit, rt, grid, False,
                                        reserve=c is found, tp=tp)
                    if plain and plain.width and (c is found or plain.marginal):
                        plain.bias_free = True
                        frontier.candidates.append(plain)
            if found and found.width == next(w for w in grid if _shape(base, w, fmt, attn_unit, rt, biases, tp)):
                break  # the least width there is fits: dropping more layers on top only loses quality
    return frontier


def _shape(base: Arch, width: float, fmt: str, attn_unit: str, round_to: int, biases: bool, tp: int) -> Arch | None:
    """`base` at `width` (with the bias switches on where `biases` adds them), or None where `fmt`
    cannot hold these widths or vLLM cannot split them over `tp` devices (the dense model itself, at
    width 0, may be such a shape)."""
    a = arch_at_ratio(base, width, attn_unit, round_to, tp)
    if width and biases:
        a = replace(a, biased=True)
    if format_problem(fmt, a) or widths_problems(list(a.q_heads), list(a.kv_heads), list(a.intermediate), tp):
        return None
    return a


def least_width(dense: Arch, base: Arch, dropped: int, fmt: str, table, cost: CostModel, attn_unit: str,
                round_to: int, grid: tuple[float, ...], biases: bool = False, reserve: bool = True,
                tp: int = 1) -> Candidate | None:
    """The least width of `grid` with a shape (`_shape`) that meets every budget line (with the
    profile's latency reserve kept below them, or without it: `reserve`)."""
    for width in grid:
        a = _shape(base, width, fmt, attn_unit, round_to, biases, tp)
        if a is None:
            continue
        pred = predict(cost, table, a, fmt)
        if not cost.violations(pred, reserve=reserve):
            c = Candidate(width, dropped, fmt, a, pred, [], 1 - a.decoder_params / dense.decoder_params)
            c.reprice(pred, cost)
            return c
    return None


def closest_miss(profile: Profile, arch: Arch, table, cost: CostModel, formats: list[str], attn_unit: str = "auto",
                 round_to: int | None = None, max_dropped: int | None = None) -> str:
    """The sentence for an infeasible budget: the most pruned candidate of the fastest format (at most
    `max_dropped` layers dropped, default half) and what it misses."""
    rt = round_to or profile.round_to
    dropped = arch.layers // 2 if max_dropped is None else max_dropped
    worst = None
    for fmt in formats:
        if format_problem(fmt, arch):
            continue
        a = arch_at_ratio(shallower(arch, dropped), GRID[-1], attn_unit, rt, tensor_parallel_size(profile))
        pred = predict(cost, table, a, fmt)
        v = cost.violations(pred)
        excess = max((x.excess for x in v), default=1.0)
        if worst is None or excess < worst[0]:
            worst = (excess, fmt, v)
    if worst is None or not worst[2]:
        return f"The budget of profile '{profile.name}' is infeasible."
    how = (f"with half the layers dropped, {GRID[-1]:.0%} of the rest removed by width" if dropped
           else f"with {GRID[-1]:.0%} of the decoder removed by width")
    return (f"The budget of profile '{profile.name}' is infeasible: even {how} and "
            + (f"{profile.dtype} weights" if worst[1] == "none" else f"{worst[1]} weights") + ", the predicted "
            + "; ".join(x.sentence() for x in worst[2]) + ".")


def lever_formats(profile: Profile) -> list[str]:
    """The weight formats the plan may choose on this profile: the dense dtype and every quantized
    format its device has a kernel for (`profiles/data/kernels.yaml`)."""
    from exporters.quantize import SCHEMES
    from profiles.kernels import runnable

    return ["none"] + [f for f in runnable(profile) if f in SCHEMES]


def latency_table_for(profile: Profile, config: dict, model_dir, formats: list[str], measure: bool | None,
                      runs: int = 3, say=print) -> tuple[object, list[str]]:
    """The latency table the plan prices with, and notes: measured in the profile's runtime where the
    device is this machine (cached per device, runtime, workload and model shape; `measure` False
    skips it, True insists), else the roofline from the datasheet, labelled so."""
    from .device import device_present, measurement_runtime
    from .latency_table import datasheet_table, measure_table
    from .shapes import CalibrationFailed

    notes: list[str] = []
    want = device_present(profile) if measure is None else measure
    if want and model_dir is not None:
        runtime, note = measurement_runtime(profile)
        if note:
            notes.append(note)
        try:
            return measure_table(profile, config, model_dir, runtime, formats, runs=runs, say=say), notes
        except CalibrationFailed as exc:
            if measure:
                raise
            notes.append(f"the latency table could not be measured here ({str(exc).rstrip('.')}); "
                         "latency predicted from the datasheet")
    elif measure is None:
        notes.append(f"the profile's device ({profile.device.name}) is not present here: latency predicted from "
                     "the datasheet")
    return datasheet_table(profile, config, formats), notes


def lever_plan(profile: Profile, model: str | None, measure: bool | None = None, attn_unit: str = "auto",
               round_to: int | None = None, runs: int = 3, formats: list[str] | None = None,
               say=print, measure_dense=None, compensation: str = "auto", max_dropped: int | None = None,
               confirmable: bool = True) -> tuple[Frontier, dict]:
    """Read the model's config, price every lever mix and return the frontier (not yet chosen: the
    caller chooses, by KL when it holds the weights) and the config. `measure_dense(runtime)`, given
    by a caller that holds the weights, measures the real dense export in that runtime ->
    (TTFT s, TPOT s), and a measured table is anchored on it (`AnchoredTable`). `compensation`: the
    width pruning's (does it add biases?). With a table measured here the frontier measures its
    best candidates at their exact shapes when it chooses (`ExactCheck`). `max_dropped`: at most this
    many layers dropped (0 where the weights cannot be held to choose them); `confirmable`: whether a
    plan inside the latency reserve can be confirmed on its export (`confirm.py`), else none is offered."""
    from ..model.loading import read_config
    from ..prune import COMPENSATION
    from .shapes import arch_of

    config, model_dir = read_config(model)
    arch = arch_of(config)
    formats = formats or lever_formats(profile)
    table, notes = latency_table_for(profile, config, model_dir, formats, measure, runs, say)
    if measure_dense is not None and getattr(table, "measured", False):
        runtime = table.key["runtime"]
        ttft, tpot = measure_dense(runtime)
        table = AnchoredTable.on(table, arch, ttft, tpot)
        say(f"plan: the dense export measured in {runtime}: TPOT {tpot * 1e3:.2f} ms, TTFT {ttft * 1e3:.1f} ms; "
            f"the table's predictions are scaled by x{table.tpot_scale:.3f} (TPOT) / x{table.ttft_scale:.3f} (TTFT)")
    comp = COMPENSATION.get(compensation)
    checker = exact_check(table, profile, config, model_dir, CostModel(profile), runs, say)
    frontier = search(profile, arch, table, CostModel(profile), formats, attn_unit, round_to, biases=comp.adds_bias,
                      bias_free=checker is not None and comp.bias_free is not None,
                      marginal=checker is not None and confirmable, max_dropped=max_dropped)
    frontier.notes = (notes + list(getattr(table, "notes", []))
                      + tensor_parallel_notes(arch, tensor_parallel_size(profile), round_to or profile.round_to)
                      + headroom_notes(profile, frontier.marginal))
    frontier.checker = checker
    if not frontier.feasible:
        frontier.notes.append(closest_miss(profile, arch, table, CostModel(profile), formats, attn_unit, round_to,
                                           max_dropped))
    return frontier, config
