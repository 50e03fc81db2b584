"""The main job for models larger than memory: the same data flow as `steps.run`, with the
weights left in the checkpoint's safetensors files and one decoder layer in memory at a time.

load (config + skeleton on the meta device) -> plan -> dense perplexity, layer by layer -> pass 1
(score, light statistics) -> allocate -> pass 2 (cut, compensate, stream each layer into the
output's shards) -> pruned perplexity, layer by layer, read back from the written shards -> check ->
report. Everything is written into a work directory beside `--out` (`.OUT.fitprune-work/`), which
also holds the state that `--resume` continues from; its `export/` folder is renamed to `--out`
when complete.
"""

from __future__ import annotations

import functools
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch

from . import steps
from .config import RunConfig
from .data import domain_windows, load_texts
from .errors import UserError
from .memory import available_bytes
from .model import adapter_for
from .model.adapters import Widths
from .model.lazy import LazyModel, checkpoint_bytes
from .model.loading import LoadedModel, resolve
from .output import Interrupted, _disk_full
from .prune import COMPENSATION
from .prune.driver import LayerSink, copy_out_of_core, gram_bytes, prune, refit_bytes
from .prune.planned import fake_quantized
from .prune.resume import WorkState, work_dir_for
from .prune.surgery import LayerKeep
from .prune.tensor_parallel import tensor_parallel_size
from .steps import Prepared, layer_progress, run_tasks


def choose(cfg: RunConfig, say) -> bool:
    """Out of core or in memory, with the reason printed."""
    if cfg.out_of_core == "off":
        if cfg.resume:
            raise UserError("--resume continues an out-of-core run; it cannot be used with --out-of-core off.")
        return False
    path = Path(resolve(cfg.model)).expanduser()
    local = path.is_dir() and (any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file())
    if cfg.out_of_core == "on" or cfg.resume:
        if not local:
            raise UserError("--out-of-core on needs a local Hugging Face directory with safetensors weights "
                            f"({cfg.model} is not one).")
        if cfg.search:
            raise UserError("--search scores many pruned models in memory; it cannot run out of core.")
        if cfg.structure == "depth":
            raise UserError("--structure depth scores every block on the whole model in memory; it cannot run "
                            "out of core (use --out-of-core off).")
        if cfg.calib == "self":
            raise UserError("--calib self generates text with the whole model; it cannot run out of core.")
        say("out of core: asked for" if cfg.out_of_core == "on" else "out of core: resuming an interrupted run")
        return True
    if not local or cfg.search or cfg.calib == "self":
        return False
    need = 4 * checkpoint_params(path)
    free = available_bytes()
    if need > free // 2:
        if cfg.structure == "depth":
            raise UserError(f"--structure {cfg.structure} needs the whole model in memory, and the model in "
                            f"float32 ({need / 2**30:.1f} GiB) does not fit in half of the free memory "
                            f"({free / 2**30:.1f} GiB).")
        say(f"out of core: the model in float32 ({need / 2**30:.1f} GiB) does not fit in half of the free memory "
            f"({free / 2**30:.1f} GiB); one layer at a time stays in memory")
        return True
    return False


def checkpoint_params(path: Path) -> int:
    """Number of weights in a checkpoint, from its safetensors headers (nothing else is read)."""
    import math

    from .model.safetensors_files import header, weight_files

    return sum(math.prod(t["shape"]) for f in sorted(set(weight_files(path).values()))
               for t in header(path / f)[0].values())


