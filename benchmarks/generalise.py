"""Does compensation generalise? Cross-domain perplexity of compensations and calibration data.

The least-squares re-fit of o_proj / down_proj is fitted on the calibration text; measured only on
the held-out tail of that same text it looks far better than it is on anything else. This benchmark
judges every candidate on text of four other domains (`data.domain_windows`: Python code, licences,
Debian changelogs, standard-library docstrings; geometric mean of their perplexities) and keeps the
in-domain (builtin held-out) figure beside it, labelled as such.

For each calibration setting (`--calibs`, SOURCE[:NSAMPLES], SOURCE as `--calib` takes it, `pkgdocs`
standing for a text this script writes from the installed Python packages' descriptions) one
calibration pass collects every layer's statistics and Gram matrices; FLAP scores them and the global
allocation is made once per ratio; every compensation candidate then prunes a copy of the model
from those cached statistics (seconds) and is evaluated.

Candidates (`--comps`):
  bias                 FLAP's bias compensation (the baseline)
  lsq+bias@R           least-squares re-fit with intercept, ridge R (relative to the mean kept Gram diagonal)
  lsq+bias@R/chan      the same, each input channel's ridge relative to its own Gram diagonal
  down@R, o@R          re-fit only down_proj (o_proj) at ridge R, FLAP's bias on the other
  shrink@T@R           T x the re-fit at ridge R + (1 - T) x FLAP's bias solution

    python benchmarks/generalise.py --threads 2 --calibs builtin:64 --ratios 0.2,0.5
    python benchmarks/generalise.py --calibs builtin+self:64,builtin+pkgdocs:64 --comps bias,lsq+bias@1
    python benchmarks/generalise.py --table out1.json out2.json      # merge earlier --json files
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from compressor.config import RunConfig
from compressor.data import calib_windows, domain_windows
from compressor.evaluate.perplexity import domain_perplexities, perplexity
from compressor.pipeline import prepare
from compressor.prune import COMPENSATION, IMPORTANCE, allocation
from compressor.prune import compensation as C
from compressor.prune.driver import collect_stats, prune_model, score

DEFAULT_COMPS = ("bias,lsq+bias@0.01,lsq+bias@0.1,lsq+bias@0.3,lsq+bias@1,lsq+bias@3,lsq+bias@10,"
                 "lsq+bias@0.1/chan,lsq+bias@1/chan,down@0.1,o@0.1,shrink@0.5@0.1")


def candidate(name: str) -> C.Compensation:
    """The compensation a --comps entry names."""
    if name in COMPENSATION and "@" not in name:
        return COMPENSATION.get(name)
    kind, *args = name.split("@")
    if kind == "lsq+bias":
        ridge, _, chan = args[0].partition("/")
        fn = partial(C._lsq, intercept=True, ridge=float(ridge), per_channel=chan == "chan")
    elif kind in ("down", "o"):
        fn = partial(C._lsq, intercept=True, ridge=float(args[0]), refit=(kind,))
    elif kind == "shrink":
        fn = partial(C.shrunk, t=float(args[0]), ridge=float(args[1]))
    else:
        raise SystemExit(f"unknown candidate {name}")

    def call(adapter, layer, keep, stats):
        return fn(adapter, layer, keep, stats)

    return C.Compensation(name, call, adds_bias=True, needs_gram=True)


def pkgdocs_text(path: Path, limit: int = 600_000) -> Path:
    """A second local calibration text unlike the evaluation domains: the long descriptions
    (READMEs, mostly prose in Markdown / reStructuredText) of the installed Python packages."""
    import importlib.metadata as md

    parts, size = [], 0
    for dist in sorted(md.distributions(), key=lambda d: d.metadata["Name"] or ""):
        body = dist.metadata.get_payload() or dist.metadata.get("Description") or ""
        if len(body.split()) < 200:
            continue
        parts.append(body)
        size += len(body)
        if size >= limit:
            break
    path.write_text("\n\n".join(parts), encoding="utf-8")
    return path


def evaluate(model, domains, heldout) -> dict:
    res = domain_perplexities(model, domains)
    return {"domains": res["domains"], "geomean": res["geomean"], "in_domain": perplexity(model, heldout)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calibs", default="builtin:64", help="SOURCE[:NSAMPLES],... (SOURCE as --calib; pkgdocs)")
    ap.add_argument("--comps", default=DEFAULT_COMPS)
    ap.add_argument("--ratios", default="0.2,0.5")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=8, help="windows per evaluation domain and in-domain")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the rows to this file")
    ap.add_argument("--table", nargs="*", default=None, help="print the table of these --json files and stop")
    args = ap.parse_args()
    if args.table:
        merged = [json.loads(Path(p).read_text()) for p in args.table]
        print_table(merged[0]["dense"], [r for m in merged for r in m["rows"]], args)
        return
    torch.set_num_threads(args.threads)
    ratios = [float(r) for r in args.ratios.split(",")]
    comps = [candidate(c) for c in args.comps.split(",")]

    opts = RunConfig(nsamples=8, seqlen=args.seqlen, eval_samples=args.eval_windows)
    prep = prepare(opts)
    model, adapter, tok = prep.loaded.model, prep.adapter, prep.loaded.tokenizer
    domains = domain_windows(tok, args.seqlen, args.eval_windows)
    t0 = time.perf_counter()
    dense = evaluate(model, domains, prep.heldout)
    print(f"dense: cross-domain geomean {dense['geomean']:.2f} {fmt(dense['domains'])}; in-domain "
          f"{dense['in_domain']:.2f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    metric = IMPORTANCE.get("flap")
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="generalise-"))
    for setting in args.calibs.split(","):
        source, _, n = setting.rpartition(":")
        if not n.isdigit():
            source, n = setting, "64"
        nsamples = int(n)
        spec = "+".join(str(pkgdocs_text(tmp / "pkgdocs.txt")) if p == "pkgdocs" else p for p in source.split("+"))
        t0 = time.perf_counter()
        calib = calib_windows(spec, tok, model, nsamples, args.seqlen, seed=0)
        data_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        stats, _ = collect_stats(model, adapter, calib, opts.compute, gram=True)
        stats_s = time.perf_counter() - t0
        print(f"calibration {source} x {nsamples}: text {data_s:.0f} s, pass {stats_s:.0f} s", flush=True)
        scored = score(model, adapter, [copy.copy(s) for s in stats], metric)
        for ratio in ratios:
            keeps = allocation.allocate(scored.scores, ratio, "global", "auto", 64, standardized=metric.standardize)
            for comp in comps:
                pruned = copy.deepcopy(model)
                t0 = time.perf_counter()
                prune_model(pruned, adapter, keeps, scored, comp)
                prune_s = time.perf_counter() - t0
                res = evaluate(pruned, domains, prep.heldout)
                removed = 1 - adapter.count_params(pruned)["decoder"] / adapter.count_params(model)["decoder"]
                row = {"calib": source, "nsamples": nsamples, "ratio": ratio, "comp": comp.name,
                       "removed": removed, "prune_s": prune_s, **res}
                rows.append(row)
                print(f"{source:>18} x{nsamples:<4} {ratio:.0%} {comp.name:>18}: cross {res['geomean']:8.2f} "
                      f"{fmt(res['domains'])}  in-domain {res['in_domain']:7.2f}", flush=True)
                del pruned
        del stats, scored
        if args.json:  # after every setting, so an interrupted run keeps what it measured
            Path(args.json).write_text(json.dumps({"dense": dense, "rows": rows}, indent=1))
    print_table(dense, rows, args)


def fmt(per: dict) -> str:
    return " ".join(f"{k} {v:.2f}" for k, v in per.items())


def print_table(dense: dict, rows: list[dict], args) -> None:
    """Markdown: per ratio, rows by cross-domain geomean; 'x of bias' = the candidate's cross-domain
    increase over dense as a fraction of FLAP + bias's with the same calibration text."""
    names = list(dense["domains"])
    base = {(r["calib"], r["nsamples"], r["ratio"]): r["geomean"] for r in rows if r["comp"] == "bias"}
    print()
    print(f"SmolLM2-135M-Instruct fp32, flap, global structure, round to 64; evaluation {args.eval_windows} x "
          f"{args.seqlen} tokens per domain. Dense: cross-domain geomean {dense['geomean']:.2f} "
          f"({fmt(dense['domains'])}), in-domain {dense['in_domain']:.2f}.")
    print(f"Command: python {' '.join(sys.argv)}")
    print()
    print("| removed | calibration | compensation | cross-domain geomean | increase / bias's | "
          + " | ".join(names) + " | in-domain (builtin held-out) |")
    print("|---" * (6 + len(names)) + "|")
    for r in sorted(rows, key=lambda r: (r["ratio"], r["geomean"])):
        b = base.get((r["calib"], r["nsamples"], r["ratio"]))
        rel = (r["geomean"] - dense["geomean"]) / (b - dense["geomean"]) if b else math.nan
        print(f"| {r['removed']:.1%} | {r['calib']} x {r['nsamples']} | {r['comp']} | {r['geomean']:.2f} | "
              f"{rel:.2f} | " + " | ".join(f"{r['domains'][n]:.2f}" for n in names) + f" | {r['in_domain']:.2f} |")


if __name__ == "__main__":
    main()
