"""The searched allocation (`--structure searched`, prune/evolve.py) against the `global` FLAP
allocation, both with flap + the given compensation, on the embedded SmolLM2-135M in float32.

Both start from the same calibration pass. Each model is judged by (a) the search's own fitness,
KL(dense || pruned) on the validation windows, (b) held-out perplexity (the builtin text's tail, the
calibration text's domain) and (c) cross-domain perplexity (data.domain_windows, geometric mean),
the yardstick.

    python benchmarks/search_allocation.py --ratios 0.2,0.5 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from compressor.config import RunConfig
from compressor.data import domain_windows
from compressor.evaluate.perplexity import domain_perplexities, perplexity
from compressor.pipeline import prepare
from compressor.prune.driver import PruneSpec, collect_stats, prune
from compressor.prune.evolve import Fitness, SearchSettings, prune_searched, validation_windows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=16, help="held-out windows")
    ap.add_argument("--domain-windows", type=int, default=8)
    ap.add_argument("--ratios", default="0.2,0.5")
    ap.add_argument("--compensation", default="lsq+bias")
    ap.add_argument("--generations", type=int, default=SearchSettings.generations)
    ap.add_argument("--offspring", type=int, default=SearchSettings.offspring)
    ap.add_argument("--windows", type=int, default=SearchSettings.windows)
    ap.add_argument("--no-depth", action="store_true", help="widths only (no block removal)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-dense", action="store_true", help="skip judging the dense model (another run did)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = SearchSettings(generations=args.generations, offspring=args.offspring, windows=args.windows,
                              depth=not args.no_depth, seed=args.seed)
    prep = prepare(RunConfig(nsamples=args.nsamples, seqlen=args.seqlen, eval_samples=args.eval_windows))
    model, adapter, tok = prep.loaded.model.float(), prep.adapter, prep.loaded.tokenizer
    domains = domain_windows(tok, args.seqlen, args.domain_windows)
    fit = Fitness(validation_windows(prep.validation, settings.windows, settings.window_len))
    fit.cache_dense(model, settings.top_k)

    def judge(m) -> dict:
        t = time.perf_counter()
        kl = sum(fit.window_kl(m, i) for i in range(len(fit.windows))) / len(fit.windows)
        cross = domain_perplexities(m, domains)
        row = {"kl": round(kl, 5), "heldout": round(perplexity(m, prep.heldout), 3),
               "cross_domain": round(cross["geomean"], 3),
               "domains": {k: round(v, 3) for k, v in cross["domains"].items()}}
        print(f"  judged in {time.perf_counter() - t:.0f} s: {row}", flush=True)
        return row

    dense = {"heldout": "-", "cross_domain": "-"}
    if not args.no_dense:
        print("dense:", flush=True)
        dense = judge(model)
    t = time.perf_counter()
    stats, _ = collect_stats(model, adapter, prep.calib, RunConfig().compute, gram=True)
    stats_s = time.perf_counter() - t
    print(f"calibration pass ({args.nsamples} x {args.seqlen}): {stats_s:.0f} s", flush=True)
    total = adapter.count_params(model)["decoder"]
    rows = []
    for ratio in (float(r) for r in args.ratios.split(",")):
        spec = PruneSpec(metric="flap", compensation=args.compensation, structure="global", ratio=ratio, round_to=64)
        for structure in ("global", "searched"):
            pruned = copy.deepcopy(model)
            t = time.perf_counter()
            if structure == "global":
                prune(pruned, adapter, prep.calib, spec, RunConfig().compute, dense_stats=[copy.copy(s) for s in stats])
                notes = {}
            else:
                res = prune_searched(pruned, adapter, prep.calib, prep.validation, spec, RunConfig().compute,
                                     settings=settings, dense_stats=stats)
                notes = res.notes["search"]
            secs = time.perf_counter() - t
            removed = 1 - adapter.count_params(pruned)["decoder"] / total
            print(f"{structure} {ratio:.0%}: removed {removed:.2%}, {secs:.0f} s", flush=True)
            row = {"ratio": ratio, "structure": structure, "removed": round(removed, 4), "seconds": round(secs, 1),
                   **judge(pruned)}
            if notes:
                row["search"] = {k: notes[k] for k in ("trajectory", "attention_removed", "mlp_removed",
                                                       "candidates_built", "window_evaluations", "setup_s")}
            rows.append(row)
            del pruned
    print()
    print(f"SmolLM2-135M-Instruct fp32, flap + {args.compensation}, calibration {args.nsamples} x {args.seqlen} "
          f"builtin tokens; search: {settings.generations} generations x {settings.offspring} offspring, fitness on "
          f"{len(fit.windows)} x {settings.window_len} validation tokens")
    print(f"dense: KL 0, held-out {dense['heldout']}, cross-domain {dense['cross_domain']}")
    print("| ratio | allocation | removed | KL (validation) | held-out ppl | cross-domain ppl (geomean) | seconds |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['ratio']:.0%} | {r['structure']} | {r['removed']:.2%} | {r['kl']} | {r['heldout']} | "
              f"{r['cross_domain']} | {r['seconds']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dense": dense, "stats_s": stats_s, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
