"""Planner accuracy: predicted against measured decode time per token (TPOT) on this machine, for
the embedded SmolLM2-135M dense and pruned.

1. Calibrate the cost model the way `compress plan` does on the profile's device: the dense
   architecture and its skeleton, random weights, measured in the runtime.
2. Measure the real dense checkpoint and a real pruned export (FLAP, global widths: different
   widths per layer, which the calibration never saw) in the same runtime.
3. Print predicted and measured TPOT (and TTFT, throughput) with the relative error; the target
   for TPOT is within 15%.

    python benchmarks/planner.py                          # cpu-2core, its runtime (torch if vLLM is missing)
    python benchmarks/planner.py --runtime torch --ratios 0.3 0.5
    python benchmarks/planner.py --pruned out/my-export   # measure an existing export instead
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path


def prune_quick(ratio: float, out: Path) -> None:
    """A real FLAP export at `ratio` with a short calibration (the widths are what matters here)."""
    from compressor.config import RunConfig
    from compressor.pipeline import run

    run(RunConfig(ratio=ratio, nsamples=8, seqlen=128, eval_samples=4, out=out, checks=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="cpu-2core")
    ap.add_argument("--runtime", default=None, help="measure in this runtime (default: the profile's, else torch)")
    ap.add_argument("--ratios", type=float, nargs="*", default=[0.3], help="pruned exports to build and measure")
    ap.add_argument("--pruned", type=Path, nargs="*", default=[], help="existing exports to measure as well")
    ap.add_argument("--runs", type=int, default=5, help="timed runs per measurement (medians)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here too")
    ap.add_argument("--throughput", action="store_true", help="also measure throughput at the workload's "
                    "concurrency (slow on 2 cores); default: TTFT and TPOT at batch 1")
    args = ap.parse_args()

    from compressor.budget.device import measure_batch1, measurement_runtime, open_runtime
    from compressor.budget.fitting import fit_cost_model as calibrate
    from compressor.evaluate.latency import measure
    from compressor.model.loading import embedded_model_dir, read_config
    from profiles import load_profile
    from profiles.costmodel import Arch, CostModel

    profile = load_profile(args.profile)
    runtime = args.runtime or measurement_runtime(profile)[0]
    profile = profile.model_copy(update={"runtime": runtime})
    dense_dir = embedded_model_dir()
    config, _ = read_config(str(dense_dir))

    w = profile.workload
    threads = profile.device.threads if profile.device.kind == "cpu" else None
    tmp = Path(tempfile.mkdtemp(prefix="fitprune-bench-"))
    models = [("dense", dense_dir)]
    try:
        for r in args.ratios:
            out = tmp / f"pruned-{int(r * 100)}"
            prune_quick(r, out)
            models.append((f"pruned {r:.2f}", out))
        models += [(f"export {p.name}", p) for p in args.pruned]
        # calibrate right before measuring, so both see the same machine
        t0 = time.perf_counter()
        cal = calibrate(profile, config, dense_dir, runtime, runs=args.runs)
        cost = CostModel(profile).with_efficiency(cal.efficiency, cal.source)
        print(f"calibration ({time.perf_counter() - t0:.0f} s): {json.dumps(cal.details['fit'])}")
        rows = []
        for name, path in models:
            arch = Arch.from_config(json.loads((path / "config.json").read_text()))
            pred = cost.predict(arch)
            if args.throughput:
                m = measure(path, profile, runtime, runs=args.runs)
            else:
                with open_runtime(runtime, path, profile.dtype, threads) as rt:
                    m = measure_batch1(rt, w.prompt_tokens, w.output_tokens, args.runs).as_dict()
            rows.append({"model": name, "params": arch.total_params, "decoder_params": arch.decoder_params,
                         "tpot_predicted_ms": pred.tpot_s * 1e3, "tpot_measured_ms": m["tpot_s"] * 1e3,
                         "tpot_error": pred.tpot_s / m["tpot_s"] - 1,
                         "ttft_predicted_ms": pred.ttft_s * 1e3, "ttft_measured_ms": m["ttft_s"] * 1e3,
                         "throughput_predicted": pred.throughput_tok_s,
                         "throughput_measured": m["throughput_tok_s"] if args.throughput else None,
                         "device": m["device"], "runtime": runtime})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nprofile {profile.name}, runtime {runtime}, dtype {profile.dtype}, {rows[0]['device']}; "
          f"prompt {w.prompt_tokens}, output {w.output_tokens}, concurrency {w.concurrency}; medians of {args.runs}")
    print(f"{'model':<14} {'decoder params':>14} {'TPOT pred':>10} {'TPOT meas':>10} {'error':>7} "
          f"{'TTFT pred':>10} {'TTFT meas':>10} {'tok/s pred':>10} {'tok/s meas':>10}")
    for r in rows:
        print(f"{r['model']:<14} {r['decoder_params']:>14,} {r['tpot_predicted_ms']:>8.2f}ms "
              f"{r['tpot_measured_ms']:>8.2f}ms {r['tpot_error']:>+7.1%} "
              f"{r['ttft_predicted_ms']:>8.1f}ms {r['ttft_measured_ms']:>8.1f}ms "
              f"{r['throughput_predicted']:>10.1f} {r['throughput_measured'] or float('nan'):>10.1f}")
    worst = max(abs(r["tpot_error"]) for r in rows)
    print(f"\nworst TPOT error {worst:.1%} (target: within 15%): {'met' if worst <= 0.15 else 'NOT met'}")
    if args.json:
        args.json.write_text(json.dumps({"calibration": cal.details, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
