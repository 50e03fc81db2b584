"""Quality that generalises (issue 13): every pruning method judged on text unlike the calibration
text, on the embedded SmolLM2-135M-Instruct in float32.

All methods prune copies of the same dense model from the same calibration windows (builtin text,
i.e. the pydoc topics); one calibration pass with Gram matrices is shared by the one-pass methods
and the searches. Each pruned model is scored by
  * cross-domain perplexity: the geometric mean over the domains of `compressor.data.DOMAINS`
    (Python code, licence texts, Debian changelogs, standard-library docstrings), the yardstick;
  * in-domain perplexity: the held-out tail of the calibration text's own stream (labelled as such:
    it flatters methods that re-fit weights to the calibration domain);
  * pruning time (after the shared calibration pass, which is printed once);
  * with --vllm: TTFT and TPOT of its bf16 export in vLLM CPU (stock vLLM for the original
    architecture, fitprune's plugin for per-layer exports), medians of --runs requests.

    python benchmarks/quality.py                                    # 20% and 50%, every method
    python benchmarks/quality.py --ratios 0.2 --vllm --json q.json  # with measured vLLM latency
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from dataclasses import dataclass

import torch

# name -> (label, metric, compensation, structure, extra settings); "default" is whatever the CLI's
# defaults resolve to (RunConfig()), so the table says what a user gets.
METHODS = {
    "flap-bias": ("FLAP + bias (the FLAP paper's method)", "flap", "bias", "global", {}),
    "flap-lsq": ("flap + lsq+bias, global (the default's method, named explicitly)", "flap", "lsq+bias",
                 "global", {}),
    "default": ("the default (compress with no method options)", None, None, None, {}),
    "searched-width": ("searched allocation, widths only", "flap", "auto", "searched", {"depth": False}),
    "depth": ("depth only (blocks removed, prune/depth.py)", "flap", "auto", "depth", {}),
    "searched": ("searched allocation, width + depth", "flap", "auto", "searched", {"depth": True}),
    "searched-fp32": ("searched allocation, width + depth, candidates scored in float32", "flap", "auto",
                      "searched", {"depth": True, "precision": None}),
    "searched-bf16": ("searched allocation, width + depth, candidates scored under bfloat16 autocast", "flap",
                      "auto", "searched", {"depth": True, "precision": "bfloat16"}),
}


@dataclass
class Row:
    method: str
    label: str
    ratio: float
    spec: str
    removed: float
    cross: float
    domains: dict
    heldout: float
    prune_s: float
    notes: str = ""
    vllm: dict | None = None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", default="0.2,0.5")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=16, help="held-out (in-domain) windows")
    ap.add_argument("--domain-windows", type=int, default=8, help="windows per cross-domain domain")
    ap.add_argument("--generations", type=int, default=None, help="searched methods: generations (default: the CLI's)")
    ap.add_argument("--vllm", action="store_true", help="also measure every model's bf16 export in vLLM CPU")
    ap.add_argument("--runs", type=int, default=5, help="--vllm: timed requests per model")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args()

    from compressor.config import RunConfig
    from compressor.evaluate.perplexity import domain_perplexities, perplexity
    from compressor.pipeline import prepare
    from compressor.pipeline.plan import auto_structure, prune_spec
    from compressor.prune import IMPORTANCE
    from compressor.prune.driver import collect_stats, prune

    if args.threads:
        torch.set_num_threads(args.threads)
    names = [m for m in args.methods.split(",") if m]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    opts = RunConfig(nsamples=args.nsamples, seqlen=args.seqlen, eval_samples=args.eval_windows,
                     domain_windows=args.domain_windows)
    prep = prepare(opts)
    model, adapter, tok = prep.loaded.model, prep.adapter, prep.loaded.tokenizer
    domains = prep.domains  # the cross-domain windows prepare() cut for --domain-windows
    t0 = time.perf_counter()
    dense_heldout = perplexity(model, prep.heldout)
    dense_cross = domain_perplexities(model, domains)
    say = print
    say(f"dense: in-domain {dense_heldout:.3f}, cross-domain {dense_cross['geomean']:.3f} "
        f"({', '.join(f'{k} {v:.2f}' for k, v in dense_cross['domains'].items())}); {time.perf_counter() - t0:.0f} s")
    t0 = time.perf_counter()
    stats, _ = collect_stats(model, adapter, prep.calib, opts.compute, gram=True,
                             sample_rows=IMPORTANCE.get("flap").sample_rows)
    stats_s = time.perf_counter() - t0
    say(f"shared calibration pass ({args.nsamples} x {args.seqlen} builtin tokens, Gram matrices): {stats_s:.0f} s")
    dense_decoder = adapter.count_params(model)["decoder"]

    def run(name: str, ratio: float) -> Row:
        label, metric, comp, structure, extra = METHODS[name]
        cfg = opts if metric is None else RunConfig(metric=metric, compensation=comp, structure=structure)
        spec = prune_spec(cfg, ratio, 64)
        if metric is None:  # what the main job makes of --structure auto for this model (steps.auto_structure)
            spec = auto_structure(cfg, spec, adapter.count_params(model)["total"], say=lambda *_: None)
        pruned = copy.deepcopy(model)
        t = time.perf_counter()
        notes = ""
        if spec.structure == "searched":
            from compressor.prune.evolve import prune_searched

            over = {"depth": extra.get("depth", True)}
            if "precision" in extra:
                over["precision"] = extra["precision"]
            if args.generations is not None:
                over["generations"] = args.generations
            res = prune_searched(pruned, adapter, prep.calib, prep.validation, spec, opts.compute,
                                 say=lambda *_: None, dense_stats=stats, **over)
            s = res.notes["search"]
            notes = (f"KL {s['start_kl']:.4f} -> {s['kl']:.4f}; attention removed {s['attention_removed']}, "
                     f"MLP removed {s['mlp_removed']}")
        elif spec.structure == "depth":
            from compressor.prune.depth import prune_depth

            res = prune_depth(pruned, adapter, prep.calib, spec, opts.compute, say=lambda *_: None)
            notes = ", ".join(f"{b['block']} {b['layer']}" for b in res.notes["depth"]["removed"])[:200]
        else:
            res = prune(pruned, adapter, prep.calib, spec, opts.compute, dense_stats=[copy.copy(s) for s in stats])
        prune_s = time.perf_counter() - t
        removed = 1 - adapter.count_params(pruned)["decoder"] / dense_decoder
        cross = domain_perplexities(pruned, domains)
        held = perplexity(pruned, prep.heldout)
        row = Row(name, label, ratio, f"{spec.metric} + {spec.compensation}, {res.structure}", removed,
                  cross["geomean"], cross["domains"], held, prune_s, notes)
        if args.vllm:
            row.vllm = measure_vllm(pruned, tok, args.runs)
        say(f"{ratio:.0%} {name:>17}: removed {removed:6.1%}  cross-domain {row.cross:8.3f}  in-domain {held:8.3f}  "
            f"prune {prune_s:6.1f} s  {fmt_vllm(row.vllm)}  {notes}", flush=True)
        return row

    dense_vllm = measure_vllm(model, tok, args.runs) if args.vllm else None
    if dense_vllm:
        say(f"dense in vLLM: {fmt_vllm(dense_vllm)}")
    rows = [run(n, float(r)) for r in args.ratios.split(",") for n in names]

    print()
    print(f"SmolLM2-135M-Instruct (float32), calibration {args.nsamples} x {args.seqlen} tokens of the builtin text; "
          f"cross-domain = geometric mean over {', '.join(dense_cross['domains'])} ({args.domain_windows} x "
          f"{args.seqlen} tokens each); in-domain = {prep.heldout.shape[0]} x {prep.heldout.shape[1]} held-out "
          f"tokens of the calibration text's stream. Dense: cross-domain {dense_cross['geomean']:.3f}, in-domain "
          f"{dense_heldout:.3f}{'; vLLM ' + fmt_vllm(dense_vllm) if dense_vllm else ''}.")
    print()
    head = ("| ratio | method | removed (decoder) | cross-domain ppl | increase vs FLAP + bias's | in-domain ppl "
            "| prune s |")
    if args.vllm:
        head += " vLLM TTFT ms | vLLM TPOT ms |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for ratio in sorted({r.ratio for r in rows}):
        group = [r for r in rows if r.ratio == ratio]
        base = next((r for r in group if r.method == "flap-bias"), None)
        for r in group:
            inc = r.cross - dense_cross["geomean"]
            share = f"{inc / (base.cross - dense_cross['geomean']):.0%}" if base else ""
            line = (f"| {ratio:.0%} | {r.label} | {r.removed:.1%} | {r.cross:.3f} (+{inc:.3f}) | {share} | "
                    f"{r.heldout:.3f} | {r.prune_s:.0f} |")
            if args.vllm:
                v = r.vllm or {}
                line += f" {v.get('ttft_ms', float('nan')):.1f} | {v.get('tpot_ms', float('nan')):.2f} |"
            print(line)
    print(f"(prune s excludes the shared {stats_s:.0f} s calibration pass for the one-pass and searched rows; "
          "depth rows score blocks with their own forward passes)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dense": {"cross": dense_cross, "heldout": dense_heldout, "vllm": dense_vllm},
                       "stats_s": stats_s, "rows": [r.__dict__ for r in rows]}, f, indent=2)


def measure_vllm(model, tok, runs: int) -> dict:
    """TTFT and TPOT (medians) of the model's bf16 export in vLLM CPU."""
    from exporters import export_hf
    from runtimes.base import get_runtime

    with tempfile.TemporaryDirectory() as d:
        export_hf(model, tok, d, dtype=torch.bfloat16)
        try:
            with get_runtime("vllm")(d, dtype="bfloat16") as rt:
                m = rt.measure(prompt_tokens=128, output_tokens=32, concurrency=4, runs=runs, warmup=1)
        except Exception as exc:  # noqa: BLE001  (one model that fails must not end the table)
            return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
    return {"ttft_ms": m.ttft_s * 1e3, "tpot_ms": m.tpot_s * 1e3, "throughput_tok_s": m.throughput_tok_s}


def fmt_vllm(v: dict | None) -> str:
    if not v:
        return ""
    if "error" in v:
        return f"vLLM failed: {v['error']}"
    return f"vLLM TTFT {v['ttft_ms']:.1f} ms, TPOT {v['tpot_ms']:.2f} ms"


if __name__ == "__main__":
    main()
