"""Latency and throughput of the export: measured in the profile's runtime on this machine, and
predicted for the profile's device.

When the profile's runtime is missing here or fails on the export, the run says so in one console
line and measures in torch as a labelled proxy; `--runtime NAME` asks for a proxy on purpose. A
proxy's figures never verify a budget line (evaluate/verdict.py)."""

from __future__ import annotations

from pathlib import Path

from profiles import Profile
from profiles.costmodel import Arch, CostModel

from ..budget.device import device_present, measurement_runtime, open_runtime
from ..errors import UserError


def measure(path: Path, profile: Profile, runtime: str, runs: int = 3) -> dict:
    """TTFT / TPOT / throughput of the export at `path` for the profile's workload, measured."""
    from runtimes.base import RuntimeUnavailable

    w = profile.workload
    threads = profile.device.threads if profile.device.kind == "cpu" else None
    try:
        with open_runtime(runtime, path, profile.dtype, threads) as rt:
            m = rt.measure(prompt_tokens=w.prompt_tokens, output_tokens=w.output_tokens,
                           concurrency=w.concurrency, runs=runs, warmup=1)
    except RuntimeUnavailable as exc:
        raise UserError(f"Cannot measure {path} in {runtime}: {exc}") from exc
    return {**m.as_dict(), "kind": "measured"}


def _does_not_fit(export_dir: Path) -> str | None:
    """Why the export cannot be measured in this host's memory (a runtime holds all of it), or None."""
    from ..memory import available_bytes

    size = sum(f.stat().st_size for f in Path(export_dir).glob("*.safetensors"))
    free = available_bytes()
    if size * 1.2 > free:
        return (f"the export ({size / 2**30:.1f} GiB of weights) does not fit in this host's free memory "
                f"({free / 2**30:.1f} GiB); the budget is judged on the predicted figures")
    return None


def predicted(cost: CostModel, arch: Arch, device: str, prediction=None) -> dict:
    """The cost model's prediction for `arch`, or `prediction` where a plan priced it already (the lever
    plan's latency table, in its weight format)."""
    p = prediction or cost.predict(arch)
    return {"ttft_s": p.ttft_s, "tpot_s": p.tpot_s, "throughput_tok_s": p.throughput_tok_s,
            "memory_gib": p.memory.total_gib, "memory": p.as_dict()["memory"], "kind": "predicted",
            "runtime": cost.profile.runtime,
            "device": device, "efficiency": p.efficiency}


def choose_runtime(profile: Profile, requested: str | None, say=print) -> tuple[str, str | None]:
    """The runtime to measure in and, when it is not the profile's, why (said on the console)."""
    from runtimes.base import RuntimeUnavailable, get_runtime

    if requested:
        try:
            get_runtime(requested).check_available()
        except RuntimeUnavailable as exc:
            raise UserError(f"--runtime {requested} cannot be used here: {exc}") from exc
        if requested == profile.runtime:
            return requested, None
        note = f"--runtime {requested} asked for a proxy of the profile's runtime '{profile.runtime}'"
    else:
        requested, note = measurement_runtime(profile)
    if note:
        say(f"[yellow]warning:[/] {note}; latency is measured in {requested} as a proxy, and the verdict will be "
            f"'not verified'")
    return requested, note


def latency(export_dir: Path, profile: Profile, plan, dense_arch: Arch, pruned_arch: Arch, dense_dir: Path | None,
            say=print, runtime: str | None = None) -> dict:
    """Measure the export and the dense model in the profile's runtime (or `runtime`; torch,
    labelled a proxy, where the profile's is missing or fails); and predict both for the profile's
    device (the pruned one as the plan predicted it, where there is a plan)."""
    runtime, note = choose_runtime(profile, runtime, say)
    on_device = device_present(profile)
    cost = CostModel(profile)
    target = f"{profile.device.name} x{profile.device.count} ({profile.name}, {profile.runtime})"
    res = {"runtime": runtime, "runtime_note": note, "on_profile_device": on_device,
           "profile_device": profile.device.name, "profile_runtime": profile.runtime,
           "workload": profile.workload.model_dump(),
           "measured": {}, "predicted": {"dense": predicted(cost, dense_arch, target),
                                         "pruned": predicted(cost, pruned_arch, target,
                                                             getattr(plan, "prediction", None))}}
    too_big = _does_not_fit(export_dir)
    if too_big:
        res["measured"]["skipped"] = too_big
        say(f"latency not measured on this host: {too_big}")
        return res
    say(f"measuring the export in {runtime} ({profile.workload.prompt_tokens} prompt + "
        f"{profile.workload.output_tokens} output tokens)")
    try:
        res["measured"]["pruned"] = measure(export_dir, profile, runtime)
    except Exception as exc:  # a runtime that fails on this export: say so, measure in torch as a proxy
        if runtime == "torch":
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        res["runtime_note"] = f"{runtime} failed on this export ({first[:200]}); measured in torch as a proxy"
        say(f"[yellow]warning:[/] {res['runtime_note']}; the verdict will be 'not verified'")
        runtime = res["runtime"] = "torch"
        res["measured"]["pruned"] = measure(export_dir, profile, runtime)
    if dense_dir is not None:
        try:
            res["measured"]["dense"] = measure(dense_dir, profile, runtime)
        except Exception as exc:  # the dense checkpoint in this runtime is a comparison, not the product
            res["measured"]["dense_error"] = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    res["host_device"] = res["measured"]["pruned"]["device"]
    return res