class ExportSink(LayerSink):
    """The streaming export of one run: each pruned layer goes to the output's shards."""

    def __init__(self, lazy: LazyModel, adapter, comp, dtype: torch.dtype, work: WorkState,
                 shard_bytes: int | None = None):
        from exporters.stream import STREAM_SHARD_BYTES, ShardWriter

        self.lazy, self.adapter, self.comp, self.dtype, self.work = lazy, adapter, comp, dtype, work
        self.writer = ShardWriter(work.export_dir, STREAM_SHARD_BYTES if shard_bytes is None else shard_bytes,
                                  parts=work.state["parts"])
        self.expected: set[str] | None = None
        self.target = None
        self.renumber: dict[int, int] | None = None

    def begin(self, keeps: list[LayerKeep]) -> None:
        """The output's config follows from the allocated widths (known before pass 2)."""
        from exporters.hf import layer_renumbering, target_config

        from .model import adapter_for_config

        files = self.lazy.files
        shapes = [self.adapter.shape(layer) for layer in self.adapter.layers(self.lazy.model)]
        biases = [self.comp.biases(s, k) for s, k in zip(shapes, keeps, strict=True)]  # as the cuts will add them
        w = Widths(heads=[len(k.q_heads) for k in keeps], kv_heads=[len(k.kv_heads) for k in keeps],
                   intermediate=[len(k.channels) for k in keeps], head_dim=shapes[0].head_dim,
                   o_bias=any(o for o, _ in biases) or any(k.endswith("o_proj.bias") for k in files),
                   down_bias=any(d for _, d in biases) or any(k.endswith("down_proj.bias") for k in files),
                   qkv_bias=any(k.endswith("q_proj.bias") for k in files))
        cfg, fmt = target_config(self.lazy.config, w, self.dtype)
        self.target = (cfg, fmt)
        self.renumber = layer_renumbering(w)  # wholly removed layers are left out of the export
        self.expected = adapter_for_config(cfg).expected_keys(cfg.to_dict())

    def add(self, index: int, layer) -> bool:
        from exporters.stream import layer_tensors

        return self.writer.add(layer_tensors(layer, index, self.expected, self.dtype, self.renumber))

    def state(self) -> list[dict]:
        return self.writer.state()

    def finish(self, tokenizer):
        """The tensors outside the decoder layers (embeddings, final norm, LM head), then the config,
        tokenizer and generation config; the parts get their final shard names."""
        from exporters.hf import finish_dir

        cfg, fmt = self.target
        if not self.work.state.get("rest_written"):  # a resumed run may have written them already
            rest = [k for k in sorted(self.lazy.files) if not k.startswith("model.layers.")
                    and not (k == "lm_head.weight" and getattr(cfg, "tie_word_embeddings", False))]
            small = [k for k in rest if "embed" not in k and not k.startswith("lm_head")]
            for group in [small, *[[k] for k in rest if k not in small]]:  # the large ones one at a time
                self.writer.add({k: self.lazy.tensor(k, dtype=self.dtype).contiguous() for k in group})
            self.writer.flush()
            self.work.state.update(parts=self.writer.state(), rest_written=True)
            self.work.save()
        files = self.writer.finish()  # idempotent: parts renamed before an interruption count as done
        gen = None
        if (self.lazy.path / "generation_config.json").is_file():
            from transformers import GenerationConfig

            gen = GenerationConfig.from_pretrained(self.lazy.path)
        return finish_dir(self.writer.out, cfg, fmt, files, gen, tokenizer)


def open_work(cfg: RunConfig, out: Path, fingerprint: dict, say) -> WorkState:
    """The work directory beside --out: a stale one (a killed run) is reported and removed, unless
    --resume continues it."""
    folder = work_dir_for(out)
    work = WorkState(folder, fingerprint)
    if cfg.resume:
        if not (folder / "state.json").is_file():
            raise UserError(f"Nothing to resume: there is no interrupted run for {out} (no {folder}).")
        work.load()
        say(f"resuming: pass 1 has {work.pass1_done} layers, pass 2 has written {work.pass2_done} layers")
        return work
    if folder.exists():
        say(f"removing the work directory of an earlier interrupted run ({folder}); pass --resume to continue one")
        shutil.rmtree(folder)
    work.create()
    return work


def fingerprint(cfg: RunConfig, spec, dtype: torch.dtype) -> dict:
    return {"model": str(Path(resolve(cfg.model)).expanduser().absolute()), "metric": spec.metric,
            "compensation": spec.compensation, "structure": spec.structure, "ratio": spec.ratio,
            "attn_unit": spec.attn_unit, "round_to": spec.round_to, "tensor_parallel": spec.tensor_parallel,
            "calib": cfg.calib, "nsamples": cfg.nsamples,
            "seqlen": cfg.seqlen, "seed": cfg.seed, "batch_size": cfg.batch_size, "device": cfg.device,
            "dtype": str(dtype), "export_dtype": cfg.export_dtype, "passes": cfg.passes,
            "domain_windows": cfg.domain_windows, "quantize": cfg.quantize,  # both stored as stages
            "recover_tokens": cfg.recover_tokens, "recover_lora": cfg.recover_lora}


