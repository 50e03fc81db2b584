"""Old against new latency method, on the same loaded model, interleaved run by run.

Old (fitprune before issue 11): TTFT = wall time of a 1-token `generate`; TPOT = (time of an
N-token `generate` - time of a 1-token `generate`) / (N - 1), two separate runs, clamped at 0.
New (runtimes/base.py `Runtime.latency`): one streamed request per run, every output token
timestamped on arrival; TTFT = first arrival - request start, TPOT = (last - first) / (N - 1).

Each timed run does one old TTFT run, one old TPOT pair and one new streamed request, in that
order, so the two methods see the same machine noise. Printed: median, min, max and count of each
figure, and for the old TPOT also the raw (unclamped) differences, to show how often noise makes
them zero or negative.

    python benchmarks/latency_method.py --runtime torch --runs 7
    python benchmarks/latency_method.py --runtime vllm --runs 7 --json /tmp/vllm.json

Model: the embedded SmolLM2-135M-Instruct unless --model; dtype, threads and workload (prompt and
output tokens) from the profile (default cpu-2core: bfloat16, 2 threads, 128 + 32 tokens).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def _old_timed(rt, prompt: list[int], n: int) -> float:
    """`Runtime._timed` as it was: wall time of one `generate` call of `n` tokens."""
    t0 = time.perf_counter()
    out = rt.generate([prompt], n, ignore_eos=True)
    dt = time.perf_counter() - t0
    assert len(out[0].token_ids) == n
    return dt


def summary(values: list[float]) -> dict:
    return {"median_ms": statistics.median(values) * 1e3, "min_ms": min(values) * 1e3, "max_ms": max(values) * 1e3,
            "n": len(values), "runs_ms": [round(v * 1e3, 3) for v in values]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runtime", default="torch", choices=["torch", "vllm", "onnxruntime"])
    ap.add_argument("--profile", default="cpu-2core")
    ap.add_argument("--model", default=None, help="HF directory (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: the profile's)")
    ap.add_argument("--prompt-tokens", type=int, default=None, help="default: the profile's workload")
    ap.add_argument("--output-tokens", type=int, default=None, help="default: the profile's workload")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from compressor.budget.device import open_runtime
    from compressor.model.loading import embedded_model_dir
    from profiles import load_profile
    from runtimes.base import benchmark_prompt

    prof = load_profile(args.profile)
    w = prof.workload
    model = Path(args.model) if args.model else embedded_model_dir()
    threads = args.threads or (prof.device.threads if prof.device.kind == "cpu" else None)
    n = args.output_tokens or w.output_tokens
    prompt_tokens = args.prompt_tokens or w.prompt_tokens
    with open_runtime(args.runtime, model, prof.dtype, threads) as rt:
        prompt = benchmark_prompt(rt.tokenizer, prompt_tokens)
        for _ in range(args.warmup):
            _old_timed(rt, prompt, n)
            rt.stream(prompt, n)
        old_ttft, old_tpot_raw, new_ttft, new_tpot = [], [], [], []
        for i in range(args.runs):
            old_ttft.append(_old_timed(rt, prompt, 1))
            first, full = _old_timed(rt, prompt, 1), _old_timed(rt, prompt, n)
            old_tpot_raw.append((full - first) / (n - 1))
            a, b = rt.timed_request(prompt, n)
            new_ttft.append(a)
            new_tpot.append(b)
            clamped = max(old_tpot_raw[-1], 0)
            print(f"run {i + 1}: old TTFT {old_ttft[-1] * 1e3:.1f} ms, old TPOT {clamped * 1e3:.2f} ms "
                  f"(raw {old_tpot_raw[-1] * 1e3:+.2f}); new TTFT {a * 1e3:.1f} ms, new TPOT {b * 1e3:.2f} ms",
                  flush=True)
        device = rt.device
    old_tpot = [max(v, 0.0) for v in old_tpot_raw]
    res = {"runtime": args.runtime, "device": device, "profile": prof.name, "dtype": prof.dtype, "threads": threads,
           "model": str(model), "prompt_tokens": prompt_tokens, "output_tokens": n, "warmup": args.warmup,
           "old": {"ttft": summary(old_ttft), "tpot": summary(old_tpot),
                   "tpot_raw_ms": [round(v * 1e3, 3) for v in old_tpot_raw],
                   "tpot_nonpositive_raw": sum(v <= 0 for v in old_tpot_raw)},
           "new": {"ttft": summary(new_ttft), "tpot": summary(new_tpot)}}
    print(f"\n{args.runtime} on {device}, {prof.dtype}, {prompt_tokens} prompt + {n} output tokens, "
          f"{args.runs} runs after {args.warmup} warm-up")
    print(f"{'method':<6} {'TTFT median':>12} {'TTFT min-max':>16} {'TPOT median':>12} {'TPOT min-max':>16}")
    for k in ("old", "new"):
        t, p = res[k]["ttft"], res[k]["tpot"]
        print(f"{k:<6} {t['median_ms']:>10.1f}ms {t['min_ms']:>7.1f}-{t['max_ms']:<7.1f} "
              f"{p['median_ms']:>10.2f}ms {p['min_ms']:>7.2f}-{p['max_ms']:<7.2f}")
    print(f"old TPOT raw differences <= 0 (clamped to 0 ms): {res['old']['tpot_nonpositive_raw']} of {args.runs}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
