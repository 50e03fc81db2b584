"""The run's weights when the model fits in memory: each stage of `pipeline.run` on the model in
place (evaluate, teacher targets, prune, recover), then the export written into a temporary
sibling of the output directory, renamed into place only when complete. `Streamed` is the same
interface with the weights left in the checkpoint's files."""

from __future__ import annotations

import gc
from contextlib import contextmanager

import torch

from ..config import RunConfig
from ..data import domain_windows, load_texts
from ..evaluate.lm_eval import Tasks
from ..evaluate.perplexity import domain_perplexities, finite, finite_scores, perplexity
from ..model import adapter_for
from ..model.loading import load
from ..model.precision import autocast_to
from ..output import atomic_dir
from ..prune.driver import PruneResult, prune
from ..prune.surgery import LayerKeep
from .plan import RunPlan, auto_structure
from .report import finish_report, quantize
from .stages import Prepared, Stages, layer_progress

TEACHER_NOTE = "the calibration sources' calibration region and the dense model's own samples, half each"


def prepare(cfg: RunConfig, stages: Stages | None = None) -> Prepared:
    """Load the model (stage "load") and its calibration and held-out text (stage "data")."""
    stages = stages or Stages()
    with stages.timed("load"):
        loaded = load(cfg.model, cfg.dtype if cfg.dtype == "auto" else getattr(torch, cfg.dtype),
                      trust_remote_code=cfg.trust_remote_code)
        adapter = adapter_for(loaded.model)
        cfg.check_model(loaded.model.config)
    with stages.timed("data"):
        texts = load_texts(cfg.calib, loaded.tokenizer, loaded.model, cfg.nsamples, cfg.seqlen, cfg.eval_samples,
                           cfg.seed)
        domains = domain_windows(loaded.tokenizer, cfg.seqlen, cfg.domain_windows) if cfg.domain_windows else []
    return Prepared(loaded, adapter, texts, domains)


def unpruned(adapter, model, note: dict) -> PruneResult:
    """The result of a plan that prunes nothing (a weight format alone): every head and channel kept."""
    keeps = [LayerKeep(list(range(s.num_heads)), list(range(s.num_kv_heads)), list(range(s.intermediate_size)))
             for s in (adapter.shape(layer) for layer in adapter.layers(model))]
    return PruneResult(keeps, {}, 0, "none", notes=note)