def prepare_lazy(cfg: RunConfig, stages):
    """Stage "load": the skeleton and the tokenizer; stage "data": the token windows."""
    from transformers import AutoTokenizer

    with stages.timed("load"):
        path = Path(resolve(cfg.model)).expanduser()
        lazy = LazyModel(path, trust_remote_code=cfg.trust_remote_code)
        try:
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise UserError(f"The model directory {path} has no usable tokenizer ({exc}).") from exc
        adapter = adapter_for(lazy.model)
        cfg.check_model(lazy.config)
    with stages.timed("data"):
        texts = load_texts(cfg.calib, tok, None, cfg.nsamples, cfg.seqlen, cfg.eval_samples, cfg.seed)
        domains = domain_windows(tok, cfg.seqlen, cfg.domain_windows) if cfg.domain_windows else []
    return lazy, Prepared(LoadedModel(lazy.model, tok, cfg.model or str(path)), adapter, texts, domains)


def run_out_of_core(cfg: RunConfig, profile, round_to: int, stages, console):
    """The whole job out of core; returns the report (also written to OUT/report.json)."""
    say = console.print
    if cfg.quantize_only:
        raise UserError(f"--quantize {cfg.quantize} without --ratio (quantization only) runs in memory; out of core, "
                        "pass --ratio R with it, or --out-of-core off if the model fits.")
    lazy, prep = prepare_lazy(cfg, stages)
    plan, ratio = choose_plan(cfg, profile, round_to, stages, say)
    if isinstance(plan, steps.LeverPlan):
        cfg = cfg.model_copy(update={"quantize": plan.frontier.chosen.fmt})
    spec = steps.prune_spec(cfg, ratio, round_to, tensor_parallel_size(profile))
    if isinstance(plan, steps.LeverPlan):  # what the frontier priced, as in memory: the same widths in every layer
        spec = replace(spec, structure="uniform")
    spec = steps.quantizable(cfg, auto_structure(cfg, spec, lazy, prep.adapter, say), say)
    out = steps.output_dir(cfg, spec, name=cfg.quantize if ratio == 0 else None)
    steps.announce(cfg, profile, spec, plan, out, say)
    dtype = lazy.dtype if cfg.export_dtype == "auto" else getattr(torch, cfg.export_dtype)
    say(f"out of core: weights stay in {lazy.path} ({checkpoint_bytes(lazy.path) / 2**30:.1f} GiB), computed in "
        f"{str(lazy.dtype).replace('torch.', '')}, one layer at a time on {cfg.device}")
    folder = work_dir_for(out)
    keep_work = False
    try:
        try:
            work = open_work(cfg, out, fingerprint(cfg, spec, lazy.dtype), say)
        except UserError:
            keep_work = cfg.resume  # a refused --resume (other settings) leaves the interrupted run as it was
            raise
        return _run(cfg, profile, plan, spec, lazy, prep, work, dtype, stages, console, out)
    except Interrupted as exc:
        keep_work = True
        raise UserError(f"Interrupted by {exc.signal_name}; the finished layers are kept in {folder}: rerun the same "
                        "command with --resume to continue.", exit_code=130) from None
    except KeyboardInterrupt:
        keep_work = True
        raise
    except Exception as exc:
        # a resumed run never loses its work; a fresh one keeps it past an unexpected error, not a refusal
        # or a full disk (its work would hold the space the user needs back)
        full = _disk_full(exc)
        keep_work = folder.is_dir() and (cfg.resume or not (full or isinstance(exc, UserError)))
        if not keep_work:
            if full:
                raise UserError(f"The disk holding {folder.parent} is full; nothing was written.",
                                exit_code=28) from exc
            raise
        import traceback

        (folder / "error.log").write_text("".join(traceback.format_exception(exc)))
        if full:
            what = f"the disk holding {folder.parent} is full"
        elif isinstance(exc, UserError):
            what = str(exc).rstrip(".")
        else:
            what = f"the run failed ({type(exc).__name__}: {exc}; details in {folder / 'error.log'})"
        raise UserError(f"{what[0].upper()}{what[1:]}; the finished work is kept in {folder}: rerun the same command "
                        "with --resume to continue.", exit_code=28 if full else getattr(exc, "exit_code", 1)) from exc
    finally:
        if not keep_work:
            shutil.rmtree(folder, ignore_errors=True)


