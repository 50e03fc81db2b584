"""The verdict: one entry per budget line of the profile, its limit, the figure it is judged on
(measured on the profile's device where possible, else predicted for it), and whether it holds."""

from __future__ import annotations

from profiles import Profile

NOT_MEASURED = "not measured"


def passed(lines: list[dict]) -> bool:
    """Every line that has a figure holds (a line without one is reported, not judged)."""
    return all(ln["ok"] for ln in lines if ln["kind"] != NOT_MEASURED)


def describe(ln: dict) -> str:
    if ln["kind"] == NOT_MEASURED:
        return f"budget {ln['line']}: not measured ({ln.get('reason', '')})"
    return (f"budget {ln['line']}: {ln['value']:.4g} {ln['unit']} (limit {ln['limit']:.4g}, {ln['kind']} on "
            f"{ln['device']}): {'ok' if ln['ok'] else 'FAIL'}")


def budget_lines(profile: Profile, on_device: bool, measured: dict | None, predicted_target: dict,
                 accuracy: dict) -> list[dict]:
    """One entry per budget line: its limit, the figure it is judged on (measured on the profile's
    device where possible, else predicted for it), and whether it holds."""
    b, lines = profile.budget, []
    src = measured if (on_device and measured) else predicted_target

    def add(name: str, value: float, limit: float, unit: str, ok: bool, kind: str, device: str):
        lines.append({"line": name, "value": value, "limit": limit, "unit": unit, "ok": ok, "kind": kind,
                      "device": device})

    mem = predicted_target["memory_gib"]
    avail = predicted_target["memory"]["available_gib"]
    add("memory", mem, avail, "GiB", mem <= avail, "predicted", predicted_target["device"])
    for name, key, limit, scale, unit in (("ttft", "ttft_s", b.ttft_ms, 1e3, "ms"),
                                          ("tpot", "tpot_s", b.tpot_ms, 1e3, "ms")):
        if limit is not None:
            v = src[key] * scale
            add(name, v, limit, unit, v <= limit, src["kind"], src["device"])
    if b.min_throughput_tok_s is not None:
        v = src["throughput_tok_s"]
        add("throughput", v, b.min_throughput_tok_s, "tok/s", v >= b.min_throughput_tok_s, src["kind"], src["device"])
    ppl = accuracy.get("perplexity")
    if ppl:
        inc = ppl["pruned"] / ppl["dense"] - 1
        add("perplexity_increase", inc, profile.accuracy.max_ppl_increase, "relative",
            inc <= profile.accuracy.max_ppl_increase, "measured", ppl["device"])
    tasks = accuracy.get("lm_eval")
    if tasks and tasks.get("skipped"):  # said, never silently dropped; it cannot pass or fail the budget
        lines.append({"line": "task_accuracy", "value": None, "limit": profile.accuracy.min_task_accuracy,
                      "unit": "relative to dense", "ok": False, "kind": NOT_MEASURED, "device": "",
                      "reason": tasks["skipped"]})
    elif tasks and tasks.get("dense") and tasks.get("pruned"):
        d, p = tasks["dense"]["cloze_acc"], tasks["pruned"]["cloze_acc"]
        rel = p / d if d > 0 else 1.0
        add("task_accuracy", rel, profile.accuracy.min_task_accuracy, "relative to dense",
            rel >= profile.accuracy.min_task_accuracy, "measured", tasks["device"])
    return lines


