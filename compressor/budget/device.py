"""The device at hand: is it the profile's device, which runtime measures on it, and opening an
export in that runtime (ONNX Runtime gets an ONNX export of a Hugging Face directory first)."""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from profiles import Profile

from ..errors import UserError


@contextlib.contextmanager
def open_runtime(runtime: str, path: Path, dtype: str, threads: int | None):
    """`runtimes.base.load_runtime` on a Hugging Face directory. ONNX Runtime serves an ONNX export,
    so for it the directory is first exported (`exporters.onnx`, KV cache) into a temporary folder."""
    from runtimes.base import load_runtime

    path = Path(path)
    if runtime != "onnxruntime" or not (path / "config.json").is_file() or any(path.glob("*.onnx")):
        with load_runtime(runtime, path, dtype=dtype, threads=threads) as rt:
            yield rt
        return
    import torch

    from exporters.onnx import export_onnx

    from .. import tempdirs
    from ..model.loading import load

    tmp = tempdirs.make("fitprune-onnx-")
    try:
        loaded = load(str(path), getattr(torch, dtype), tokenizer_required=False)
        model, tokenizer = loaded.model, loaded.tokenizer
        export_onnx(model, tokenizer, tmp, dtype, optimize=False)
        del model
        with load_runtime(runtime, tmp, dtype=dtype, threads=threads) as rt:
            yield rt
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def device_match(profile: Profile, host: list[tuple[str, int]] | None = None) -> tuple[bool, str]:
    """Is the profile's device the one this process runs on, and a sentence saying what was
    compared. A CPU profile matches a host without CUDA. A GPU profile matches when the first
    `device.count` GPUs are all the profile's product and memory class (`gpus.identify`: exact
    model, never a shared word; an unknown GPU is no profile's device). `host`: (name, total memory
    bytes) per GPU, as `gpus.host_gpus()` reads them from torch (the default)."""
    from profiles.gpus import host_gpus, match

    if host is None:
        host = host_gpus()
    if profile.device.kind == "cpu":
        if host:
            return False, f"the profile's device is a CPU and this host has a GPU ({host[0][0]})"
        return True, "the profile's device is a CPU and this host has no GPU"
    return match(profile.device.name, profile.device.memory_gib, profile.device.count, host)


def device_present(profile: Profile, host: list[tuple[str, int]] | None = None) -> bool:
    """`device_match(profile, host)` without the sentence."""
    return device_match(profile, host)[0]


def measurement_runtime(profile: Profile) -> tuple[str, str | None]:
    """The runtime to measure in: the profile's when it works here, else torch, with a note saying so."""
    from runtimes.base import RuntimeUnavailable, get_runtime

    try:
        get_runtime(profile.runtime).check_available()
        return profile.runtime, None
    except RuntimeUnavailable as exc:
        if profile.runtime == "torch":
            raise UserError(f"The torch runtime is not usable here: {exc}") from exc
        why = str(exc).rstrip(".")
        return "torch", f"the profile's runtime '{profile.runtime}' is not available here ({why}); measured in torch"


def _batch1(rt, prompt_tokens: int, output_tokens: int, pairs: list[tuple[float, float]], extra: dict | None = None):
    """A batch-1 Measurement from per-run (TTFT, TPOT) pairs: medians and the runs themselves."""
    import statistics

    from runtimes.base import Measurement

    ttfts, tpots = [a for a, _ in pairs], [b for _, b in pairs]
    tpot = statistics.median(tpots)
    return Measurement(runtime=rt.name, device=rt.device, dtype=rt.dtype, prompt_tokens=prompt_tokens,
                       output_tokens=output_tokens, concurrency=1, ttft_s=statistics.median(ttfts), tpot_s=tpot,
                       throughput_tok_s=1 / tpot, runs=len(pairs), warmup=1, ttft_runs_s=tuple(ttfts),
                       tpot_runs_s=tuple(tpots),
                       extra={"throughput": "batch 1 (1 / TPOT); the workload's concurrency was not measured",
                              **(extra or {})})


def measure_batch1(rt, prompt_tokens: int, output_tokens: int, runs: int):
    """TTFT and TPOT at batch 1 (what the fit needs; throughput is predicted from them): medians
    and per-run values of `runs` streamed requests after one untimed one, timed as `Runtime.measure`
    times them (TTFT and TPOT of each run from the per-token arrival times of one request)."""
    from runtimes.base import benchmark_prompt

    prompt = benchmark_prompt(rt.tokenizer, prompt_tokens)
    rt.stream(prompt, output_tokens)  # warm-up
    return _batch1(rt, prompt_tokens, output_tokens, [rt.timed_request(prompt, output_tokens) for _ in range(runs)])