def choose_plan(cfg: RunConfig, profile, round_to: int, stages, say):
    """--ratio or --width-only: `steps.choose_ratio`. Else every lever that runs out of core: width x
    weight format, with no layer dropped and ranked by the weights removed, since choosing the layers
    to drop and measuring the candidates' KL need the whole model in memory. -> (plan, width ratio)."""
    if cfg.ratio is not None or cfg.levers is False:
        return steps.choose_ratio(cfg, profile, round_to, stages, say)
    from .budget.frontier import lever_plan
    from .budget.planner import InfeasibleBudget

    with stages.timed("plan"):
        frontier, _ = lever_plan(profile, cfg.model, attn_unit=cfg.attn_unit, round_to=round_to, say=say,
                                 compensation=cfg.compensation, max_dropped=0, confirmable=False)
        steps.lever_notes_and_refusals(frontier, profile, say)
        frontier.unscored = ("out of core: width and weight format only, no layer dropped, since choosing layers "
                             "to drop and measuring the candidates' KL need the whole model in memory")
        chosen = frontier.choose()
        if chosen is None:  # the best candidates missed the budget at their exact shapes
            raise InfeasibleBudget(frontier.notes[-1] + " Pass --ratio to prune anyway.")
    say(f"[bold]plan[/]: {chosen.levers}, predicted TPOT {chosen.prediction.tpot_s * 1e3:.2f} ms, TTFT "
        f"{chosen.prediction.ttft_s * 1e3:.1f} ms ({frontier.rule}; latency {frontier.latency_source})")
    return steps.LeverPlan(frontier, "every lever, out of core"), round(chosen.width, 4)


def _stored(work: WorkState, key: str, compute):
    """The value a stage stored in the work state, or `compute()` stored now (a resumed run skips
    the stages it finished)."""
    if work.state.get(key) is None:
        work.state[key] = compute()
        work.save()
    return work.state[key]


def auto_structure(cfg: RunConfig, spec, lazy, adapter, say):
    """`steps.auto_structure` out of core: the searched allocation where every layer's statistics, Gram
    matrices included, fit in the free memory (its candidates are built from them) and --passes two
    was not asked for, else `global`."""
    if cfg.structure != "auto" or spec.ratio == 0 or spec.structure != "global" or cfg.search:
        return spec
    if cfg.passes == "two":
        say("structure [cyan]global[/]: --passes two keeps one layer's statistics at a time, and the "
            "allocation search builds its candidates from every layer's")
        return spec
    shapes = [adapter.shape(layer) for layer in adapter.layers(lazy.model)]
    need = gram_bytes(shapes) + max(refit_bytes(s, lazy.config.hidden_size) for s in shapes)
    free = available_bytes()
    if need > 0.8 * free:
        say(f"structure [cyan]global[/]: the allocation search builds its candidates from every layer's Gram "
            f"matrices ({need / 2**30:.1f} GiB), more than the free memory allows ({free / 2**30:.1f} GiB)")
        return spec
    return steps.auto_structure(cfg, spec, checkpoint_params(lazy.path), say)


