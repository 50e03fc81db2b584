"""Serving speed of dense vs pruned exports of the embedded SmolLM2-135M in every runtime.

For dense and each (structure, ratio) -- uniform widths (native Llama export) and per-layer widths
(fitprune format), FLAP with bias compensation -- the exports are loaded in each available
runtime (torch, vllm, onnxruntime) and measured with `Runtime.measure`: time to first token (TTFT)
for a prompt of --prompt-tokens tokens, time per output token (TPOT) at batch 1, and throughput
(output tokens/s) at --concurrency, each the median of --runs runs after --warmup. The ideal
speedup is bytes of weights dense / pruned (all weights a decode step reads, lm_head included).

    python benchmarks/serving.py                                  # torch + vllm (+ onnxruntime)
    python benchmarks/serving.py --runtimes torch --ratios 0.5 --profile

--profile runs the torch profiler over batch-1 decoding of the dense and the most pruned export
and prints where the time goes (matrix multiplies vs everything else vs Python/framework time).
One vLLM engine runs at a time. Results are also written as JSON (--json).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass
class Variant:
    name: str
    structure: str
    ratio: float
    hf_dir: Path
    weight_bytes: int
    decoder_bytes: int
    fmt: str
    onnx_dir: Path | None = None
    results: dict[str, dict] = field(default_factory=dict)


def weight_bytes(model) -> tuple[int, int]:
    """Bytes of all distinct weight tensors (a tied lm_head counted once) and of the decoder layers."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    decoder = sum(p.numel() * p.element_size() for p in model.model.layers.parameters())
    return total, decoder


def build_variants(args, work: Path, say) -> list[Variant]:
    import torch

    from compressor.config import RunConfig
    from compressor.pipeline import prepare
    from compressor.prune import COMPENSATION, IMPORTANCE, allocation
    from compressor.prune.driver import collect_stats, prune_model, score
    from exporters import export_hf

    torch.manual_seed(0)
    opts = RunConfig(model=args.model, nsamples=args.nsamples, seqlen=args.seqlen, eval_samples=4)
    prep = prepare(opts)
    say(f"calibrating on {args.nsamples} x {args.seqlen} tokens ...")
    stats, _ = collect_stats(prep.loaded.model, prep.adapter, prep.calib, opts.compute)
    metric = IMPORTANCE.get("flap")
    plans = [("dense", "-", 0.0)] + [(f"{s}-{round(r * 100)}%", s, r) for s in args.structures for r in args.ratios]
    variants = []
    onnx_export = None
    if "onnxruntime" in args.runtimes:
        try:
            from exporters.onnx import export_onnx as onnx_export
        except ImportError:
            say("exporters.onnx is not available: no ONNX exports, onnxruntime skipped.")
    for name, structure, ratio in plans:
        model = copy.deepcopy(prep.loaded.model)
        if ratio:
            scored = score(model, prep.adapter, stats, metric)
            keeps = allocation.allocate(scored.scores, ratio, structure, "auto", 64, standardized=metric.standardize)
            prune_model(model, prep.adapter, keeps, scored, COMPENSATION.get("bias"))
        out = work / name.replace("%", "") / "hf"
        out.mkdir(parents=True, exist_ok=True)
        res = export_hf(model, prep.loaded.tokenizer, out)
        total, decoder = weight_bytes(model)
        v = Variant(name, structure, ratio, out, total, decoder, f"{res.format} ({res.architecture})")
        if onnx_export is not None:
            v.onnx_dir = out.parent / "onnx"
            v.onnx_dir.mkdir(exist_ok=True)
            onnx_export(model, prep.loaded.tokenizer, v.onnx_dir)
        say(f"exported {name}: {v.fmt}, {total / 2**20:.0f} MiB of weights")
        variants.append(v)
    return variants


def measure_all(args, variants: list[Variant], say) -> list[str]:
    from runtimes.base import RuntimeUnavailable, get_runtime

    ran = []
    for rname in args.runtimes:
        try:
            cls = get_runtime(rname)
            cls.check_available()
        except RuntimeUnavailable as exc:
            say(f"skipping {rname}: {exc}")
            continue
        ran.append(rname)
        for v in variants:
            path = v.onnx_dir if rname == "onnxruntime" else v.hf_dir
            if path is None:
                continue
            say(f"{rname}: measuring {v.name} ...")
            t0 = time.perf_counter()
            try:
                kw = {} if rname == "onnxruntime" else {"dtype": args.dtype}
                with cls(path, threads=args.threads, **kw) as rt:
                    m = rt.measure(prompt_tokens=args.prompt_tokens, output_tokens=args.output_tokens,
                                   concurrency=args.concurrency, runs=args.runs, warmup=args.warmup)
                v.results[rname] = m.as_dict()
            except Exception as exc:  # noqa: BLE001  (one failed runtime/model must not end the table)
                v.results[rname] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
            say(f"  ... {time.perf_counter() - t0:.0f} s")
    return ran


