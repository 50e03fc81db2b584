"""The metric x compensation grid: held-out perplexity of every metric x compensation on the embedded SmolLM2-135M.

One calibration pass over the dense model collects everything every metric reads (means,
variances, Gram matrices, activation samples) and the Taylor gradients are computed once; each
one-pass configuration is then scored, allocated, pruned and compensated from those cached
statistics ("one-pass" rows). Greedy rows (`--greedy`) re-run the layer-wise engine on the pruned
model's activations, as the CLI does for sequential metrics and least-squares compensations.
Held-out text = the last 20% of the builtin token stream, never used for calibration or search.

    python benchmarks/grid.py                        # full grid at 20% and 50%, + greedy rows
    python benchmarks/grid.py --ratios 0.2 --metrics flap,output-approx --no-greedy
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from compressor.config import RunConfig
from compressor.evaluate.perplexity import perplexity
from compressor.pipeline import prepare
from compressor.prune import IMPORTANCE
from compressor.prune import compensation as compensation_module
from compressor.prune.driver import PruneSpec, collect_stats, prune

OTHER_STRUCTURE_DEFAULT = ["flap:bias", "flap:lsq+bias", "wanda-sp:bias", "magnitude:none"]
GREEDY_DEFAULT = ["flap:lsq+bias", "output-approx:lsq+bias", "output-approx:bias", "mi:lsq+bias"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--ratios", default="0.2,0.5")
    ap.add_argument("--metrics", default=",".join(IMPORTANCE.names()))
    ap.add_argument("--compensations", default="none,bias,lsq,lsq+bias")
    ap.add_argument("--greedy", default=",".join(GREEDY_DEFAULT),
                    help="metric:compensation pairs to also run greedily (two-pass)")
    ap.add_argument("--no-greedy", action="store_true")
    ap.add_argument("--other-structure", default=",".join(OTHER_STRUCTURE_DEFAULT),
                    help="metric:compensation pairs to also run with the structure that is not the metric's default")
    ap.add_argument("--ridge", type=float, default=None,
                    help=f"least-squares ridge of the lsq compensations (default {compensation_module.RIDGE})")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args()
    if args.ridge is not None:
        compensation_module.RIDGE = args.ridge
    if args.threads:
        torch.set_num_threads(args.threads)
    ratios = [float(r) for r in args.ratios.split(",")]
    names = args.metrics.split(",")
    comps = args.compensations.split(",")

    opts = RunConfig(nsamples=args.nsamples, seqlen=args.seqlen, eval_samples=args.eval_windows)
    prep = prepare(opts)
    model, adapter = prep.loaded.model, prep.adapter
    t0 = time.perf_counter()
    dense_ppl = perplexity(model, prep.heldout)
    eval_s = time.perf_counter() - t0
    print(f"dense held-out perplexity {dense_ppl:.3f} ({prep.heldout.numel()} tokens, {eval_s:.0f} s)", flush=True)

    t0 = time.perf_counter()
    sample_rows = max(IMPORTANCE.get(n).sample_rows for n in names)
    stats, mem = collect_stats(model, adapter, prep.calib, opts.compute, gram=True, sample_rows=sample_rows)
    stats_s = time.perf_counter() - t0
    extras_by_fn, extras_s = {}, 0.0
    for n in names:
        m = IMPORTANCE.get(n)
        if m.precompute is not None and m.precompute not in extras_by_fn:
            t0 = time.perf_counter()
            extras_by_fn[m.precompute] = m.precompute(model, adapter, prep.calib[:8])
            extras_s += time.perf_counter() - t0
    print(f"shared calibration pass: {stats_s:.0f} s (peak RSS {mem['peak_rss_mib']:.0f} MiB); "
          f"gradients for Taylor metrics: {extras_s:.0f} s", flush=True)

    rows = []

    def run(name: str, comp: str, ratio: float, greedy: bool, structure: str = "auto") -> None:
        m = IMPORTANCE.get(name)
        pruned = copy.deepcopy(model)
        spec = PruneSpec(metric=name, compensation=comp, structure=structure, ratio=ratio, round_to=64, greedy=greedy)
        extras = extras_by_fn.get(m.precompute)
        t = time.perf_counter()
        res = prune(pruned, adapter, prep.calib, spec, opts.compute, extras=extras,
                    dense_stats=None if greedy else [copy.copy(s) for s in stats])
        prune_s = time.perf_counter() - t
        ppl = perplexity(pruned, prep.heldout)
        removed = 1 - adapter.count_params(pruned)["decoder"] / adapter.count_params(model)["decoder"]
        row = {"metric": name, "compensation": comp, "ratio": ratio, "mode": "greedy" if greedy else "one-pass",
               "structure": res.structure, "removed": round(removed, 4), "ppl": round(ppl, 3),
               "increase": round(ppl - dense_ppl, 3), "prune_s": round(prune_s, 1)}
        rows.append(row)
        print(f"{name:>14} {comp:>9} {row['mode']:>8} {res.structure:>7} {ratio:>5.0%} removed {removed:6.1%}  "
              f"ppl {ppl:9.3f}  (+{ppl - dense_ppl:8.3f})  prune {prune_s:6.1f} s", flush=True)
        del pruned

    for ratio in ratios:
        for name in names:
            for comp in comps + (["fold"] if name == "mi" else []):
                run(name, comp, ratio, greedy=False)
        for pair in filter(None, args.other_structure.split(",")):
            name, comp = pair.split(":")
            if name in names:
                run(name, comp, ratio, greedy=False,
                    structure="uniform" if IMPORTANCE.get(name).default_structure == "global" else "global")
        if not args.no_greedy:
            for pair in args.greedy.split(","):
                name, comp = pair.split(":")
                if name in names:
                    run(name, comp, ratio, greedy=True)

    print()
    print(f"SmolLM2-135M-Instruct, calibration {args.nsamples} x {args.seqlen} builtin tokens, held-out "
          f"{prep.heldout.shape[0]} x {prep.heldout.shape[1]} tokens; dense perplexity {dense_ppl:.3f}")
    print("| ratio | metric | compensation | mode | structure | removed | held-out ppl | increase | prune s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["ratio"], r["ppl"])):
        print(f"| {r['ratio']:.0%} | {r['metric']} | {r['compensation']} | {r['mode']} | {r['structure']} | "
              f"{r['removed']:.1%} | {r['ppl']:.3f} | +{r['increase']:.3f} | {r['prune_s']} |")
    print(f"(one-pass rows: prune s excludes the shared {stats_s:.0f} s calibration pass"
          f"{f' and {extras_s:.0f} s of gradients' if extras_s else ''})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dense_ppl": dense_ppl, "stats_s": stats_s, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