def _run(cfg, profile, plan, spec, lazy, prep, work, dtype, stages, console, out):
    from .evaluate.perplexity import finite, layerwise_domain_perplexities, layerwise_perplexity

    say = console.print
    model, adapter, tok = lazy.model, prep.adapter, prep.loaded.tokenizer
    before = adapter.count_params(model)
    no_lm_eval = ("not measured: the model does not fit in memory, so lm-eval cannot run on it in process; pass "
                  "--lm-eval-backend vllm to score the export in vLLM")

    def evaluate(which: str, model_of, simulate=None) -> tuple[float, dict | None]:
        """Held-out and cross-domain perplexity, layer by layer, each stored as it goes (stage
        perplexity_WHICH); `model_of()` gives the lazy model and its adapter; `simulate`: the weight
        format each layer runs in."""
        with stages.timed(f"perplexity_{which}"):
            ppl = _stored(work, f"ppl_{which}", lambda: finite(
                layerwise_perplexity(*model_of(), prep.heldout, cfg.device, store=work.folder / f"ppl-{which}",
                                     simulate=simulate),
                f"{which} held-out perplexity"))
            cross = _stored(work, f"cross_{which}", lambda: layerwise_domain_perplexities(
                *model_of(), prep.domains, cfg.device, store=work.folder / f"ppl-{which}",
                simulate=simulate)) if prep.domains else None
        label = "pruned, before recovery," if which == "before_recovery" else which
        say(f"{label} held-out perplexity: {ppl:.3f} (layer by layer)")
        if cross:
            finite(cross["geomean"], f"{label} cross-domain perplexity")
            say(f"{label} cross-domain perplexity: {cross['geomean']:.3f} (geometric mean, layer by layer)")
        return ppl, cross

    written: list = []  # the export read back, once: (LazyModel, adapter)

    def pruned_model():
        if not written:
            m = LazyModel(work.export_dir)  # our format is registered: no remote code
            written.extend((m, adapter_for(m.model)))
        return written

    with run_tasks(prep.texts.heldout_text, cfg, profile) as tasks:
        ppl_dense, cross_dense = evaluate("dense", lambda: (lazy, adapter))
        if cfg.checks:
            tasks.dense = tasks.pruned = {"skipped": no_lm_eval}
            say(f"lm-eval in process {no_lm_eval}")
        # the dense model's targets, before pruning cuts the skeleton's layers
        targets = _teacher(cfg, lazy, prep, work, stages, say) if cfg.recover_tokens and spec.ratio else None
        sink = ExportSink(lazy, adapter, COMPENSATION.get(spec.compensation), dtype, work)
        with stages.timed("pruning_step"):
            result = _prune(cfg, lazy, prep, spec, work, sink, console)
        with stages.timed("export"):
            res = _export(sink, tok, work)
        recovery = None
        if cfg.recover_tokens and not spec.ratio:
            say("recovery: skipped, the plan removes no weight (its format alone meets the budget)")
        elif targets is not None:
            recovery = _recover(cfg, targets, work, pruned_model, evaluate, stages, say)
            written.clear()  # the export's shards were rewritten: read them again
        # the pruned model in its weight format, as the in-memory run judges it (the export is quantized later)
        ppl_pruned, cross_pruned = evaluate("pruned", pruned_model, simulate=None if cfg.quantize == "none" else
                                            functools.partial(fake_quantized, fmt=cfg.quantize))
        # counted on what was written (a resumed run's skeleton has only its own layers cut)
        after = _stored(work, "params_after", lambda: pruned_model()[1].count_params(pruned_model()[0].model))
        report = steps.build_report(cfg, profile.name, prep, spec, result, before, ppl_dense, ppl_pruned, after,
                                    cross_domain=(cross_dense, cross_pruned))
        report.recovery = recovery
        # after the layer-wise perplexity, before the checks; a resumed run does not quantize twice
        work.state["quantized"] = steps.quantize(work.export_dir, res, cfg, stages, say,
                                                 done=work.state.get("quantized"))
        work.save()
        steps.finish_report(report, work.export_dir, res, dtype, prep.loaded.source, profile, plan, tasks, cfg,
                            stages, say)
    if out.exists():
        out.rmdir()  # empty (checked before any work)
    os.replace(work.export_dir, out)
    report.output = str(out)
    return report


