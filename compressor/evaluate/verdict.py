"""The verdict: one entry per budget line of the profile, its limit, the figure it is judged on,
where that figure comes from, and whether it holds.

Every line says how its figure was obtained (`kind`), in which runtime and on which device, and
whether that is the profile's own (`verified`):

- `measured`: measured in the profile's runtime on the profile's device. Verified.
- `proxy`: measured on the profile's device but in another runtime (the profile's runtime is
  missing here, failed on this export, or `--runtime` asked for another). Not verified.
- `predicted`: the cost model's figure for the profile's device (this host is not that device,
  or the export is too big to run here). Not verified.
- `computed`: the memory line: weights of the pruned architecture in the profile's dtype, the KV
  cache at the workload's context and concurrency, and the profile's runtime overhead; arithmetic
  that no runtime measures and that does not depend on where the run happens. Verified.
- `not measured`: no figure (e.g. lm-eval was skipped). Not verified.

Accuracy lines are measured on the pruned weights in the reference implementation (transformers
in this process); they are properties of the weights, labelled with runtime and device, and
count as verified.

The run's exit code follows the verdict: 0 every line holds and every line is verified; 1 at least
one line is missed; 5 every line that has a figure holds, but some are not verified in the
profile's runtime on its device.
"""

from __future__ import annotations

from profiles import Profile

NOT_MEASURED = "not measured"
MEASURED, PROXY, PREDICTED, COMPUTED = "measured", "proxy", "predicted", "computed"
VERIFIED_KINDS = (MEASURED, COMPUTED)

EXIT_MEETS, EXIT_MISSES, EXIT_UNVERIFIED = 0, 1, 5


def passed(lines: list[dict]) -> bool:
    """Every line that has a figure holds (a line without one is reported, not judged)."""
    return all(ln["ok"] for ln in lines if ln["kind"] != NOT_MEASURED)


def verified(lines: list[dict]) -> bool:
    """Every line's figure was measured in the profile's runtime on its device (or is computed)."""
    return all(ln.get("verified", False) for ln in lines)


def exit_code(passed_: bool, verified_: bool) -> int:
    """0 every line holds and is verified; 1 a line is missed; 5 every line holds but not all are verified."""
    return EXIT_MISSES if not passed_ else EXIT_MEETS if verified_ else EXIT_UNVERIFIED


def target(profile: Profile) -> str:
    """The profile's runtime and device in words, e.g. 'vllm on 4 x NVIDIA A10G'."""
    n = profile.device.count
    return f"{profile.runtime} on {f'{n} x ' if n > 1 else ''}{profile.device.name}"


def reasons(lines: list[dict]) -> str:
    """Why lines are not verified, lines with the same reason together: 'ttft, tpot: measured in torch ...'."""
    by_why: dict[str, list[str]] = {}
    for ln in lines:
        if not ln.get("verified", False):
            by_why.setdefault(ln.get("why") or ln["kind"], []).append(ln["line"])
    return "; ".join(f"{', '.join(names)}: {why}" for why, names in by_why.items())


def summary(lines: list[dict], profile: Profile) -> tuple[str, int]:
    """The verdict in words and the run's exit code."""
    why = reasons(lines)
    if not passed(lines):
        missed = ", ".join(ln["line"] for ln in lines if not ln["ok"] and ln["kind"] != NOT_MEASURED)
        text = f"misses at least one budget line ({missed})"
        return (text + (f"; not verified in {target(profile)}: {why}" if why else "")), EXIT_MISSES
    if why:
        return f"not verified in {target(profile)}: {why}", EXIT_UNVERIFIED
    return f"meets every budget line, verified in {target(profile)}", EXIT_MEETS


def describe(ln: dict) -> str:
    if ln["kind"] == NOT_MEASURED:
        return f"budget {ln['line']}: not measured ({ln.get('reason', '')})"
    where = f"{ln['kind']} in {ln['runtime']} on {ln['device']}" if ln.get("runtime") else \
        f"{ln['kind']} on {ln['device']}"
    ci = f", 95% CI {ln['ci95'][0]:.3g}-{ln['ci95'][1]:.3g} over {ln.get('n')} items" if ln.get("ci95") else ""
    return (f"budget {ln['line']}: {ln['value']:.4g} {ln['unit']}{ci} (limit {ln['limit']:.4g}, {where}"
            f"{'' if ln.get('verified') else ', NOT VERIFIED'}): {'ok' if ln['ok'] else 'FAIL'}")


