"""Does skipping vLLM's compilation (`enforce_eager`) keep a CPU engine's decode speed? The dense
embedded SmolLM2 (float32) opened as `VllmRuntime` with vLLM's default compilation and with
`enforce_eager=True`, each mode in a fresh process with empty compile caches, then `--runs` streamed
greedy requests (128 prompt tokens, 64 new). Prints each mode's start seconds and median TTFT and
TPOT, and the ratios.

    python benchmarks/engine_eager.py [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _child(eager: bool, runs: int) -> dict:
    sys.path.insert(0, str(ROOT))
    if eager:
        import vllm

        class EagerLLM(vllm.LLM):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, enforce_eager=True, **kwargs)

        vllm.LLM = EagerLLM  # VllmRuntime imports it from vllm when it starts the engine
    from compressor.model.loading import embedded_model_dir
    from runtimes.vllm_runtime import VllmRuntime

    t = time.perf_counter()
    rt = VllmRuntime(embedded_model_dir(), "float32")
    start = time.perf_counter() - t
    ttft, tpot = [], []
    try:
        for _ in range(runs):
            got = rt.stream(list(range(100, 228)), 64)
            ttft.append(1000 * (got.arrivals[0] - got.start))
            tpot.append(1000 * (got.arrivals[-1] - got.arrivals[0]) / (len(got.arrivals) - 1))
    finally:
        rt.close()
    return {"start_s": start, "ttft_ms": statistics.median(ttft), "tpot_ms": statistics.median(tpot)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--child", choices=["compiled", "eager"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(_child(args.child == "eager", args.runs)), flush=True)
        return
    res = {}
    for mode in ("compiled", "eager"):
        with tempfile.TemporaryDirectory() as caches:
            env = {**os.environ, "VLLM_CACHE_ROOT": f"{caches}/vllm", "TORCHINDUCTOR_CACHE_DIR": f"{caches}/inductor",
                   "VLLM_CPU_KVCACHE_SPACE": "1"}
            env.pop("VLLM_CPU_CI_ENV", None)
            p = subprocess.run([sys.executable, __file__, "--child", mode, "--runs", str(args.runs)], env=env,
                               capture_output=True, text=True, timeout=1800)
            if p.returncode != 0:
                sys.exit(f"{mode}: the engine did not start:\n{p.stderr[-3000:]}")
            res[mode] = json.loads(next(ln for ln in p.stdout.splitlines() if ln.startswith("RESULT "))[7:])
        r = res[mode]
        print(f"{mode}: start {r['start_s']:.1f} s, median TTFT {r['ttft_ms']:.1f} ms, "
              f"median TPOT {r['tpot_ms']:.2f} ms", flush=True)
    c, e = res["compiled"], res["eager"]
    print(f"eager / compiled: start {e['start_s'] / c['start_s']:.2f}, TTFT {e['ttft_ms'] / c['ttft_ms']:.2f}, "
          f"TPOT {e['tpot_ms'] / c['tpot_ms']:.2f}")


if __name__ == "__main__":
    main()