def _teacher(cfg, lazy, prep, work, stages, say):
    """--recover-tokens out of core: the recovery text and the dense model's top-k targets on it,
    layer by layer (stage recover_teacher), kept in the work directory."""
    from safetensors.torch import load_file, save_file

    from .recover.distill import TeacherTargets, recovery_windows
    from .recover.streamed import streamed_teacher_targets

    n = max(4, min(256, -(-cfg.recover_tokens // cfg.seqlen)))
    saved = work.folder / "recovery-targets.safetensors"
    with stages.timed("recover_teacher"):
        if saved.is_file():  # a resumed run
            t = load_file(str(saved))
            targets = TeacherTargets(t["windows"], t["top_ids"], t["top_logp"])
        else:
            windows = recovery_windows(cfg.calib, prep.loaded.tokenizer, None, n, cfg.seqlen, cfg.seed)
            started = time.monotonic()
            targets = streamed_teacher_targets(lazy, prep.adapter, windows, cfg.device)
            work.state["recover_teacher_s"] = time.monotonic() - started
            tmp = saved.with_name(saved.name + ".partial")
            save_file({"windows": targets.windows, "top_ids": targets.top_ids, "top_logp": targets.top_logp},
                      str(tmp))
            os.replace(tmp, saved)
            work.save()
    say(f"recovery text: {n} windows of {cfg.seqlen} tokens from the calibration sources (a model that does not "
        "fit in memory generates no samples of its own); the dense model's top-32 next-token log-probabilities kept")
    return targets


def _recover(cfg, targets, work, pruned_model, evaluate, stages, say) -> dict:
    """--recover-tokens out of core (`recover/streamed.py`), each step stored in the work state: the
    pruned model's perplexities before recovery, the LoRA training, then the adapters added to the
    export's shards."""
    import json

    from safetensors.torch import load_file, save_file

    from .recover.streamed import distill_streamed, merge_into_shards

    rank = cfg.recover_lora or 16
    n = targets.windows.shape[0]
    held, cross = evaluate("before_recovery", pruned_model)
    factors_file = work.folder / "recovery-adapters.safetensors"
    if work.state.get("recovery") is None:
        student, adapter = pruned_model()
        steps_n = -(-cfg.recover_tokens // (4 * (cfg.seqlen - 1)))
        # a step: the layers forward, then each read again, recomputed and run backward (about 4 forwards)
        guess = 4 * steps_n * 4 / n * work.state.get("recover_teacher_s", 0.0)
        say(f"recovery out of core: LoRA rank {rank} on every decoder Linear (the weights stay frozen in the export's "
            f"shards, one layer in memory at a time; the adapters and their optimizer state in memory), {steps_n} "
            f"steps of 4 windows; predicted about {guess / 60:.0f} min (4 forward passes a step, from the teacher's)")
        with stages.timed("recover"):
            res, factors = distill_streamed(student, adapter, targets, cfg.recover_tokens, rank, device=cfg.device,
                                           say=say, seed=cfg.seed)
        tmp = factors_file.with_name(factors_file.name + ".partial")
        save_file({k: v.contiguous() for k, v in factors.items()}, str(tmp))
        os.replace(tmp, factors_file)
        work.state["recovery"] = json.dumps(res.as_dict())
        work.save()
    res = json.loads(work.state["recovery"])
    if not work.state.get("recovery_merged"):  # once merged, later stages (quantization) rewrite the shards
        merge_into_shards(work.export_dir, load_file(str(factors_file)))
        work.state["recovery_merged"] = True
        work.save()
    say(f"recovery: {res['tokens']:,} tokens in {res['seconds']:.0f} s ({res['mode']}), KL to the dense model "
        f"{res['loss_first']:.4f} -> {res['loss_last']:.4f}")
    return {**res, "tokens_requested": cfg.recover_tokens, "unique_tokens": int(targets.windows.numel()),
            "text": "the calibration sources' calibration region (out of core: no samples of the model's own)",
            "before": {"heldout_perplexity": round(held, 4),
                       "cross_domain_perplexity": round(cross["geomean"], 4) if cross else None,
                       "device": cfg.device}}


def _export(sink: ExportSink, tokenizer, work: WorkState):
    """The export's last tensors, names, config and tokenizer, once: a resumed run reads what was done."""
    from exporters.hf import ExportResult

    done = work.state.get("exported")
    if done is not None:
        return ExportResult(path=work.export_dir, **done)
    res = sink.finish(tokenizer)
    work.state["exported"] = {"format": res.format, "architecture": res.architecture, "files": list(res.files),
                              "dropped_layers": list(res.dropped_layers)}
    work.save()
    return res


def _prune(cfg, lazy, prep, spec, work, sink, console):
    with layer_progress(console, len(prep.adapter.layers(lazy.model))) as progress:
        if spec.ratio == 0:  # a weight format alone: the layers as they are
            return copy_out_of_core(lazy, prep.adapter, sink, work=work, progress=progress)
        search = None
        if spec.structure == "searched":
            search = functools.partial(_search, lazy, prep, spec, cfg, console.print)
        return prune(lazy, prep.adapter, prep.calib, spec, cfg.compute, sink, work=work, free_bytes=available_bytes(),
                     progress=progress, say=console.print, passes=cfg.passes, search=search)


def _search(lazy, prep, spec, cfg, say, scores, stats):
    """The searched allocation from pass 1's statistics, each generation streamed over the decoder."""
    from .prune.driver import Scored
    from .prune.evolve import search_keeps

    return search_keeps(lazy, prep.adapter, Scored(scores, stats), spec, prep.validation, cfg.compute, say=say,
                        generations=cfg.search_generations, seed=cfg.seed)