class Resident:
    """The model in memory (`prepare`), changed in place by the stages."""

    resident = True

    def __init__(self, cfg: RunConfig, prep: Prepared, stages: Stages, console):
        self.cfg, self.prep, self.stages, self.console = cfg, prep, stages, console
        self.say = console.print
        self.model = prep.loaded.model
        self.precision = None  # the session's (`RunPlan.precision`)
        self.before = prep.adapter.count_params(self.model)

    @classmethod
    def open(cls, cfg: RunConfig, stages: Stages, console) -> Resident:
        weights = cls(cfg, prepare(cfg, stages), stages, console)
        dtype = str(weights.model.dtype).replace("torch.", "")
        weights.say(f"in memory: the weights in {dtype}" + (" (the checkpoint's dtype)" if cfg.dtype == "auto" else ""))
        return weights

    def auto_structure(self, cfg: RunConfig, spec, say):
        return auto_structure(cfg, spec, self.before["total"], say)

    @contextmanager
    def session(self, plan: RunPlan):
        """The run after planning; nothing is kept between stages but the model itself."""
        self.cfg, self.precision = plan.cfg, plan.precision
        yield

    def evaluate(self, which: str, tasks: Tasks, fmt: str = "none") -> tuple[float, dict | None]:
        """In-domain held-out and cross-domain perplexity (stage perplexity_WHICH) and the lm-eval
        tasks (stage lm_eval) of the model as it is now, in the weight format `fmt` (compressed-tensors'
        fake quantization in torch) -> (held-out perplexity, cross-domain figures or None)."""
        from ..prune.planned import fake_quantized

        judged = self.model if fmt == "none" else fake_quantized(self.model, fmt)
        with self.stages.timed(f"perplexity_{which}"), autocast_to(self.cfg.device, self.precision):
            ppl, cross = perplexities(which, judged, self.prep, self.say)
        with self.stages.timed("lm_eval"):
            tasks.score(which, judged, self.prep.loaded.tokenizer, self.cfg.device, say=self.say)
        finite_scores(getattr(tasks, which, None), f"{which} model's lm-eval score")
        del judged
        gc.collect()  # a quantized copy is cyclic garbage (its hooks refer to it)
        return ppl, cross

    def teacher(self):
        """The recovery text and the dense model's top-k targets on it (stage recover_teacher)."""
        from ..recover.distill import recovery_windows, teacher_targets

        cfg = self.cfg
        with self.stages.timed("recover_teacher"):
            n = recovery_window_count(cfg)
            windows = recovery_windows(cfg.calib, self.prep.loaded.tokenizer, self.model, n, cfg.seqlen, cfg.seed)
            targets = teacher_targets(self.model, windows)
        self.say(f"recovery text: {n} windows of {cfg.seqlen} tokens (the calibration sources and the dense model's "
                 "own samples); the dense model's top-32 next-token log-probabilities kept")
        return targets

    def prune(self, plan: RunPlan) -> PruneResult:
        """Calibrate, score, allocate, prune and compensate the model in place (stage pruning_step)."""
        cfg, spec, model, adapter = self.cfg, plan.spec, self.model, self.prep.adapter
        if spec.ratio == 0 and plan.execute is None:
            return unpruned(adapter, model, {"quantize_only": cfg.quantize})
        with layer_progress(self.console, len(adapter.layers(model))) as progress, \
                self.stages.timed("pruning_step"):
            if plan.execute is not None:  # the lever plan prunes with the state it planned with
                return plan.execute()
            prep, say = self.prep, self.say
            if cfg.search:
                from ..prune.search import run_search

                return run_search(model, adapter, prep.calib, prep.validation, spec, cfg, perplexity, say=say)
            if spec.structure == "depth":
                from ..prune.depth import prune_depth

                return prune_depth(model, adapter, prep.calib, spec, cfg.compute, say=say, blocks=cfg.blocks)
            if spec.structure == "searched":
                from ..prune.evolve import prune_searched

                return prune_searched(model, adapter, prep.calib, prep.validation, spec, cfg.compute, say=say,
                                      progress=progress, generations=cfg.search_generations, seed=cfg.seed)
            return prune(model, adapter, prep.calib, spec, cfg.compute, progress=progress, say=say,
                         passes=cfg.passes)

    def recover(self, targets) -> dict:
        """The pruned model's perplexities before recovery, then `distill` in place (stage recover);
        the report's recovery section."""
        from ..recover.distill import distill

        cfg = self.cfg
        with self.stages.timed("perplexity_before_recovery"), autocast_to(cfg.device, self.precision):
            held, cross = perplexities("pruned, before recovery,", self.model, self.prep, self.say)
        with self.stages.timed("recover"):
            kept = self.params_after()["decoder"] / self.before["decoder"]
            res = distill(self.model, targets, cfg.recover_tokens, lora_rank=cfg.recover_lora, kept=kept,
                          decoder_layers=self.prep.adapter.layers(self.model), say=self.say, seed=cfg.seed)
        return recovery_section(res.as_dict(), cfg, targets, held, cross, TEACHER_NOTE, self.say)

    def params_after(self) -> dict:
        return self.prep.adapter.count_params(self.model)

    def write(self, report, plan: RunPlan, profile, tasks: Tasks) -> None:
        """Export, quantize, check (latency, accuracy, verdict, plot) and write the report files, all
        into a temporary sibling of the output renamed into place only when complete."""
        from exporters import export_hf

        cfg, stages = self.cfg, self.stages
        dtype = self.model.dtype if cfg.export_dtype == "auto" else getattr(torch, cfg.export_dtype)
        with atomic_dir(plan.out) as tmp:
            with stages.timed("export"):
                res = export_hf(self.model, self.prep.loaded.tokenizer, tmp, dtype=dtype)
            quantize(tmp, res, cfg, stages, self.say)  # before the checks: they measure the quantized model
            finish_report(report, tmp, res, dtype, self.prep.loaded.source, profile, plan.record, tasks, cfg, stages,
                          self.say)
        report.output = str(plan.out)


def perplexities(which: str, model, prep: Prepared, say) -> tuple[float, dict | None]:
    """In-domain held-out perplexity and cross-domain perplexity of the model in memory, said and
    checked finite: (held-out perplexity, `domain_perplexities` or None)."""
    ppl = finite(perplexity(model, prep.heldout), f"{which} held-out perplexity")
    cross = domain_perplexities(model, prep.domains) if prep.domains else None
    say(f"{which} held-out perplexity (in-domain): {ppl:.3f}")
    if cross:
        finite(cross["geomean"], f"{which} cross-domain perplexity")
        each = ", ".join(f"{k} {v:.2f}" for k, v in cross["domains"].items())
        say(f"{which} cross-domain perplexity: {cross['geomean']:.3f} (geometric mean; {each})")
    return ppl, cross


def recovery_window_count(cfg: RunConfig) -> int:
    """Unique recovery windows: the token budget's, at least 4 and at most 256."""
    return max(4, min(256, -(-cfg.recover_tokens // cfg.seqlen)))


def recovery_section(res: dict, cfg: RunConfig, targets, held: float, cross: dict | None, text: str, say) -> dict:
    """The report's recovery section (the training's figures, the text, the quality before), said."""
    lr = f", learning rate {res['lr']:g}" if res.get("lr") else ""
    say(f"recovery: {res['tokens']:,} tokens in {res['seconds']:.0f} s ({res['mode']}{lr}), KL to the dense model "
        f"{res['loss_first']:.4f} -> {res['loss_last']:.4f}")
    return {**res, "tokens_requested": cfg.recover_tokens, "unique_tokens": int(targets.windows.numel()),
            "text": text,
            "before": {"heldout_perplexity": round(held, 4),
                       "cross_domain_perplexity": round(cross["geomean"], 4) if cross else None,
                       "device": cfg.device}}
