"""The CI gate: compare two report.json files (latency, accuracy, the report's own verdict)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..evaluate.verdict import reasons
from .schema import Report

EXIT_PASS = 0
EXIT_VIOLATED = 1
EXIT_BAD_INPUT = 2


def read_report(path: Path) -> Report:
    """A report.json (or the output directory holding it), validated."""
    return Report.read(path)


# the figures the gate compares; a section that is present must hold them as finite numbers
_FIGURES = (("perplexity", "dense"), ("perplexity", "pruned"), ("latency", "measured", "pruned", "ttft_s"),
            ("latency", "measured", "pruned", "tpot_s"), ("latency", "measured", "pruned", "throughput_tok_s"),
            ("accuracy", "lm_eval", "pruned", "cloze_acc"))


def _number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def non_finite_figures(r: dict) -> list[str]:
    """Where a report holds NaN, infinity (written as null), null or text in place of a figure the
    gate compares or a budget line's value."""
    bad = []
    for path in _FIGURES:
        node = r
        for k in path[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict) and path[-1] in node and not _number(node[path[-1]]):
            bad.append(f"{'.'.join(path)} is not a finite number (NaN, infinity, null or text)")
        elif isinstance(node, dict) and path[1] == "measured" and path[-1] not in node:
            bad.append(f"{'.'.join(path)} is missing")  # measured latency without one of its three figures
    for ln in (r.get("budget") or {}).get("lines", []):
        if ln.get("kind") != "not measured" and not _number(ln.get("value")):
            bad.append(f"the budget line {ln.get('line')} has no finite value")
    return bad


def parse_fraction(text: str, option: str) -> float:
    """'5%' -> 0.05, '0.05' -> 0.05; anything else is one clear sentence."""
    s = text.strip()
    try:
        v = float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError:
        raise UserError(f"{option} must be a percentage like 5% or a fraction like 0.05, got '{text}'.") from None
    if not math.isfinite(v):  # NaN would make every comparison false, i.e. pass everything
        raise UserError(f"{option} must be a finite percentage like 5% or a fraction like 0.05, got '{text}'.")
    if not s.endswith("%") and v > 1:
        raise UserError(f"{option} {text} is ambiguous; write {text}% or {v / 100:g}.")
    if v < 0:
        raise UserError(f"{option} must not be negative, got '{text}'.")
    return v


@dataclass
class GateResult:
    """`violations`: rules the report breaks (exit 1); `unjudged`: what could not be judged (exit 2,
    when nothing is violated): another model, no budget section, no common figure, other hosts."""

    violations: list[str]
    checked: list[str]
    unjudged: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return EXIT_VIOLATED if self.violations else EXIT_BAD_INPUT if self.unjudged else EXIT_PASS


SECTIONS = ("latency", "perplexity", "accuracy", "budget")  # what --allow-missing may name


