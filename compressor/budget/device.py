"""The device at hand: is it the profile's device, which runtime measures on it, and opening an
export in that runtime (ONNX Runtime gets an ONNX export of a Hugging Face directory first)."""

from __future__ import annotations

import contextlib
import shutil
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


def device_present(profile: Profile) -> bool:
    """Is the profile's device the one this process runs on? (CPU profile on a CPU-only host, or a
    GPU whose name contains the profile's device name's model part.)"""
    import torch

    if profile.device.kind == "cpu":
        return not torch.cuda.is_available()
    if not torch.cuda.is_available():
        return False
    here = torch.cuda.get_device_name().lower()
    words = [w for w in profile.device.name.lower().replace("nvidia", "").split() if len(w) > 2]
    return bool(words) and any(w in here for w in words[:2]) and torch.cuda.device_count() >= profile.device.count


def measurement_runtime(profile: Profile) -> tuple[str, str | None]:
    """The runtime to measure in: the profile's when it works here, else torch, with a note saying so."""
    from runtimes.base import RuntimeUnavailable, get_runtime

    try:
        get_runtime(profile.runtime).check_available()
        return profile.runtime, None
    except RuntimeUnavailable as exc:
        if profile.runtime == "torch":
            raise UserError(f"The torch runtime is not usable here: {exc}") from exc
        return "torch", f"the profile's runtime '{profile.runtime}' is not available here ({exc}); measured in torch"


def measure_batch1(rt, prompt_tokens: int, output_tokens: int, runs: int):
    """TTFT and TPOT at batch 1 (what the fit needs; throughput is predicted from them), medians."""
    import statistics

    from runtimes.base import Measurement, benchmark_prompt

    prompt = benchmark_prompt(rt.tokenizer, prompt_tokens)
    rt.time_per_output_token(prompt, output_tokens, 1)  # warm-up
    ttft = statistics.median(rt.time_to_first_token(prompt, runs))
    tpot = statistics.median(rt.time_per_output_token(prompt, output_tokens, runs))
    return Measurement(runtime=rt.name, device=rt.device, dtype=rt.dtype, prompt_tokens=prompt_tokens,
                       output_tokens=output_tokens, concurrency=1, ttft_s=ttft, tpot_s=tpot,
                       throughput_tok_s=1 / tpot, runs=runs, warmup=1,
                       extra={"throughput": "batch 1 (1 / TPOT); the workload's concurrency was not measured"})


