"""The run's weights when the model does not fit in memory: the same stages as `Resident`, with the
weights left in the checkpoint's safetensors files and one decoder layer in memory at a time.

Pruning streams each pruned layer into the output's shards (`ExportSink`); the perplexities, the
teacher's targets and recovery run layer by layer, the pruned model's read back from the written
shards. Everything is written into a work directory beside the output (`.OUT.fitprune-work/`), which
also holds the state that `--resume` continues from (`session`); its `export/` folder is renamed to
the output when complete.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from ..config import RunConfig
from ..data import domain_windows, load_texts
from ..errors import UserError
from ..evaluate.lm_eval import Tasks
from ..memory import available_bytes
from ..model import adapter_for
from ..model.adapters import Widths
from ..model.lazy import LazyModel, checkpoint_bytes
from ..model.loading import LoadedModel, resolve, stored_dtype
from ..output import Interrupted, _disk_full
from ..prune import COMPENSATION
from ..prune.driver import LayerSink, PruneResult, copy_out_of_core, gram_bytes, prune, refit_bytes
from ..prune.resume import WorkState, work_dir_for
from ..prune.surgery import LayerKeep
from .plan import QuantizeOnly, RunPlan, auto_structure
from .report import finish_report, quantize
from .resident import recovery_section, recovery_window_count
from .stages import Prepared, Stages, layer_progress

NO_LM_EVAL = ("not measured: the model does not fit in memory, so lm-eval cannot run on it in process; pass "
              "--lm-eval-backend vllm to score the export in vLLM")
TEACHER_NOTE = "the calibration sources' calibration region (out of core: no samples of the model's own)"


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
    dtype = (stored_dtype(str(path)) or torch.float32) if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    need = dtype.itemsize * checkpoint_params(path)
    free = available_bytes()
    if need > free // 2:
        name = str(dtype).replace("torch.", "")
        if cfg.structure == "depth":
            raise UserError(f"--structure {cfg.structure} needs the whole model in memory, and the model in "
                            f"{name} ({need / 2**30:.1f} GiB) does not fit in half of the free memory "
                            f"({free / 2**30:.1f} GiB).")
        say(f"out of core: the model in {name} ({need / 2**30:.1f} GiB) does not fit in half of the free memory "
            f"({free / 2**30:.1f} GiB); one layer at a time stays in memory")
        return True
    return False


def checkpoint_params(path: Path) -> int:
    """Number of weights in a checkpoint, from its safetensors headers (nothing else is read)."""
    import math

    from ..model.safetensors_files import header, weight_files

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

        from ..model import adapter_for_config

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


def fingerprint(cfg: RunConfig, spec, dtype: torch.dtype, precision: str | None = None) -> dict:
    """What a resumed run must share with the interrupted one; `precision` is the judging precision
    (stored perplexities are only reused when measured the same way)."""
    return {"model": str(Path(resolve(cfg.model)).expanduser().absolute()), "metric": spec.metric,
            "compensation": spec.compensation, "structure": spec.structure, "ratio": spec.ratio,
            "attn_unit": spec.attn_unit, "round_to": spec.round_to, "tensor_parallel": spec.tensor_parallel,
            "calib": cfg.calib, "nsamples": cfg.nsamples,
            "seqlen": cfg.seqlen, "seed": cfg.seed, "batch_size": cfg.batch_size, "device": cfg.device,
            "dtype": str(dtype), "export_dtype": cfg.export_dtype, "passes": cfg.passes,
            "domain_windows": cfg.domain_windows, "quantize": cfg.quantize,  # both stored as stages
            "recover_tokens": cfg.recover_tokens, "recover_lora": cfg.recover_lora,
            "judging_precision": precision}


def prepare_lazy(cfg: RunConfig, stages):
    """Stage "load": the skeleton and the tokenizer; stage "data": the token windows."""
    from transformers import AutoTokenizer

    with stages.timed("load"):
        path = Path(resolve(cfg.model)).expanduser()
        lazy = LazyModel(path, None if cfg.dtype == "auto" else getattr(torch, cfg.dtype),
                         trust_remote_code=cfg.trust_remote_code)
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


class Streamed:
    """The checkpoint's weights read one layer at a time (`LazyModel`), the export written as pruning
    goes, and the work directory that makes every stage resumable (`session`)."""

    resident = False

    def __init__(self, cfg: RunConfig, lazy: LazyModel, prep: Prepared, stages: Stages, console):
        self.cfg, self.lazy, self.prep, self.stages, self.console = cfg, lazy, prep, stages, console
        self.say = console.print
        self.before = prep.adapter.count_params(lazy.model)
        self.precision = None  # the session's (`RunPlan.precision`)
        self.work: WorkState | None = None
        self.sink: ExportSink | None = None
        self.res = None  # the export's ExportResult, once written
        self._written: list = []  # the export read back, once: (LazyModel, adapter)

    @classmethod
    def open(cls, cfg: RunConfig, stages: Stages, console) -> Streamed:
        lazy, prep = prepare_lazy(cfg, stages)
        return cls(cfg, lazy, prep, stages, console)

    @property
    def dtype(self) -> torch.dtype:
        """The export's dtype: the checkpoint's unless --export-dtype says otherwise."""
        return self.lazy.dtype if self.cfg.export_dtype == "auto" else getattr(torch, self.cfg.export_dtype)

    def auto_structure(self, cfg: RunConfig, spec, say):
        """`plan.auto_structure` out of core: the searched allocation where every layer's statistics, Gram
        matrices included, fit in the free memory (its candidates are built from them) and --passes two
        was not asked for, else `global`."""
        if cfg.structure != "auto" or spec.ratio == 0 or spec.structure != "global" or cfg.search:
            return spec
        if cfg.passes == "two":
            say("structure [cyan]global[/]: --passes two keeps one layer's statistics at a time, and the "
                "allocation search builds its candidates from every layer's")
            return spec
        shapes = [self.prep.adapter.shape(layer) for layer in self.prep.adapter.layers(self.lazy.model)]
        need = gram_bytes(shapes) + max(refit_bytes(s, self.lazy.config.hidden_size) for s in shapes)
        free = available_bytes()
        if need > 0.8 * free:
            say(f"structure [cyan]global[/]: the allocation search builds its candidates from every layer's Gram "
                f"matrices ({need / 2**30:.1f} GiB), more than the free memory allows ({free / 2**30:.1f} GiB)")
            return spec
        return auto_structure(cfg, spec, checkpoint_params(self.lazy.path), say)

    @contextmanager
    def session(self, plan: RunPlan):
        """The work directory for the run after planning (a stale one removed, or --resume's continued).
        An interruption, or an unexpected error, keeps it and says how to continue; a refusal or a full
        disk on a fresh run removes it, as does success."""
        cfg, out, say = plan.cfg, plan.out, self.say
        self.cfg, self.precision = cfg, plan.precision
        say(f"out of core: weights stay in {self.lazy.path} ({checkpoint_bytes(self.lazy.path) / 2**30:.1f} GiB), "
            f"computed in {str(self.lazy.dtype).replace('torch.', '')}, one layer at a time on {cfg.device}")
        folder = work_dir_for(out)
        keep_work = False
        try:
            try:
                self.work = open_work(cfg, out, fingerprint(cfg, plan.spec, self.lazy.dtype, plan.precision), say)
            except UserError:
                keep_work = cfg.resume  # a refused --resume (other settings) leaves the interrupted run as it was
                raise
            yield
        except Interrupted as exc:
            keep_work = True
            raise UserError(f"Interrupted by {exc.signal_name}; the finished layers are kept in {folder}: rerun the "
                            "same command with --resume to continue.", exit_code=130) from None
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
            raise UserError(f"{what[0].upper()}{what[1:]}; the finished work is kept in {folder}: rerun the same "
                            "command with --resume to continue.",
                            exit_code=28 if full else getattr(exc, "exit_code", 1)) from exc
        finally:
            if not keep_work:
                shutil.rmtree(folder, ignore_errors=True)

    def _pruned(self):
        """The export as written so far, read back lazily: (LazyModel, adapter)."""
        if not self._written:
            m = LazyModel(self.work.export_dir)  # our format is registered: no remote code
            self._written.extend((m, adapter_for(m.model)))
        return self._written

    def evaluate(self, which: str, tasks: Tasks, fmt: str = "none") -> tuple[float, dict | None]:
        """Held-out and cross-domain perplexity, layer by layer, each stored as it goes (stage
        perplexity_WHICH): the checkpoint's model for "dense", the written export after, each layer run
        in the weight format `fmt`. lm-eval cannot run in process here: said once, recorded as skipped."""
        from ..evaluate.perplexity import finite, layerwise_domain_perplexities, layerwise_perplexity
        from ..model.precision import autocast_to
        from ..prune.planned import fake_quantized

        cfg, work, prep, say = self.cfg, self.work, self.prep, self.say
        lazy, adapter = (self.lazy, prep.adapter) if which == "dense" else self._pruned()
        simulate = None if fmt == "none" else functools.partial(fake_quantized, fmt=fmt)
        store = work.folder / f"ppl-{which}"
        with self.stages.timed(f"perplexity_{which}"), autocast_to(cfg.device, self.precision):
            ppl = _stored(work, f"ppl_{which}", lambda: finite(
                layerwise_perplexity(lazy, adapter, prep.heldout, cfg.device, store=store, simulate=simulate),
                f"{which} held-out perplexity"))
            cross = _stored(work, f"cross_{which}", lambda: layerwise_domain_perplexities(
                lazy, adapter, prep.domains, cfg.device, store=store, simulate=simulate)) if prep.domains else None
        label = "pruned, before recovery," if which == "before_recovery" else which
        say(f"{label} held-out perplexity: {ppl:.3f} (layer by layer)")
        if cross:
            finite(cross["geomean"], f"{label} cross-domain perplexity")
            say(f"{label} cross-domain perplexity: {cross['geomean']:.3f} (geometric mean, layer by layer)")
        if which == "dense" and cfg.checks:
            tasks.dense = tasks.pruned = {"skipped": NO_LM_EVAL}
            say(f"lm-eval in process {NO_LM_EVAL}")
        return ppl, cross

    def teacher(self):
        """The recovery text and the dense model's top-k targets on it, layer by layer (stage
        recover_teacher), kept in the work directory; before pruning cuts the skeleton's layers."""
        from safetensors.torch import load_file, save_file

        from ..recover.distill import TeacherTargets, recovery_windows
        from ..recover.streamed import streamed_teacher_targets

        cfg, work = self.cfg, self.work
        n = recovery_window_count(cfg)
        saved = work.folder / "recovery-targets.safetensors"
        with self.stages.timed("recover_teacher"):
            if saved.is_file():  # a resumed run
                t = load_file(str(saved))
                targets = TeacherTargets(t["windows"], t["top_ids"], t["top_logp"])
            else:
                windows = recovery_windows(cfg.calib, self.prep.loaded.tokenizer, None, n, cfg.seqlen, cfg.seed)
                started = time.monotonic()
                targets = streamed_teacher_targets(self.lazy, self.prep.adapter, windows, cfg.device)
                work.state["recover_teacher_s"] = time.monotonic() - started
                _save_atomic({"windows": targets.windows, "top_ids": targets.top_ids, "top_logp": targets.top_logp},
                             saved, save_file)
                work.save()
        self.say(f"recovery text: {n} windows of {cfg.seqlen} tokens from the calibration sources (a model that does "
                 "not fit in memory generates no samples of its own); the dense model's top-32 next-token "
                 "log-probabilities kept")
        return targets

    def prune(self, plan: RunPlan) -> PruneResult:
        """Prune layer by layer into the export's shards (stage pruning_step), then write its last
        tensors, config and tokenizer (stage export); a resumed run continues where it stopped."""
        cfg, spec, prep, work = self.cfg, plan.spec, self.prep, self.work
        self.sink = ExportSink(self.lazy, prep.adapter, COMPENSATION.get(spec.compensation), self.dtype, work)
        with self.stages.timed("pruning_step"), \
                layer_progress(self.console, len(prep.adapter.layers(self.lazy.model))) as progress:
            if spec.ratio == 0:  # a weight format alone: the layers as they are
                result = copy_out_of_core(self.lazy, prep.adapter, self.sink, work=work, progress=progress)
                if isinstance(plan.record, QuantizeOnly):
                    result.notes["quantize_only"] = cfg.quantize
            else:
                search = functools.partial(self._search, spec) if spec.structure == "searched" else None
                result = prune(self.lazy, prep.adapter, prep.calib, spec, cfg.compute, self.sink, work=work,
                               free_bytes=available_bytes(), progress=progress, say=self.say, passes=cfg.passes,
                               search=search)
        with self.stages.timed("export"):
            self.res = self._finish_export()
        return result

    def _search(self, spec, scores, stats):
        """The searched allocation from pass 1's statistics, each generation streamed over the decoder."""
        from ..prune.driver import Scored
        from ..prune.evolve import search_keeps

        cfg = self.cfg
        return search_keeps(self.lazy, self.prep.adapter, Scored(scores, stats), spec, self.prep.validation,
                            cfg.compute, say=self.say, generations=cfg.search_generations, seed=cfg.seed)

    def _finish_export(self):
        """The export's last tensors, names, config and tokenizer, once: a resumed run reads what was done."""
        from exporters.hf import ExportResult

        work = self.work
        done = work.state.get("exported")
        if done is not None:
            return ExportResult(path=work.export_dir, **done)
        res = self.sink.finish(self.prep.loaded.tokenizer)
        work.state["exported"] = {"format": res.format, "architecture": res.architecture, "files": list(res.files),
                                  "dropped_layers": list(res.dropped_layers)}
        work.save()
        return res

    def recover(self, targets) -> dict:
        """LoRA recovery out of core (`recover/streamed.py`), each step stored in the work state: the
        pruned model's perplexities before recovery, the training, then the adapters added to the
        export's shards (once: later stages such as quantization rewrite them)."""
        from safetensors.torch import load_file, save_file

        from ..recover.streamed import distill_streamed, merge_into_shards

        cfg, work, say = self.cfg, self.work, self.say
        rank = cfg.recover_lora or 16
        held, cross = self.evaluate("before_recovery", None)
        factors_file = work.folder / "recovery-adapters.safetensors"
        if work.state.get("recovery") is None:
            student, adapter = self._pruned()
            steps_n = -(-cfg.recover_tokens // (4 * (cfg.seqlen - 1)))
            # a step: the layers forward, then each read again, recomputed and run backward (about 4 forwards)
            guess = 4 * steps_n * 4 / targets.windows.shape[0] * work.state.get("recover_teacher_s", 0.0)
            say(f"recovery out of core: LoRA rank {rank} on every decoder Linear (the weights stay frozen in the "
                f"export's shards, one layer in memory at a time; the adapters and their optimizer state in memory), "
                f"{steps_n} steps of 4 windows; predicted about {guess / 60:.0f} min (4 forward passes a step, from "
                "the teacher's)")
            with self.stages.timed("recover"):
                res, factors = distill_streamed(student, adapter, targets, cfg.recover_tokens, rank,
                                                device=cfg.device, say=say, seed=cfg.seed)
            _save_atomic({k: v.contiguous() for k, v in factors.items()}, factors_file, save_file)
            work.state["recovery"] = json.dumps(res.as_dict())
            work.save()
        if not work.state.get("recovery_merged"):  # once merged, later stages (quantization) rewrite the shards
            merge_into_shards(work.export_dir, load_file(str(factors_file)))
            work.state["recovery_merged"] = True
            work.save()
        self._written.clear()  # the export's shards were rewritten: read them again
        return recovery_section(json.loads(work.state["recovery"]), cfg, targets, held, cross, TEACHER_NOTE, say)

    def params_after(self) -> dict:
        """Counted on what was written (a resumed run's skeleton has only its own layers cut)."""
        return _stored(self.work, "params_after", lambda: self._pruned()[1].count_params(self._pruned()[0].model))

    def write(self, report, plan: RunPlan, profile, tasks: Tasks) -> None:
        """Quantize the written export (once: a resumed run does not quantize twice), check it, write
        the report files beside it, and rename it to the output."""
        cfg, work, stages = self.cfg, self.work, self.stages
        work.state["quantized"] = quantize(work.export_dir, self.res, cfg, stages, self.say,
                                           done=work.state.get("quantized"))
        work.save()
        finish_report(report, work.export_dir, self.res, self.dtype, self.prep.loaded.source, profile, plan.record,
                      tasks, cfg, stages, self.say)
        if plan.out.exists():
            plan.out.rmdir()  # empty (checked before any work)
        os.replace(work.export_dir, plan.out)
        report.output = str(plan.out)


def _stored(work: WorkState, key: str, compute):
    """The value a stage stored in the work state, or `compute()` stored now (a resumed run skips
    the stages it finished)."""
    if work.state.get(key) is None:
        work.state[key] = compute()
        work.save()
    return work.state[key]


def _save_atomic(tensors: dict, path: Path, save_file) -> None:
    tmp = path.with_name(path.name + ".partial")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)
