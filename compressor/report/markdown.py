"""report.md: the report a person reads."""

from __future__ import annotations

from pathlib import Path

from ..evaluate.verdict import reasons
from .schema import Report


def _ms(x: float | None) -> str:
    return "—" if x is None else f"{x * 1e3:.2f} ms"


def _spread(f: dict, name: str) -> str:
    """'12.30 ms (11.90-13.10 over 5 runs)' where the runtime recorded every run, else the median."""
    lo, hi, runs = f.get(f"{name}_min_s"), f.get(f"{name}_max_s"), f.get(f"{name}_runs_s")
    if lo is None or hi is None:
        return _ms(f[f"{name}_s"])
    return f"{_ms(f[f'{name}_s'])} ({lo * 1e3:.2f}-{hi * 1e3:.2f} over {len(runs or [])} runs)"


def _acc(scores: dict) -> str:
    ci = scores.get("cloze_ci95")
    return f"{scores['cloze_acc']:.3f}" + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else "")


def _tok(x: float | None) -> str:
    return "—" if x is None else f"{x:.1f} tok/s"


def _verdict(b: dict) -> str:
    """The verdict heading; reports before schema /4 carry no `verdict`: said from `passed`."""
    if b.get("verdict"):
        return b["verdict"]
    return ("meets every budget line that has a figure" if b["passed"] else "misses at least one budget line") + \
        " (provenance not recorded: not verified)"


def _lever_plan(plan: dict) -> list[str]:
    """The lever frontier: per (format, layers dropped) the least width that meets the budget."""
    chosen, missed = plan.get("chosen") or {}, plan.get("missed_on_export") or {}
    lines = [f"## Plan ({plan.get('ratio_source') or 'every lever'})", "",
             f"Latency: {plan['latency_source']}. Quality: KL to the dense model on "
             f"{plan.get('kl_on', 'validation text')}. Choice: {plan.get('rule') or 'none'}.", "",
             "| levers | decoder removed | memory GiB | TTFT | TPOT | latency from | KL | |",
             "|---|---|---|---|---|---|---|---|"]
    for c in plan.get("frontier", []):
        mark = ("chosen" if c["levers"] == chosen.get("levers") else
                "missed on its export" if c["levers"] == missed.get("levers") else
                "inside the reserve" if c.get("marginal") else "")
        kl = "-" if c.get("kl") is None else f"{c['kl']:.4f}"
        lines.append(f"| {c['levers']} | {c['decoder_removed']:.1%} | {c['memory']['total_gib']:.2f} | "
                     f"{_ms(c['ttft_s'])} | {_ms(c['tpot_s'])} | {c['latency_from']} | {kl} | {mark} |")
    lines += [f"\nNote: {n}." for n in plan.get("notes", [])]
    return [*lines, ""]