def measure_paired(reference, rt, prompt_tokens: int, output_tokens: int, runs: int):
    """`measure_batch1` of two loaded models in turn, request by request (reference, rt, reference,
    rt, ...), so that a host whose speed swings during the measurement (this shared VM's did by 40%
    between runs) moves both alike: the ratio of the two medians is what the comparison should
    rest on. -> (reference's Measurement, rt's Measurement). Both use the reference's tokenizer."""
    from runtimes.base import benchmark_prompt

    prompt = benchmark_prompt(reference.tokenizer, prompt_tokens)
    reference.stream(prompt, output_tokens)  # warm-up, both
    rt.stream(prompt, output_tokens)
    ref_runs, runs_ = [], []
    for _ in range(runs):
        ref_runs.append(reference.timed_request(prompt, output_tokens))
        runs_.append(rt.timed_request(prompt, output_tokens))
    paired = {"paired": "measured request by request in turn with the other model"}
    return (_batch1(reference, prompt_tokens, output_tokens, ref_runs, paired),
            _batch1(rt, prompt_tokens, output_tokens, runs_, paired))


@dataclass(frozen=True)
class PairedRatio:
    """A model's latency over a reference's, measured request by request in turn (`measure_paired`)
    twice with fresh engines: beside the reference engine loaded just before it, then beside one
    loaded just after it (`measure_chain`).

    Both orders, because on vLLM CPU the order two engines were loaded in moves their ratio (the
    figures: docs/benchmarks.md, "Why is the latency table measured the way it is?"): the ratio is the
    geometric mean of the two rounds' ratios (of their medians), so the order's effect cancels to first
    order.
    `reference` and `other` pool both rounds' requests (their medians, for absolute figures);
    `rounds` keeps each round's ratios."""

    reference: object  # runtimes.base.Measurement over both rounds
    other: object
    ttft_ratio: float
    tpot_ratio: float
    rounds: tuple[dict, ...]

    def as_dict(self) -> dict:
        return {"rounds": list(self.rounds),
                "how": "request by request in turn with the reference, in two rounds: beside the reference engine "
                       "loaded before it and beside one loaded after it; the ratio is the geometric mean of the "
                       "rounds' ratios"}


def _pooled(ms: list):
    """One Measurement over the requests of several (same runtime, model and workload)."""
    import statistics

    ttfts = [t for m in ms for t in m.ttft_runs_s]
    tpots = [t for m in ms for t in m.tpot_runs_s]
    tpot = statistics.median(tpots)
    return replace(ms[0], ttft_s=statistics.median(ttfts), tpot_s=tpot, throughput_tok_s=1 / tpot, runs=len(tpots),
                   warmup=len(ms), ttft_runs_s=tuple(ttfts), tpot_runs_s=tuple(tpots),
                   extra={**ms[0].extra, "paired": f"measured request by request in turn with the other model, "
                                                   f"in {len(ms)} rounds of fresh engines"})


def measure_chain(open_reference, open_others: list, prompt_tokens: int, output_tokens: int,
                  runs: int) -> list[PairedRatio]:
    """Each of `open_others` measured against the reference in both load orders (`PairedRatio`),
    with two engines loaded at a time in a chain: reference, first other, reference, second other,
    reference, ... Each new engine is measured in turn (`measure_paired`, `runs` requests each)
    with the one loaded just before it, and then the older of the two is closed. So every other
    model meets a reference loaded before it and one loaded after it, and N models cost 2N + 1
    engine loads. `open_reference` and each of `open_others`: callables returning a context
    manager that yields a loaded runtime."""
    import math

    def opened(open_):
        stack = contextlib.ExitStack()
        try:
            return stack, stack.enter_context(open_())
        except BaseException:
            stack.close()
            raise

    rounds: list[list] = [[] for _ in open_others]  # per other: (loaded first, reference M, other M)
    live = []  # the (ExitStack, runtime) of the engines loaded now, oldest first
    try:
        live.append(opened(open_reference))
        for i, open_other in enumerate(open_others):
            live.append(opened(open_other))
            ref, rt = live[0][1], live[1][1]
            rounds[i].append(("reference", *measure_paired(ref, rt, prompt_tokens, output_tokens, runs)))
            live.pop(0)[0].close()
            live.append(opened(open_reference))
            rt, ref = live[0][1], live[1][1]
            rounds[i].append(("other", *measure_paired(ref, rt, prompt_tokens, output_tokens, runs)))
            live.pop(0)[0].close()
    finally:
        for stack, _ in reversed(live):
            stack.close()

    out = []
    for rs in rounds:
        detail = tuple({"loaded_first": first, "ttft_ratio": m.ttft_s / r.ttft_s, "tpot_ratio": m.tpot_s / r.tpot_s,
                        "reference_tpot_s": r.tpot_s, "tpot_s": m.tpot_s} for first, r, m in rs)

        def geomean(key, detail=detail):
            return math.exp(sum(math.log(d[key]) for d in detail) / len(detail))

        out.append(PairedRatio(_pooled([r for _, r, _m in rs]), _pooled([m for *_, m in rs]),
                               geomean("ttft_ratio"), geomean("tpot_ratio"), detail))
    return out
