"""Recovery by distillation on SmolLM2 (compressor/recover): held-out and cross-domain perplexity,
time and peak memory after pruning with 0 and N recovery tokens, full-parameter and LoRA.

    python benchmarks/recover.py                                   # 20% and 50%, 0 and 20k tokens
    python benchmarks/recover.py --ratios 0.5 --tokens 0 50000 200000 --lora 16

Pruning: flap + lsq+bias, global widths (the one-pass allocation), or with `--structure searched` the
CLI's default method for this model (the allocation search, minutes more); calibration 32 x 256 tokens
of the builtin text. Recovery text: the builtin calibration region and the dense model's own samples,
half each (`recovery_windows`), as many unique windows as the CLI takes for the largest budget, with
the teacher's top-32 targets computed once; the same pruned weights start every row of a ratio.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5])
    ap.add_argument("--tokens", type=int, nargs="+", default=[0, 20000])
    ap.add_argument("--lora", type=int, default=0, help="also a LoRA row of this rank at the largest budget")
    ap.add_argument("--windows", type=int, default=None,
                    help="unique recovery windows (of --seqlen tokens); default: the CLI's for the largest budget")
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--structure", choices=["global", "searched"], default="global",
                    help="searched: the CLI's default (auto) method for SmolLM2 in memory")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from compressor.config import RunConfig
    from compressor.evaluate.perplexity import domain_perplexities, perplexity
    from compressor.pipeline import prepare
    from compressor.pipeline.resident import recovery_window_count
    from compressor.prune.driver import PruneSpec, prune
    from compressor.prune.evolve import prune_searched
    from compressor.recover.distill import distill, recovery_windows, teacher_targets

    cfg = RunConfig(nsamples=32, seqlen=args.seqlen, eval_samples=40, domain_windows=8)
    prep = prepare(cfg)
    dense, tok = prep.loaded.model, prep.loaded.tokenizer

    def quality(model) -> tuple[float, float]:
        return perplexity(model, prep.texts.heldout), domain_perplexities(model, prep.domains)["geomean"]

    t0 = time.monotonic()
    n_windows = args.windows or recovery_window_count(cfg.model_copy(update={"recover_tokens": max(args.tokens)}))
    windows = recovery_windows(cfg.calib, tok, dense, n_windows, args.seqlen, cfg.seed)
    targets = teacher_targets(dense, windows)
    print(f"recovery text: {windows.shape[0]} x {windows.shape[1]} tokens (half the model's own samples), teacher "
          f"targets in {time.monotonic() - t0:.0f} s", flush=True)
    d_held, d_cross = quality(dense)
    print(f"dense: held-out {d_held:.3f}, cross-domain {d_cross:.3f}", flush=True)
    rows = []
    for ratio in args.ratios:
        pruned = copy.deepcopy(dense)
        spec = PruneSpec(metric="flap", compensation="lsq+bias", structure=args.structure, ratio=ratio, round_to=64)
        if args.structure == "searched":
            prune_searched(pruned, prep.adapter, prep.texts.calib, prep.texts.validation, spec, cfg.compute,
                           generations=cfg.search_generations, seed=cfg.seed)
        else:
            prune(pruned, prep.adapter, prep.texts.calib, spec, cfg.compute)
        runs = [(n, 0) for n in args.tokens] + ([(max(args.tokens), args.lora)] if args.lora else [])
        for tokens, rank in runs:
            student = copy.deepcopy(pruned)
            res = None
            if tokens:
                res = distill(student, targets, tokens, lr=args.lr, lora_rank=rank,
                              decoder_layers=prep.adapter.layers(student) if rank else None)
            held, cross = quality(student)
            row = {"ratio": ratio, "tokens": tokens, "mode": res.mode if res else "-", "heldout_ppl": round(held, 3),
                   "cross_domain_ppl": round(cross, 3),
                   "cross_increase_over_dense": round(cross / d_cross - 1, 4),
                   "seconds": round(res.seconds, 1) if res else 0.0,
                   "peak_rss_mib": round(res.peak_rss_mib) if res else None}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del student
    print("\n| ratio | recovery tokens | mode | held-out ppl | cross-domain ppl | cross-domain increase | time (s) "
          "| peak RSS (MiB) |\n|---|---|---|---|---|---|---|---|")
    print(f"| 0 (dense) | - | - | {d_held:.3f} | {d_cross:.3f} | - | - | - |")
    for r in rows:
        print(f"| {r['ratio']:.0%} | {r['tokens']:,} | {r['mode']} | {r['heldout_ppl']:.3f} "
              f"| {r['cross_domain_ppl']:.3f} | {r['cross_increase_over_dense']:+.1%} | {r['seconds']:.0f} "
              f"| {r['peak_rss_mib'] or '-'} |")


if __name__ == "__main__":
    main()
