"""Which text should the lever planner's KL be measured on? (issue 12)

The planner chooses among its frontier candidates by KL(dense || candidate) (`prune/planned.py`).
Measured on the validation split, the KL is taken on the calibration text's own domain, where width
pruning re-fits its kept weights; measured on text the dense model samples itself (`kl_text("self")`),
it is not. This prints, for plans `benchmarks/levers.py` measured on SmolLM2 (lsq+bias compensation,
W8A8 through compressed-tensors' fake quantization), both KLs and the cross-domain perplexity (4
domains unlike the calibration text), so the ranking each KL gives can be compared with the one the
other domains give (Spearman's rho printed last).

Measured 2026-11-30 (this 2-core CPU, torch fp32; ~16 min while another job loaded the host):

    plan                             KL validation   KL self   cross-domain
    width -50%                       1.688           2.645     236.21
    drop 6                           0.894           0.800      42.23
    drop 5 + w8a8                    0.721           0.663      37.11
    drop 12                          1.998           1.640     122.85
    drop 8 + width -30% + w8a8       1.676           2.081     175.22
    drop 14 + width -35% + w8a8      2.498           2.871     496.26
    drop 10 + width -5% + w8a8       1.714           1.504      97.06
    Spearman rho against cross-domain: validation +0.714, self +1.000

    python benchmarks/kl_proxy.py --threads 2
"""

from __future__ import annotations

import argparse
import copy

import torch

PLANS = [(0.5, 0, "none"), (0.0, 6, "none"), (0.0, 5, "w8a8-int8"), (0.0, 12, "none"), (0.3, 8, "w8a8-int8"),
         (0.35, 14, "w8a8-int8"), (0.05, 10, "w8a8-int8")]


def ranks(xs: list[float]) -> list[int]:
    order = sorted(range(len(xs)), key=xs.__getitem__)
    return [order.index(i) for i in range(len(xs))]


def spearman(a: list[float], b: list[float]) -> float:
    n, ra, rb = len(a), ranks(a), ranks(b)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb, strict=True)) / (n * (n * n - 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from compressor.config import RunConfig
    from compressor.evaluate.perplexity import domain_perplexities
    from compressor.pipeline import prepare
    from compressor.pipeline.plan import prune_spec
    from compressor.prune.driver import prune_model
    from compressor.prune.planned import PlanQuality, fake_quantized, kl_text

    opts = RunConfig(nsamples=32, seqlen=512, domain_windows=4)
    prep = prepare(opts)
    model, adapter, tok = prep.loaded.model, prep.adapter, prep.loaded.tokenizer
    spec = prune_spec(opts, 0.0, 64)
    kls = {}
    for source in ("validation", "self"):
        ids = kl_text(source, model, tok, prep.validation, 8 * 256, opts.seed)
        q = PlanQuality(model, adapter, prep.calib, prep.validation, spec, opts.compute, say=lambda *_: None,
                        kl_ids=ids, kl_on=source)
        kls[source] = [q.kl(*p) for p in PLANS]
        if source == "self":
            cross = []
            for width, dropped, fmt in PLANS:
                geno = q.genotype(width, dropped)
                keeps = [q.blocks.keep(i, a, m) for i, (a, m) in enumerate(geno)]
                q.blocks.restore()
                pruned = copy.deepcopy(model)
                prune_model(pruned, adapter, keeps, q.scored, q.comp)
                judged = pruned if fmt == "none" else fake_quantized(pruned, fmt)
                cross.append(domain_perplexities(judged, prep.domains)["geomean"])
                del pruned, judged
        q.close()
    print(f"{'plan':<32} {'KL validation':>14} {'KL self':>9} {'cross-domain':>13}")
    for i, (width, dropped, fmt) in enumerate(PLANS):
        name = " + ".join(x for x in (f"drop {dropped}" if dropped else "", f"width -{width:.0%}" if width else "",
                                      fmt if fmt != "none" else "") if x)
        print(f"{name:<32} {kls['validation'][i]:>14.3f} {kls['self'][i]:>9.3f} {cross[i]:>13.2f}")
    for source in ("validation", "self"):
        print(f"Spearman rho, KL on {source} text vs cross-domain perplexity: {spearman(kls[source], cross):+.3f}")


if __name__ == "__main__":
    main()