def markdown(report: Report | dict) -> str:
    r = report.as_dict() if isinstance(report, Report) else report
    lines = [f"# fitprune report: {Path(str(r['model'])).name} for profile `{r['profile']}`", ""]
    m, p = r["method"], r["params"]
    plan = r.get("plan") or {}
    if plan.get("frontier") is not None and plan.get("chosen"):
        how = f"chosen by the lever plan: {plan['chosen']['levers']} ({plan['rule']})"
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
        lines += [f"## Budget: **{_verdict(b)}**", "",
                  "| line | value | limit | | kind | runtime | device | verified |",
                  "|---|---|---|---|---|---|---|---|"]
        for ln in b["lines"]:
            op = ">=" if ln["line"] in ("throughput", "task_accuracy") else "<="
            if ln["kind"] == "not measured":
                lines.append(f"| {ln['line']} | not measured | {op} {ln['limit']:.4g} | | {ln.get('reason', '')} | | | "
                             "no |")
                continue
            lines.append(f"| {ln['line']} | {ln['value']:.4g} {ln['unit']} | {op} {ln['limit']:.4g} | "
                         f"{'ok' if ln['ok'] else '**FAIL**'} | {ln['kind']} | {ln.get('runtime') or ''} | "
                         f"{ln['device']} | {'yes' if ln.get('verified') else '**no**'} |")
        if not b.get("verified"):
            lines += ["", f"Not verified: {reasons(b['lines'])}."]
        lines.append("")
    lat = r.get("latency")
    if lat:
        lines += ["## Latency and throughput", ""]
        if not lat["on_profile_device"]:
            lines += [f"> The profile's device ({lat['profile_device']}) is **not** this machine. Measured figures "
                      f"are this host's ({lat.get('host_device', 'none taken')}); the target's figures are "
                      "**predicted** by the cost model.", ""]
        if lat.get("runtime_note"):
            lines += [f"> Note: {lat['runtime_note']}.", ""]
        if (lat.get("measured") or {}).get("skipped"):
            lines += [f"> Not measured on this host: {lat['measured']['skipped']}.", ""]
        lines += ["| figure | model | TTFT | TPOT | throughput | runtime | device |", "|---|---|---|---|---|---|---|"]
        for kind in ("measured", "predicted"):
            for which in ("dense", "pruned"):
                f = (lat.get(kind) or {}).get(which)
                if not isinstance(f, dict):
                    continue
                dev, rt = f.get("device", ""), f.get("runtime", "")
                if kind == "measured":
                    rt = f"{rt} {f.get('dtype', '')}" + ("" if rt == lat.get("profile_runtime", rt) else " (proxy)")
                lines.append(f"| {kind} | {which} | {_spread(f, 'ttft')} | {_spread(f, 'tpot')} | "
                             f"{_tok(f['throughput_tok_s'])} | {rt} | {dev} |")
        w = lat["workload"]
        lines += ["", f"Workload: TTFT for a {w['prompt_tokens']}-token prompt at batch 1, TPOT at batch 1, throughput "
                  f"with {w['concurrency']} concurrent sequences of {w['output_tokens']} output tokens.", ""]
    acc = r.get("accuracy") or {}
    ppl = r["perplexity"]
    lines += ["## Accuracy (measured)", "", "| | dense | pruned | device |", "|---|---|---|---|",
              f"| held-out perplexity, in-domain ({ppl['windows']} x {ppl['seqlen']} tokens of the calibration text's "
              f"stream) | {ppl['dense']:.3f} | {ppl['pruned']:.3f} | {ppl['device']} |"]
    cd = ppl.get("cross_domain")
    if cd:
        lines += [f"| **cross-domain perplexity** (geometric mean of {len(cd['domains'])} domains unlike the "
                  f"calibration text, {cd['windows']} x {cd['seqlen']} tokens each) | {cd['dense']:.3f} | "
                  f"{cd['pruned']:.3f} | {ppl['device']} |"]
        lines += [f"| &nbsp;&nbsp;{name}: {d['description']} | {d['dense']:.3f} | {d['pruned']:.3f} | |"
                  for name, d in cd["domains"].items()]
    le = acc.get("lm_eval")
    if le and le.get("pruned"):
        d, q = le["dense"], le["pruned"]
        lines += [f"| lm-eval `fitprune_heldout` word perplexity | {d['word_perplexity']:.3f} | "
                  f"{q['word_perplexity']:.3f} | {le['device']} |",
                  f"| lm-eval `fitprune_cloze` acc ({q['cloze_n']} items, chance 0.25; 95% CI) | {_acc(d)} | "
                  f"{_acc(q)} | {le['device']} |"]
        ch = le.get("change") or {}
        if ch.get("ci95"):
            lines += [f"| cloze change, paired over the same {ch.get('n')} items | | {ch['delta']:+.3f} "
                      f"({ch['ci95'][0]:+.3f} to {ch['ci95'][1]:+.3f}) | |"]
        v = le.get("pruned_vllm") or {}
        if "word_perplexity" in v:
            lines += [f"| the same tasks on the export in vLLM: word perplexity / cloze acc | | "
                      f"{v['word_perplexity']:.3f} / {v['cloze_acc']:.3f} | {v['device']} |"]
    elif le and le.get("skipped"):
        lines += ["", f"lm-eval tasks skipped: {le['skipped']}"]
    lines.append("")
    rec = r.get("recovery")
    if rec:
        b = rec["before"]
        cross = f", cross-domain {b['cross_domain_perplexity']:.3f}" if b.get("cross_domain_perplexity") else ""
        lr = f", learning rate {rec['lr']:g}" if rec.get("lr") else ""
        lines += ["## Recovery (distillation from the dense model)", "",
                  f"{rec['tokens']:,} training tokens ({rec['mode']}{lr}; {rec['unique_tokens']:,} unique: "
                  f"{rec['text']}) in {rec['seconds']:.0f} s, peak RSS {rec['peak_rss_mib']:.0f} MiB; KL to the "
                  f"dense model {rec['loss_first']:.4f} -> {rec['loss_last']:.4f}. Before recovery: held-out "
                  f"perplexity {b['heldout_perplexity']:.3f}{cross}; the pruned figures above are after it.", ""]
    if plan.get("frontier") is not None:
        lines += _lever_plan(plan)
    if r.get("plot"):
        lines += [f"![quality and latency against ratio]({r['plot']})", ""]
    return "\n".join(lines)


