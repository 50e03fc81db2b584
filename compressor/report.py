"""The report a person reads (report.md), its plot (PNG), and the CI gate that compares two
report.json files.

Report schema `fitprune.report/2` (a superset of /1): besides method, params, widths, perplexity
and export, it carries `plan` (the planner's table, every figure predicted), `latency` (measured
on the host in a named runtime, and predicted for the profile's device), `accuracy` (lm-eval
scores, measured) and `budget` (one entry per budget line: value, limit, measured or predicted,
on which device, ok). Every figure says whether it is measured or predicted, and where.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

REPORT_SCHEMA = "fitprune.report/2"

# ---- report.md ----------------------------------------------------------------------------------


def _ms(x: float | None) -> str:
    return "—" if x is None else f"{x * 1e3:.2f} ms"


def _tok(x: float | None) -> str:
    return "—" if x is None else f"{x:.1f} tok/s"


def markdown(r: dict) -> str:
    lines = [f"# fitprune report: {Path(str(r['model'])).name} for profile `{r['profile']}`", ""]
    m, p = r["method"], r["params"]
    plan = r.get("plan") or {}
    if plan.get("rows"):
        how = f"chosen by the planner ({'feasible' if plan['feasible'] else 'infeasible budget, closest ratio'})"
    else:
        how = "given with --ratio"
    lines += [
        f"- Ratio: {m['ratio_requested']:.2f} of decoder weights, {how}; achieved "
        f"{p['achieved_ratio_decoder']:.1%} of the decoder ({p['before']['total']:,} -> {p['after']['total']:,} "
        f"parameters).",
        f"- Method: metric `{m['metric']}`, compensation `{m['compensation']}`, structure `{m['structure']}`, "
        f"widths rounded to {m['round_to']}.",
        f"- Export: {r['export']['format']} (`{r['export']['architecture']}`, {r['export']['dtype']}).", "",
    ]
    b = r.get("budget")
    if b:
        verdict = "**meets every budget line**" if b["passed"] else "**misses at least one budget line**"
        lines += [f"## Budget: {verdict}", "", "| line | value | limit | | kind | device |",
                  "|---|---|---|---|---|---|"]
        for ln in b["lines"]:
            op = ">=" if ln["line"] in ("throughput", "task_accuracy") else "<="
            lines.append(f"| {ln['line']} | {ln['value']:.4g} {ln['unit']} | {op} {ln['limit']:.4g} | "
                         f"{'ok' if ln['ok'] else '**FAIL**'} | {ln['kind']} | {ln['device']} |")
        lines.append("")
    lat = r.get("latency")
    if lat:
        lines += ["## Latency and throughput", ""]
        if not lat["on_profile_device"]:
            lines += [f"> The profile's device ({lat['profile_device']}) is **not** this machine. Measured figures "
                      f"are this host's ({lat['host_device']}); the target's figures are **predicted** by the "
                      "cost model.", ""]
        if lat.get("runtime_note"):
            lines += [f"> Note: {lat['runtime_note']}.", ""]
        lines += ["| figure | model | TTFT | TPOT | throughput | device |", "|---|---|---|---|---|---|"]
        for kind in ("measured", "predicted"):
            for which in ("dense", "pruned"):
                f = (lat.get(kind) or {}).get(which)
                if not f:
                    continue
                dev = f.get("device", "")
                if kind == "measured":
                    dev = f"{dev}, {f.get('runtime', '')} {f.get('dtype', '')}"
                lines.append(f"| {kind} | {which} | {_ms(f['ttft_s'])} | {_ms(f['tpot_s'])} | "
                             f"{_tok(f['throughput_tok_s'])} | {dev} |")
        w = lat["workload"]
        lines += ["", f"Workload: TTFT for a {w['prompt_tokens']}-token prompt at batch 1, TPOT at batch 1, throughput "
                  f"with {w['concurrency']} concurrent sequences of {w['output_tokens']} output tokens.", ""]
    acc = r.get("accuracy") or {}
    ppl = r["perplexity"]
    lines += ["## Accuracy (measured)", "", "| | dense | pruned | device |", "|---|---|---|---|",
              f"| held-out perplexity ({ppl['windows']} x {ppl['seqlen']} tokens) | {ppl['dense']:.3f} | "
              f"{ppl['pruned']:.3f} | {ppl['device']} |"]
    le = acc.get("lm_eval")
    if le and le.get("pruned"):
        d, q = le["dense"], le["pruned"]
        lines += [f"| lm-eval `fitprune_heldout` word perplexity | {d['word_perplexity']:.3f} | "
                  f"{q['word_perplexity']:.3f} | {le['device']} |",
                  f"| lm-eval `fitprune_cloze` acc ({q['cloze_n']} items, chance 0.25) | {d['cloze_acc']:.3f} | "
                  f"{q['cloze_acc']:.3f} | {le['device']} |"]
        v = le.get("pruned_vllm") or {}
        if "word_perplexity" in v:
            lines += [f"| the same tasks on the export in vLLM: word perplexity / cloze acc | | "
                      f"{v['word_perplexity']:.3f} / {v['cloze_acc']:.3f} | {v['device']} |"]
    elif le and le.get("skipped"):
        lines += ["", f"lm-eval tasks skipped: {le['skipped']}"]
    lines.append("")
    if plan.get("rows"):
        lines += ["## Plan (predicted for the profile's device)", "",
                  f"Efficiency: {plan['efficiency']['source']}.", "",
                  "| ratio | params | memory GiB | TTFT | TPOT | throughput | meets budget |",
                  "|---|---|---|---|---|---|---|"]
        for row in plan["rows"]:
            mark = " (chosen)" if row["ratio"] == plan.get("chosen_ratio") else ""
            lines.append(f"| {row['ratio']:.2f}{mark} | {row['params']:,} | {row['memory']['total_gib']:.2f} | "
                         f"{_ms(row['ttft_s'])} | {_ms(row['tpot_s'])} | {_tok(row['throughput_tok_s'])} | "
                         f"{'yes' if row['meets_budget'] else 'no'} |")
        for n in plan.get("notes", []):
            lines.append(f"\nNote: {n}.")
        lines.append("")
    if r.get("plot"):
        lines += [f"![quality and latency against ratio]({r['plot']})", ""]
    return "\n".join(lines)


# ---- the plot -----------------------------------------------------------------------------------


def plot(r: dict, path: Path) -> None:
    """Quality (perplexity, cloze accuracy) and latency (TPOT, TTFT) against the pruning ratio,
    with the budget lines; predicted curves dashed, measured points solid markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratio = r["params"]["achieved_ratio_decoder"]
    fig, (ax_q, ax_l) = plt.subplots(1, 2, figsize=(12, 4.8))
    ppl = r["perplexity"]
    ax_q.plot([0, ratio], [ppl["dense"], ppl["pruned"]], "o-", color="C0",
              label=f"held-out perplexity (measured, {ppl['device']})")
    floor = ppl["dense"] * (1 + r.get("accuracy", {}).get("max_ppl_increase", 0.5))
    ax_q.axhline(floor, color="C0", ls=":", label="perplexity limit (profile's floor)")
    ax_q.set_xlabel("fraction of decoder weights removed")
    ax_q.set_ylabel("perplexity (lower is better)")
    le = (r.get("accuracy") or {}).get("lm_eval") or {}
    if le.get("pruned"):
        ax_a = ax_q.twinx()
        ax_a.plot([0, ratio], [le["dense"]["cloze_acc"], le["pruned"]["cloze_acc"]], "s-", color="C1",
                  label="cloze accuracy (lm-eval, measured)")
        ax_a.axhline(le["dense"]["cloze_acc"] * r["accuracy"]["min_task_accuracy"], color="C1", ls=":",
                     label="accuracy floor")
        ax_a.set_ylabel("cloze accuracy (higher is better)")
        ax_a.set_ylim(0, 1)
        h1, l1 = ax_q.get_legend_handles_labels()
        h2, l2 = ax_a.get_legend_handles_labels()
        ax_q.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper left")
    else:
        ax_q.legend(fontsize=7, loc="upper left")
    ax_q.set_title("quality against ratio")
    ax_q.set_xlim(-0.02, max(0.72, ratio + 0.02))

    plan = r.get("plan") or {}
    lat = r.get("latency") or {}
    if plan.get("rows"):
        xs = [row["ratio"] for row in plan["rows"]]
        ax_l.plot(xs, [row["tpot_s"] * 1e3 for row in plan["rows"]], "--", color="C2",
                  label=f"TPOT predicted ({r['profile']})")
        ax_l.plot(xs, [row["ttft_s"] * 1e3 for row in plan["rows"]], "--", color="C3",
                  label=f"TTFT predicted ({r['profile']})")
        if plan.get("chosen_ratio") is not None:
            ax_l.axvline(plan["chosen_ratio"], color="grey", lw=0.8, label="planned ratio")
    meas = lat.get("measured") or {}
    pts = [(0.0, meas.get("dense")), (ratio, meas.get("pruned"))]
    pts = [(x, f) for x, f in pts if f]
    if pts:
        host = pts[0][1]["device"]
        ax_l.plot([x for x, _ in pts], [f["tpot_s"] * 1e3 for _, f in pts], "o", color="C2",
                  label=f"TPOT measured ({host})")
        ax_l.plot([x for x, _ in pts], [f["ttft_s"] * 1e3 for _, f in pts], "o", color="C3",
                  label="TTFT measured (same host)")
    budget = (r.get("budget") or {}).get("limits", {})
    if budget.get("tpot_ms"):
        ax_l.axhline(budget["tpot_ms"], color="C2", ls=":", label="TPOT budget")
    if budget.get("ttft_ms"):
        ax_l.axhline(budget["ttft_ms"], color="C3", ls=":", label="TTFT budget")
    ax_l.set_yscale("log")
    ax_l.set_xlim(-0.02, max(0.72, ratio + 0.02))
    ax_l.set_xlabel("fraction of decoder weights removed")
    ax_l.set_ylabel("milliseconds (log)")
    ax_l.set_title("latency against ratio")
    ax_l.legend(fontsize=7, loc="best")
    fig.suptitle(f"{Path(str(r['model'])).name} on {r['profile']}: dashed = predicted, markers = measured",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- the gate -----------------------------------------------------------------------------------

EXIT_PASS = 0
EXIT_VIOLATED = 1
EXIT_BAD_INPUT = 2


def read_report(path: Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    if not path.is_file():
        raise UserError(f"The report {path} does not exist.")
    try:
        r = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"The report {path} is not valid JSON.") from exc
    if not isinstance(r, dict) or not str(r.get("schema", "")).startswith("fitprune.report/"):
        raise UserError(f"The file {path} is not a fitprune report (no 'schema: fitprune.report/N').")
    return r


def parse_fraction(text: str, option: str) -> float:
    """'5%' -> 0.05, '0.05' -> 0.05; anything else is one clear sentence."""
    s = text.strip()
    try:
        v = float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError:
        raise UserError(f"{option} must be a percentage like 5% or a fraction like 0.05, got '{text}'.") from None
    if not s.endswith("%") and v > 1:
        raise UserError(f"{option} {text} is ambiguous; write {text}% or {v / 100:g}.")
    if v < 0:
        raise UserError(f"{option} must not be negative, got '{text}'.")
    return v


@dataclass
class GateResult:
    violations: list[str]
    checked: list[str]

    @property
    def exit_code(self) -> int:
        return EXIT_VIOLATED if self.violations else EXIT_PASS


def gate(report: dict, baseline: dict, max_latency_regression: float = 0.05, max_accuracy_drop: float = 0.02,
         check_budget: bool = True) -> GateResult:
    """Compare `report` with `baseline`: measured latency no worse than the allowed regression,
    accuracy no lower than the allowed drop, and (optionally) the report's own budget verdict."""
    bad, checked = [], []
    lat, base_lat = (report.get("latency") or {}).get("measured", {}), (baseline.get("latency") or {}).get(
        "measured", {})
    cur, ref = lat.get("pruned"), base_lat.get("pruned")
    if cur and ref:
        where, base_where = (cur["device"], cur["runtime"]), (ref["device"], ref["runtime"])
        if where != base_where:
            bad.append(f"latency: not comparable: measured on {where[0]} in {where[1]}, baseline on "
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
    p, bp = report.get("perplexity", {}).get("pruned"), baseline.get("perplexity", {}).get("pruned")
    if p is not None and bp is not None:
        checked.append("perplexity")
        if p > bp * (1 + max_accuracy_drop):
            bad.append(f"accuracy: held-out perplexity {p:.3f} is {p / bp - 1:+.1%} against the baseline's {bp:.3f} "
                       f"(allowed +{max_accuracy_drop:.1%})")
    le = ((report.get("accuracy") or {}).get("lm_eval") or {}).get("pruned")
    ble = ((baseline.get("accuracy") or {}).get("lm_eval") or {}).get("pruned")
    if le and ble:
        checked.append("cloze accuracy")
        if le["cloze_acc"] < ble["cloze_acc"] * (1 - max_accuracy_drop):
            bad.append(f"accuracy: lm-eval cloze accuracy {le['cloze_acc']:.3f} is "
                       f"{le['cloze_acc'] / ble['cloze_acc'] - 1:+.1%} against the baseline's {ble['cloze_acc']:.3f} "
                       f"(allowed -{max_accuracy_drop:.1%})")
    elif ble and not le:
        bad.append("accuracy: the baseline has lm-eval scores but the report has none")
    if check_budget and report.get("budget"):
        checked.append("budget")
        for ln in report["budget"]["lines"]:
            if not ln["ok"]:
                op = "below" if ln["line"] in ("throughput", "task_accuracy") else "above"
                bad.append(f"budget: {ln['line']} {ln['value']:.4g} {ln['unit']} is {op} the profile's limit "
                           f"{ln['limit']:.4g} ({ln['kind']} on {ln['device']})")
    if not checked:
        bad.append("nothing to compare: neither latency nor accuracy figures are in both reports")
    return GateResult(bad, checked)


# ---- the pipeline's hook ------------------------------------------------------------------------


def finish(report: dict, export_dir: Path, profile, plan, prep, tasks_dense: dict, tasks_pruned: dict,
           say=print, task_dir: Path | None = None) -> None:
    """After export: measure latency, gather accuracy, judge every budget line, draw the plot.
    Fills report['latency'], ['accuracy'], ['budget'] and writes report.png beside the weights.
    With `task_dir` the lm-eval tasks also run on the export through lm-eval's vLLM backend
    (accuracy.lm_eval.pruned_vllm: the weights as vLLM serves them)."""
    from profiles.costmodel import Arch

    from . import checks
    from .planner import arch_of, read_config

    config, dense_dir = read_config(None if prep.loaded.source.startswith("embedded:") else prep.loaded.source)
    dense_arch = arch_of(config)
    pruned_arch = Arch.from_config(json.loads((export_dir / "config.json").read_text()))
    lat = checks.latency(export_dir, profile, plan, dense_arch, pruned_arch, dense_dir, say=say)
    le = {"dense": tasks_dense, "pruned": tasks_pruned, "device": report["perplexity"]["device"],
          "tasks": [checks.TASK_PPL, checks.TASK_CLOZE], "backend": "lm_eval.simple_evaluate, HF model in process",
          "text": "builtin held-out region"}
    if tasks_pruned.get("skipped"):
        le = {"skipped": tasks_pruned["skipped"]}
    elif task_dir is not None:
        le["pruned_vllm"] = checks.task_scores_vllm(export_dir, task_dir, say=say)
    report["latency"] = lat
    report["accuracy"] = {"lm_eval": le, "max_ppl_increase": profile.accuracy.max_ppl_increase,
                          "min_task_accuracy": profile.accuracy.min_task_accuracy}
    lines = checks.budget_lines(profile, lat["on_profile_device"], lat["measured"].get("pruned"),
                                lat["predicted"]["pruned"], {"perplexity": report["perplexity"], "lm_eval": le})
    report["budget"] = {"passed": all(ln["ok"] for ln in lines), "lines": lines,
                        "limits": profile.budget.model_dump(), "accuracy_floor": profile.accuracy.model_dump()}
    for ln in lines:
        say(f"budget {ln['line']}: {ln['value']:.4g} {ln['unit']} (limit {ln['limit']:.4g}, {ln['kind']} on "
            f"{ln['device']}): {'ok' if ln['ok'] else 'FAIL'}")
    try:
        plot(report, export_dir / "report.png")
        report["plot"] = "report.png"
    except ImportError:
        say("no plot: matplotlib is not installed (extra 'eval')")
