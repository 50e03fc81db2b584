"""Does recovery change which plan is best? (issue 24: the planner ranks candidates by their damage
before recovery.) On SmolLM2, candidates that remove about the same share of the decoder in
different ways (width, dropped layers, both) are each measured before and after the same recovery:
the lever plan's score (KL to the dense model on text the dense model generated itself,
`prune/planned.py`) and the cross-domain perplexity (four domains unlike the calibration text).
Prints both rankings and Spearman's rho of the ranking before recovery against the cross-domain
ranking after it.

    python benchmarks/recover_ranking.py --tokens 20000

Candidates pruned as the lever plan prunes them (uniform widths, flap + lsq+bias, the SLEB drop
order); recovery as `benchmarks/recover.py` (full parameters, the same teacher targets for all).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch
from kl_proxy import ranks, spearman  # this folder's: the ranking helpers

PLANS = [(0.2, 0), (0.3, 0), (0.1, 3), (0.0, 6), (0.05, 5), (0.0, 9)]  # (width removed, layers dropped)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=20000)
    ap.add_argument("--windows", type=int, default=64, help="recovery windows (of --seqlen tokens)")
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from compressor.config import RunConfig
    from compressor.evaluate.perplexity import domain_perplexities
    from compressor.pipeline import prepare
    from compressor.pipeline.plan import prune_spec
    from compressor.prune.planned import PlanQuality, kl_text
    from compressor.recover.distill import distill, recovery_windows, teacher_targets

    cfg = RunConfig(nsamples=32, seqlen=args.seqlen, eval_samples=40, domain_windows=8)
    prep = prepare(cfg)
    model, adapter, tok = prep.loaded.model, prep.adapter, prep.loaded.tokenizer
    before = adapter.count_params(model)["decoder"]
    targets = teacher_targets(model, recovery_windows(cfg.calib, tok, model, args.windows, args.seqlen, cfg.seed))
    d_cross = domain_perplexities(model, prep.domains)["geomean"]
    spec = replace(prune_spec(cfg, 0.0, 64), structure="uniform")
    ids = kl_text("self", model, tok, prep.validation, 8 * 256, cfg.seed)
    quality = PlanQuality(model, adapter, prep.calib, prep.validation, spec, cfg.compute, say=lambda *_: None,
                          kl_ids=ids, kl_on="self")

    @torch.no_grad()
    def kl(m) -> float:
        m.eval()
        kls = [quality.fitness.window_kl(m, i) for i in range(len(quality.fitness.windows))]
        return sum(kls) / len(kls)

    rows = []
    for width, dropped in PLANS:
        name = " + ".join(x for x in (f"drop {dropped}" if dropped else "", f"width -{width:.0%}" if width else "")
                          if x)
        kl0 = quality.kl(width, dropped)
        student = quality.pruned_copy(width, dropped)
        removed = 1 - adapter.count_params(student)["decoder"] / before
        cross0 = domain_perplexities(student, prep.domains)["geomean"]
        t0 = time.monotonic()
        distill(student, targets, args.tokens, seed=cfg.seed, kept=1 - removed)
        seconds = time.monotonic() - t0
        row = {"plan": name, "removed": removed, "kl_before": kl0, "kl_after": kl(student),
               "cross_before": cross0, "cross_after": domain_perplexities(student, prep.domains)["geomean"],
               "seconds": seconds}
        rows.append(row)
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
        del student
    quality.close()

    cols = ("kl_before", "kl_after", "cross_before", "cross_after")
    rank = {c: ranks([r[c] for r in rows]) for c in cols}
    print(f"\ndense cross-domain perplexity {d_cross:.3f}; recovery {args.tokens:,} tokens per plan "
          "(full parameters)\n")
    print("| plan | removed | KL before | KL after | cross-domain before | cross-domain after | rank before "
          "(KL) | rank after (cross-domain) |\n|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(rows):
        print(f"| {r['plan']} | {r['removed']:.1%} | {r['kl_before']:.3f} | {r['kl_after']:.3f} "
              f"| {r['cross_before']:.2f} | {r['cross_after']:.2f} | {rank['kl_before'][i] + 1} "
              f"| {rank['cross_after'][i] + 1} |")
    for a, b in (("kl_before", "cross_before"), ("kl_before", "cross_after"), ("cross_before", "cross_after"),
                 ("kl_before", "kl_after")):
        print(f"Spearman rho, {a} vs {b}: {spearman([r[a] for r in rows], [r[b] for r in rows]):+.3f}")


if __name__ == "__main__":
    main()