def gate(report: Report | dict, baseline: Report | dict, max_latency_regression: float = 0.05,
         max_accuracy_drop: float = 0.02, check_budget: bool = True, allow_unverified: bool = False,
         allow_missing: tuple[str, ...] = ()) -> GateResult:
    """Compare `report` with `baseline`: measured latency no worse than the allowed regression,
    accuracy no lower than the allowed drop, and (optionally) the report's own budget verdict, which
    must be verified in the profile's runtime on its device unless `allow_unverified`. A section
    (`SECTIONS`) that neither report holds, or that only the report holds, cannot be judged: it is
    named among the unjudged unless `allow_missing` names it (the report lacking what the baseline
    has is a violation)."""
    report = Report.parse(report).as_dict() if isinstance(report, dict) else report.as_dict()
    baseline = Report.parse(baseline).as_dict() if isinstance(baseline, dict) else baseline.as_dict()
    bad, checked, missing = [], [], []
    # a NaN, infinite, null or non-numeric figure is a broken run, never "within limits" (and the
    # comparisons below need numbers)
    broken = [f"{who}: {f}; a broken run never passes"
              for who, r in (("report", report), ("baseline", baseline)) for f in non_finite_figures(r)]
    if broken:
        return GateResult(broken, checked)
    before, base_before = ((r.get("params") or {}).get("before") for r in (report, baseline))
    if before and base_before and before != base_before:
        return GateResult([], checked, [f"the report is of another model than the baseline ({before.get('total')} "
                                        f"against {base_before.get('total')} parameters before pruning)"])
    unjudged = []
    lat, base_lat = (report.get("latency") or {}).get("measured", {}), (baseline.get("latency") or {}).get(
        "measured", {})
    cur, ref = lat.get("pruned"), base_lat.get("pruned")
    if cur and ref:
        where, base_where = (cur.get("device"), cur.get("runtime")), (ref.get("device"), ref.get("runtime"))
        if where != base_where:
            unjudged.append(f"latency: not comparable: measured on {where[0]} in {where[1]}, baseline on "
                            f"{base_where[0]} in {base_where[1]}")
        else:
            for key, name in (("ttft_s", "TTFT"), ("tpot_s", "TPOT")):
                checked.append(name)
                limit = ref[key] * (1 + max_latency_regression)
                if cur[key] > limit:
                    bad.append(f"latency: {name} {cur[key] * 1e3:.2f} ms is {cur[key] / ref[key] - 1:+.1%} against "
                               f"the baseline's {ref[key] * 1e3:.2f} ms (allowed +{max_latency_regression:.1%})")
            checked.append("throughput")
            floor = ref["throughput_tok_s"] * (1 - max_latency_regression)
            if cur["throughput_tok_s"] < floor:
                bad.append(f"latency: throughput {cur['throughput_tok_s']:.2f} tok/s is "
                           f"{cur['throughput_tok_s'] / ref['throughput_tok_s'] - 1:+.1%} against the baseline's "
                           f"{ref['throughput_tok_s']:.2f} tok/s (allowed -{max_latency_regression:.1%})")
    elif ref and not cur:
        bad.append("latency: the baseline has measured latency but the report has none")
    else:
        missing.append("latency")
    p, bp = report.get("perplexity", {}).get("pruned"), baseline.get("perplexity", {}).get("pruned")
    if p is not None and bp is not None:
        checked.append("perplexity")
        if p > bp * (1 + max_accuracy_drop):
            bad.append(f"accuracy: held-out perplexity {p:.3f} is {p / bp - 1:+.1%} against the baseline's {bp:.3f} "
                       f"(allowed +{max_accuracy_drop:.1%})")
    elif bp is not None:
        bad.append("accuracy: the baseline has a held-out perplexity but the report has none")
    else:
        missing.append("perplexity")
    le = ((report.get("accuracy") or {}).get("lm_eval") or {}).get("pruned") or {}
    ble = ((baseline.get("accuracy") or {}).get("lm_eval") or {}).get("pruned") or {}
    le, ble = (x if "cloze_acc" in x else None for x in (le, ble))  # {"skipped": why} has no scores
    if le and ble:
        violations, note = _cloze_rule(le, ble, max_accuracy_drop)
        checked.append("cloze accuracy" + (f" ({note})" if note else ""))
        bad += violations
    elif ble and not le:
        bad.append("accuracy: the baseline has lm-eval scores but the report has none")
    else:
        missing.append("accuracy")
    if check_budget and not report.get("budget") and "budget" not in allow_missing:
        unjudged.append("budget: the report has no budget section (a run with --no-checks); run with the checks, or "
                        "pass --no-budget to gate on the figures alone")
    if check_budget and report.get("budget"):
        checked.append("budget")
        for ln in report["budget"]["lines"]:
            if not ln["ok"] and ln["kind"] != "not measured":  # shown in the report, not judged
                op = "below" if ln["line"] in ("throughput", "task_accuracy") else "above"
                bad.append(f"budget: {ln['line']} {ln['value']:.4g} {ln['unit']} is {op} the profile's limit "
                           f"{ln['limit']:.4g} ({ln['kind']} on {ln['device']})")
    if check_budget and report.get("budget") and not allow_unverified:
        b = report["budget"]
        checked.append("verification")
        if not b.get("verified"):
            why = reasons(b["lines"])
            bad.append(f"budget: not verified in {b.get('target') or 'the profile runtime on its device'}: "
                       f"{why or 'the report records no provenance (written before schema /4)'} "
                       "(--allow-unverified accepts proxy and predicted figures)")
    if not checked:
        unjudged.append("nothing to compare: neither latency nor accuracy figures are in both reports")
    what = {"latency": "measured latency of the pruned model", "perplexity": "held-out perplexity",
            "accuracy": "lm-eval cloze scores"}
    unjudged += [f"{m}: {what[m]} not in both reports (pass --allow-missing {m} to gate without it)"
                 for m in missing if m not in allow_missing]
    return GateResult(bad, checked, unjudged)