def _latency_source(profile: Profile, lat: dict) -> tuple[dict, str, str, str | None]:
    """The figures the latency lines are judged on: (figures, kind, runtime, why not verified)."""
    m = (lat.get("measured") or {}).get("pruned")
    pred = lat["predicted"]["pruned"]
    if m and lat["on_profile_device"]:
        if m["runtime"] == profile.runtime:
            return m, MEASURED, m["runtime"], None
        return m, PROXY, m["runtime"], lat.get("runtime_note") or f"measured in {m['runtime']} as a proxy"
    if m:
        why = f"predicted: this host ({m['device']}) is not the profile's device"
    else:
        why = f"predicted: not measured on this host ({(lat.get('measured') or {}).get('skipped', 'no measurement')})"
    return pred, PREDICTED, profile.runtime, why


def budget_lines(profile: Profile, lat: dict, accuracy: dict) -> list[dict]:
    """One entry per budget line: its limit, the figure it is judged on (measured in the profile's
    runtime on the profile's device where possible; else a labelled proxy or the prediction for
    that device), where the figure comes from, and whether it holds."""
    b, lines = profile.budget, []

    def add(name: str, value: float, limit: float, unit: str, ok: bool, kind: str, runtime: str | None,
            device: str, why: str | None = None):
        lines.append({"line": name, "value": value, "limit": limit, "unit": unit, "ok": ok, "kind": kind,
                      "runtime": runtime, "device": device, "verified": kind in VERIFIED_KINDS,
                      **({"why": why} if why else {})})

    pred = lat["predicted"]["pruned"]
    mem, avail = pred["memory_gib"], pred["memory"]["available_gib"]
    add("memory", mem, avail, "GiB", mem <= avail, COMPUTED, profile.runtime, pred["device"])
    src, kind, runtime, why = _latency_source(profile, lat)
    for name, key, limit, scale, unit in (("ttft", "ttft_s", b.ttft_ms, 1e3, "ms"),
                                          ("tpot", "tpot_s", b.tpot_ms, 1e3, "ms")):
        if limit is not None:
            v = src[key] * scale
            add(name, v, limit, unit, v <= limit, kind, runtime, src["device"], why)
    if b.min_throughput_tok_s is not None:
        v = src["throughput_tok_s"]
        add("throughput", v, b.min_throughput_tok_s, "tok/s", v >= b.min_throughput_tok_s, kind, runtime,
            src["device"], why)
    ppl = accuracy.get("perplexity")
    if ppl:
        inc = ppl["pruned"] / ppl["dense"] - 1
        add("perplexity_increase", inc, profile.accuracy.max_ppl_increase, "relative",
            inc <= profile.accuracy.max_ppl_increase, MEASURED, "torch (reference)", ppl["device"])
    tasks = accuracy.get("lm_eval")
    if tasks and tasks.get("skipped"):  # said, never silently dropped; it cannot pass or fail the budget
        lines.append({"line": "task_accuracy", "value": None, "limit": profile.accuracy.min_task_accuracy,
                      "unit": "relative to dense", "ok": False, "kind": NOT_MEASURED, "runtime": None, "device": "",
                      "verified": False, "reason": tasks["skipped"], "why": f"not measured ({tasks['skipped']})"})
    elif tasks and tasks.get("dense") and tasks.get("pruned"):
        d, p = tasks["dense"]["cloze_acc"], tasks["pruned"]["cloze_acc"]
        rel = p / d if d > 0 else 1.0
        add("task_accuracy", rel, profile.accuracy.min_task_accuracy, "relative to dense",
            rel >= profile.accuracy.min_task_accuracy, MEASURED, "torch (reference)", tasks["device"])
        change = tasks.get("change") or {}
        if change.get("ratio_ci95"):  # the paired 95% interval over the same items (evaluate/lm_eval.py)
            lines[-1].update(ci95=list(change["ratio_ci95"]), n=change.get("n"))
    return lines
