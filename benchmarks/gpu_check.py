"""The GPU check: the real user's path on one GPU, in one script that prints one table.

1. a random-weight checkpoint of Llama-3.1-8B's shape (`random_checkpoint.py`), pruned out of core on
   CUDA with per-layer widths and quantized to W8A8 (`compress --out-of-core on --device cuda`);
2. that per-layer W8A8 export served in vLLM on CUDA through fitprune's plugin, timed at batch 1;
3. `compress plan` with every lever on the same checkpoint for the host's own profile
   (`--profile auto`), which measures the latency table on this GPU where vLLM is installed.

A step that cannot run here (no CUDA, no vLLM) prints why in its row instead of a figure; nothing
is measured on a stand-in. Sized for one H100 in under 8 minutes (the checkpoint is written to
local disk first, about 16 GB).

    python benchmarks/gpu_check.py --work /tmp/gpu-check [--shape llama-3.1-8b] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(cmd: list[str], log: Path, timeout: int) -> tuple[int, float]:
    t = time.perf_counter()
    with log.open("w") as f:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.perf_counter() - t


def _tail(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:160] if lines else "(no output)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="folder for the checkpoint, the export and the logs")
    ap.add_argument("--shape", default="llama-3.1-8b", help="random_checkpoint.py shape")
    ap.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = ap.parse_args()
    import torch

    rows: list[dict] = []
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    rows.append({"step": "device", "result": gpu or "no CUDA device: every step below is not run", "seconds": 0.0})
    args.work.mkdir(parents=True, exist_ok=True)
    ckpt, export = args.work / args.shape, args.work / "export-w8a8"
    if gpu:
        if not ckpt.is_dir():
            rc, s = _run([sys.executable, "benchmarks/random_checkpoint.py", str(ckpt), "--shape", args.shape],
                         args.work / "checkpoint.log", 1800)
            what = "written" if rc == 0 else _tail(args.work / "checkpoint.log")
            rows.append({"step": "random checkpoint", "result": what, "seconds": round(s, 1)})
        rc, s = _run([sys.executable, "-m", "compressor", str(ckpt), "--profile", "auto", "--device", "cuda",
                      "--out-of-core", "on", "--ratio", "0.2", "--structure", "global", "--quantize", "w8a8-int8",
                      "--nsamples", "16", "--seqlen", "256", "--no-checks", "--out", str(export)],
                     args.work / "prune.log", 1800)
        if rc == 0:
            r = json.loads((export / "report.json").read_text())
            result = (f"removed {r['params']['achieved_ratio_decoder']:.1%} of decoder weights, held-out ppl "
                      f"{r['perplexity']['dense']:.1f} -> {r['perplexity']['pruned']:.1f}, peak RSS "
                      f"{r['peak_rss_mib_total']:.0f} MiB, peak GPU {r['memory'].get('peak_device_mib', 0):.0f} MiB")
        else:
            result = f"exit {rc}: {_tail(args.work / 'prune.log')}"
        rows.append({"step": "prune out of core (cuda, per-layer, w8a8)", "result": result, "seconds": round(s, 1)})
        rows.append(_serve(export) if rc == 0 else {"step": "vLLM CUDA", "result": "not run: no export", "seconds": 0})
        plan_json = args.work / "plan.json"
        rc, s = _run([sys.executable, "-m", "compressor", "plan", str(ckpt), "--profile", "auto", "--json",
                      str(plan_json)], args.work / "plan.log", 1800)
        if rc == 0:
            p = json.loads(plan_json.read_text())
            levers = p.get("levers") or {}
            chosen = (levers.get("chosen") or {}).get("levers", "nothing")
            result = f"chose {chosen}; latency {levers.get('latency_source', '?')}"
        else:
            result = f"exit {rc}: {_tail(args.work / 'plan.log')}"
        rows.append({"step": "plan, every lever (latency table)", "result": result, "seconds": round(s, 1)})
    print("| step | result | seconds |\n|---|---|---|")
    for r in rows:
        print(f"| {r['step']} | {r['result']} | {r['seconds']} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    return 0


def _serve(export: Path) -> dict:
    """The per-layer W8A8 export in vLLM on CUDA (the plugin registers the architecture), batch 1."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return {"step": "vLLM CUDA (plugin, w8a8)", "result": "not run: vLLM is not installed here", "seconds": 0.0}
    from compressor.budget.device import measure_batch1, open_runtime

    t = time.perf_counter()
    with open_runtime("vllm", export, "bfloat16", None) as rt:
        m = measure_batch1(rt, 128, 32, 5)
    return {"step": "vLLM CUDA (plugin, w8a8)", "result": f"TTFT {m.ttft_s * 1e3:.1f} ms, TPOT {m.tpot_s * 1e3:.2f} ms "
            "(batch 1, 128 + 32 tokens, median of 5)", "seconds": round(time.perf_counter() - t, 1)}


if __name__ == "__main__":
    sys.exit(main())
