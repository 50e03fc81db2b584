"""Wall time and peak memory of the pruning step on the embedded SmolLM2-135M.

The pruning step = layer-wise calibration (statistics) + scoring + allocation + surgery with
compensation; loading, perplexity and export are not part of it. Each configuration runs in its
own process so peak memory is its own. `--baseline` also runs the straightforward version (one
calibration sample at a time) in the same invocation, for comparison.

    python benchmarks/pruning.py                  # FLAP global + bias, 20%, 128 x 512 tokens
    python benchmarks/pruning.py --baseline       # ... and the batch-size-1 baseline
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def single(args) -> dict:
    import torch

    from compressor.config import RunConfig
    from compressor.pipeline import prepare
    from compressor.prune import COMPENSATION, IMPORTANCE, allocation
    from compressor.prune.driver import collect_stats, prune_model, score

    if args.threads:
        torch.set_num_threads(args.threads)
    opts = RunConfig(nsamples=args.nsamples, seqlen=args.seqlen, batch_size=args.batch_size, device=args.device)
    prep = prepare(opts)
    model, adapter = prep.loaded.model, prep.adapter
    metric = IMPORTANCE.get(args.metric)
    before = adapter.count_params(model)["decoder"]
    t0 = time.perf_counter()
    stats, mem = collect_stats(model, adapter, prep.calib, opts.compute)
    t1 = time.perf_counter()
    scored = score(model, adapter, stats, metric)
    keeps = allocation.allocate(scored.scores, args.ratio, args.structure, "auto", 64, standardized=metric.standardize)
    prune_model(model, adapter, keeps, scored, COMPENSATION.get(args.compensation))
    t2 = time.perf_counter()
    return {
        "batch_size": args.batch_size, "tokens": prep.calib.numel(), "calibration_s": round(t1 - t0, 1),
        "score_allocate_prune_s": round(t2 - t1, 2), "pruning_step_s": round(t2 - t0, 1),
        "peak_rss_mib": mem["peak_rss_mib"], "threads": torch.get_num_threads(),
        "removed": round(1 - adapter.count_params(model)["decoder"] / before, 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--metric", default="flap")
    ap.add_argument("--structure", default="global")
    ap.add_argument("--compensation", default="bias")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--baseline", action="store_true", help="also run one sample at a time (batch size 1)")
    ap.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.single:
        print(json.dumps(single(args)))
        return
    runs = [args.batch_size] + ([1] if args.baseline else [])
    rows = []
    for bs in runs:
        cmd = [sys.executable, __file__, "--single", "--batch-size", str(bs)] + [
            a for a in sys.argv[1:] if a not in ("--baseline",)]
        # the last --batch-size wins in argparse; keep ours last
        cmd += ["--batch-size", str(bs)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(p.stderr[-2000:])
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
    print(f"pruning step on SmolLM2-135M: {args.metric} {args.structure} + {args.compensation}, "
          f"{args.ratio:.0%}, {args.nsamples} x {args.seqlen} tokens, device {args.device}")
    print(f"{'batch':>5} {'calibration s':>14} {'score+alloc+prune s':>20} {'step s':>8} "
          f"{'peak RSS MiB':>13} {'removed':>8}")
    for r in rows:
        print(f"{r['batch_size']:>5} {r['calibration_s']:>14} {r['score_allocate_prune_s']:>20} "
              f"{r['pruning_step_s']:>8} {r['peak_rss_mib']:>13} {r['removed']:>8.1%}")
    if len(rows) == 2:
        print(f"speed-up over one sample at a time: {rows[1]['pruning_step_s'] / rows[0]['pruning_step_s']:.2f}x")


if __name__ == "__main__":
    main()
