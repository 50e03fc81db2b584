"""Recovery by distillation on SmolLM2 (compressor/recover): held-out and cross-domain perplexity,
time and peak memory after pruning with 0 and N recovery tokens, full-parameter and LoRA.

    python benchmarks/recover.py                                   # 20% and 50%, 0 and 20k tokens
    python benchmarks/recover.py --ratios 0.5 --tokens 0 50000 200000 --lora 16
    python benchmarks/recover.py --ratios 0.5 --tokens 0 50000 --lr 5e-5 4e-4 --cache /tmp/rc   # a sweep

Pruning: flap + lsq+bias, global widths (the one-pass allocation), or with `--structure searched` the
CLI's default method for this model (the allocation search, minutes more); calibration 32 x 256 tokens
of the builtin text. Recovery text: the builtin calibration region and the dense model's own samples,
half each (`recovery_windows`), as many unique windows as the CLI takes for the largest budget, with
the teacher's top-32 targets computed once (with `--cache DIR`, stored there and reused by a later
run with the same windows, as is each ratio's pruned model); the same pruned weights start every row
of a ratio.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

# what each cached value depends on (its file name carries their digest)
TARGETS_CODE = ("compressor/recover/distill.py", "compressor/data.py", "compressor/model")
PRUNED_CODE = ("compressor/prune", "compressor/data.py", "compressor/model", "compressor/config.py")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5])
    ap.add_argument("--tokens", type=int, nargs="+", default=[0, 20000])
    ap.add_argument("--lora", type=int, default=0, help="also a LoRA row of this rank at the largest budget")
    ap.add_argument("--windows", type=int, default=None,
                    help="unique recovery windows (of --seqlen tokens); default: the CLI's for the largest budget")
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--lr", type=float, nargs="+", default=None,
                    help="learning rates, one row each, LoRA rows too (default: distill's for the mode)")
    ap.add_argument("--train", choices=["all", "decoder"], nargs="+", default=["decoder"],
                    help="what full-parameter recovery trains, one row each: every parameter, or all but the token "
                         "embeddings and the LM head")
    ap.add_argument("--cache", default=None,
                    help="a folder keeping the recovery windows' teacher targets and each ratio's pruned model")
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
    targets = _cached(args.cache, f"targets-{n_windows}x{args.seqlen}-{_code_digest(*TARGETS_CODE)}.safetensors",
                      lambda: teacher_targets(dense, recovery_windows(cfg.calib, tok, dense, n_windows, args.seqlen,
                                                                      cfg.seed)), _save_targets, _load_targets)
    windows = targets.windows
    print(f"recovery text: {windows.shape[0]} x {windows.shape[1]} tokens (half the model's own samples), teacher "
          f"targets in {time.monotonic() - t0:.0f} s", flush=True)
    d_held, d_cross = quality(dense)
    print(f"dense: held-out {d_held:.3f}, cross-domain {d_cross:.3f}", flush=True)
    rows = []
    for ratio in args.ratios:
        spec = PruneSpec(metric="flap", compensation="lsq+bias", structure=args.structure, ratio=ratio, round_to=64)

        def pruned_model(spec=spec):
            pruned = copy.deepcopy(dense)
            if args.structure == "searched":
                prune_searched(pruned, prep.adapter, prep.texts.calib, prep.texts.validation, spec, cfg.compute,
                               generations=cfg.search_generations, seed=cfg.seed)
            else:
                prune(pruned, prep.adapter, prep.texts.calib, spec, cfg.compute)
            return pruned

        name = f"pruned-{args.structure}-{ratio:g}-{args.seqlen}-{_code_digest(*PRUNED_CODE)}.pt"
        pruned = _cached(args.cache, name, pruned_model, torch.save, lambda p: torch.load(p, weights_only=False))
        kept = prep.adapter.count_params(pruned)["decoder"] / prep.adapter.count_params(dense)["decoder"]
        lrs = args.lr or [None]  # distill's default for the mode
        runs = ([(0, 0, None, "all")] if 0 in args.tokens else [])
        runs += [(n, 0, lr, t) for n in args.tokens if n for lr in lrs for t in args.train]
        runs += [(max(args.tokens), args.lora, lr, "decoder") for lr in lrs] if args.lora else []
        for tokens, rank, lr, train in runs:
            student = copy.deepcopy(pruned)
            res = None
            if tokens:
                res = distill(student, targets, tokens, lr=lr, lora_rank=rank, train_embeddings=train == "all",
                              kept=kept, decoder_layers=prep.adapter.layers(student) if rank else None)
            held, cross = quality(student)
            mode = res.mode if res else "-"
            row = {"ratio": ratio, "tokens": tokens, "mode": mode, "lr": res.lr if res else None,
                   "heldout_ppl": round(held, 3),
                   "cross_domain_ppl": round(cross, 3),
                   "cross_increase_over_dense": round(cross / d_cross - 1, 4),
                   "seconds": round(res.seconds, 1) if res else 0.0,
                   "peak_rss_mib": round(res.peak_rss_mib) if res else None}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del student
    print("\n| ratio | recovery tokens | mode | lr | held-out ppl | cross-domain ppl | cross-domain increase "
          "| time (s) | peak RSS (MiB) |\n|---|---|---|---|---|---|---|---|---|")
    print(f"| 0 (dense) | - | - | - | {d_held:.3f} | {d_cross:.3f} | - | - | - |")
    for r in rows:
        lr = f"{r['lr']:g}" if r["lr"] else "-"
        print(f"| {r['ratio']:.0%} | {r['tokens']:,} | {r['mode']} | {lr} | {r['heldout_ppl']:.3f} "
              f"| {r['cross_domain_ppl']:.3f} | {r['cross_increase_over_dense']:+.1%} | {r['seconds']:.0f} "
              f"| {r['peak_rss_mib'] or '-'} |")


def _code_digest(*parts: str) -> str:
    """A short digest of the sources under `parts` (paths in the repository): a cached result names
    the code it came from, so a change to that code computes it afresh."""
    import hashlib

    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for part in parts:
        for f in sorted((root / part).rglob("*.py")) if (root / part).is_dir() else [root / part]:
            h.update(f.relative_to(root).as_posix().encode() + f.read_bytes())
    return h.hexdigest()[:10]


def _cached(cache: str | None, name: str, compute, save, load):
    """`compute()`, stored in `cache` under `name` by `save(value, path)` and read from there by a
    later run with `load(path)` (the pruning and the sampling are seeded: a cached value is the one
    this run would compute, as long as `name` carries the code's digest)."""
    path = Path(cache) / name if cache else None
    if path and path.is_file():
        return load(path)
    value = compute()
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        save(value, path)
    return value


def _save_targets(targets, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in targets.__dict__.items()}, path)


def _load_targets(path: Path):
    from safetensors.torch import load_file

    from compressor.recover.distill import TeacherTargets

    return TeacherTargets(**load_file(path))


if __name__ == "__main__":
    main()