def _cloze_rule(le: dict, ble: dict, max_drop: float) -> tuple[list[str], str | None]:
    """The cloze accuracy rule, judged with a 95% confidence interval of the change from the
    baseline (`lm_eval.compare_scores`: paired over the same items when both reports hold per-item
    results on the same item set, else from the two accuracies and their item counts). Allowed: a
    drop of `max_drop` x the baseline's accuracy.
      * the whole interval is below the allowed drop: the drop is beyond it with statistical support;
      * the measured drop is beyond the allowed one but the interval reaches past it: the rule fails
        too, and says that the items cannot resolve the threshold (the smallest drop they resolve);
      * otherwise the rule holds: a measured change within the allowance is not a regression, even
        where the interval is wider than the allowance (identical reports always pass). Where the
        items cannot resolve the threshold, the gate's PASS line says so (the returned note)."""
    from ..evaluate.lm_eval import compare_scores, item_count

    acc, base = le["cloze_acc"], ble["cloze_acc"]
    ch = compare_scores(ble, le)
    if ch is None:
        who = "baseline's" if item_count(ble) is None else "report's"
        return [f"accuracy: the {who} lm-eval cloze accuracy has no item count, so a {max_drop:.1%} drop cannot "
                "be judged; refresh it with this version of fitprune"], None
    allowed = max_drop * base
    lo, hi = ch["ci95"]
    half = (hi - lo) / 2
    paired = ch["method"].startswith("paired")
    items = (f"paired over the same {ch['n']} items" if paired
             else f"{le['cloze_n']} and {ble['cloze_n']} items, not paired")
    rel = f"{acc / base - 1:+.1%}" if base > 0 else "n/a"
    where = (f"change {ch['delta'] * 100:+.1f} points, 95% CI {lo * 100:+.1f} to {hi * 100:+.1f} ({items}); "
             f"allowed -{max_drop:.1%} = -{allowed * 100:.1f} points")
    if hi < -allowed:
        return [f"accuracy: lm-eval cloze accuracy {acc:.3f} is {rel} against the baseline's {base:.3f}: {where}"], None
    n = ch["n"] if paired else min(le["cloze_n"], ble["cloze_n"])
    smallest = f"the smallest drop they resolve is {half / base:.1%}" if base > 0 else "no drop is resolved"
    unresolved = lo < -allowed and half > allowed
    if ch["delta"] < -allowed:
        return [f"accuracy: lm-eval cloze accuracy {acc:.3f} is {rel} against the baseline's {base:.3f}, beyond the "
                f"allowed drop, and {n} cloze items cannot tell whether it is: {where}; {smallest}"
                + ("" if paired else " (reports scored on the same items are compared item by item, far finer)")], None
    return [], (f"{n} items cannot resolve a {max_drop:.1%} drop, {smallest}" if unresolved else None)