def table(variants: list[Variant], runtimes: list[str]) -> str:
    head = (f"{'model':<14}{'format':<34}{'weights':>9}{'ideal':>7}  {'runtime':<12}{'TTFT ms':>9}"
            f"{'TPOT ms':>9}{'tok/s':>8}{'TPOT x':>8}{'tok/s x':>8}")
    lines = [head, "-" * len(head)]
    dense = variants[0]
    for v in variants:
        ideal = dense.weight_bytes / v.weight_bytes
        for r in runtimes:
            res = v.results.get(r)
            if res is None:
                continue
            lead = f"{v.name:<14}{v.fmt:<34}{v.weight_bytes / 2**20:>7.0f}Mi{ideal:>6.2f}x  {r:<12}"
            if "error" in res:
                lines.append(lead + res["error"])
                continue
            d = dense.results.get(r, {})
            sp_tpot = d.get("tpot_s", float("nan")) / res["tpot_s"]
            sp_tput = res["throughput_tok_s"] / d.get("throughput_tok_s", float("nan"))
            lines.append(lead + f"{res['ttft_s'] * 1e3:>9.1f}{res['tpot_s'] * 1e3:>9.2f}"
                         f"{res['throughput_tok_s']:>8.1f}{sp_tpot:>7.2f}x{sp_tput:>7.2f}x")
    return "\n".join(lines)


def profile_torch(variants: list[Variant], args, say) -> str:
    """Where batch-1 decoding spends its time in torch: profiler self-CPU time per operator class."""
    from torch.profiler import ProfilerActivity, profile

    from runtimes.base import benchmark_prompt
    from runtimes.torch_runtime import TorchRuntime

    out = []
    for v in (variants[0], variants[-1]):
        with TorchRuntime(v.hf_dir, dtype=args.dtype, threads=args.threads) as rt:
            prompt = benchmark_prompt(rt.tokenizer, args.prompt_tokens)
            rt.generate([prompt], args.output_tokens, ignore_eos=True)  # warm-up
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                rt.generate([prompt], args.output_tokens, ignore_eos=True)
                wall = time.perf_counter() - t0
        groups: dict[str, float] = {}
        for e in prof.key_averages():
            if e.key.startswith("ProfilerStep") or e.self_cpu_time_total <= 0:
                continue
            k = e.key
            if k in ("aten::mm", "aten::addmm", "aten::matmul", "aten::linear", "aten::bmm"):
                g = "matmul (weights)"
            elif "attention" in k or "sdpa" in k or k == "aten::_softmax":
                g = "attention"
            elif k in ("aten::mul", "aten::add", "aten::pow", "aten::mean", "aten::rsqrt", "aten::silu",
                       "aten::neg", "aten::cat", "aten::cos", "aten::sin", "aten::embedding"):
                g = "elementwise / norms / rope"
            else:
                g = "other ops (copies, views, sampling, ...)"
            groups[g] = groups.get(g, 0.0) + e.self_cpu_time_total / 1e6
        ops = sum(groups.values())
        groups["Python / framework (wall - ops)"] = max(wall - ops, 0.0)
        out.append(f"torch, {v.name}: {wall / args.output_tokens * 1e3:.2f} ms per token "
                   f"({args.output_tokens} tokens, batch 1)")
        for g, s in sorted(groups.items(), key=lambda kv: -kv[1]):
            out.append(f"    {g:<42}{s / wall * 100:>5.1f}%  {s / args.output_tokens * 1e3:>7.2f} ms/token")
        top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]
        out.append("    top operators: " + ", ".join(f"{e.key} {e.self_cpu_time_total / 1e3:.0f} ms" for e in top))
    say("profiled")
    return "\n".join(out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--runtimes", default="torch,vllm,onnxruntime")
    p.add_argument("--ratios", default="0.2,0.5")
    p.add_argument("--structures", default="uniform,global", help="uniform and/or global (= per-layer widths)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--workdir", type=Path, default=None, help="where the exports go (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None, help="write all results here")
    p.add_argument("--profile", action="store_true", help="torch profiler breakdown of batch-1 decoding")
    a = p.parse_args(argv)
    a.runtimes = [r for r in a.runtimes.split(",") if r]
    a.ratios = [float(r) for r in a.ratios.split(",") if r]
    a.structures = [s for s in a.structures.split(",") if s]
    bad = [s for s in a.structures if s not in ("uniform", "global")]
    if bad or not all(0 < r < 1 for r in a.ratios):
        p.error("structures must be uniform/global and ratios between 0 and 1.")
    return a


def main(argv=None) -> int:
    import os
    import tempfile

    args = parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        with tempfile.TemporaryDirectory(prefix="fitprune-serving-") as tmp:
            work = args.workdir or Path(tmp)
            variants = build_variants(args, work, say)
            ran = measure_all(args, variants, say)
            prof = profile_torch(variants, args, say) if args.profile else ""
    except Exception as exc:  # noqa: BLE001
        from compressor.errors import UserError

        if isinstance(exc, UserError | ValueError | OSError):
            print(f"error: {exc}", file=sys.stderr)
            return 1
        raise
    if not ran:
        print("error: none of the runtimes asked for is available here.", file=sys.stderr)
        return 1
    first = next((r for v in variants for r in v.results.values() if "device" in r), {})
    print(f"device: {first.get('device', '?')}; dtype {args.dtype}; prompt {args.prompt_tokens} tokens, "
          f"{args.output_tokens} output tokens, concurrency {args.concurrency}; median of {args.runs} runs "
          f"after {args.warmup} warm-up")
    print(table(variants, ran))
    print("ideal = bytes of weights dense / pruned; TPOT x and tok/s x = delivered speedup vs dense "
          "in the same runtime")
    if prof:
        print("\nwhere the time goes (torch profiler):\n" + prof)
    if args.json:
        args.json.write_text(json.dumps([{**v.__dict__, "hf_dir": str(v.hf_dir),
                                          "onnx_dir": str(v.onnx_dir) if v.onnx_dir else None}
                                         for v in variants], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
