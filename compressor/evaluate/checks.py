"""After export: latency and throughput in the profile's runtime, accuracy from lm-eval, and the
verdict on every budget line, written into the report."""

from __future__ import annotations

import json
from pathlib import Path

from profiles import Profile
from profiles.costmodel import Arch

from ..budget.shapes import arch_of
from ..model.loading import read_config
from . import lm_eval
from .latency import latency
from .verdict import budget_lines, describe, passed, summary, target, verified


def check_export(perplexity: dict, export_dir: Path, profile: Profile, plan, model_source: str,
                 tasks: lm_eval.Tasks, say=print, runtime: str | None = None) -> tuple[object, dict, dict]:
    """Measure latency, gather accuracy and judge every budget line (`perplexity`: the report's
    perplexity section); returns what the report's latency, accuracy and budget sections hold. With
    `tasks.vllm` the lm-eval tasks also run on the export through lm-eval's vLLM backend
    (accuracy.lm_eval.pruned_vllm: the weights as vLLM serves them)."""
    config, dense_dir = read_config(None if model_source.startswith("embedded:") else model_source)
    pruned_arch = Arch.from_config(json.loads((export_dir / "config.json").read_text()))
    lat = latency(export_dir, profile, plan, arch_of(config), pruned_arch, dense_dir, say=say,
                  runtime=runtime)
    le = {"dense": tasks.dense, "pruned": tasks.pruned, "device": perplexity["device"],
          "tasks": [lm_eval.TASK_PPL, lm_eval.TASK_CLOZE], "backend": "lm_eval.simple_evaluate, HF model in process",
          "text": "builtin held-out region; the cloze task also docstrings of standard-library modules"}
    if tasks.change is not None:  # paired over the same cloze items (lm_eval.accuracy_change)
        le["change"] = tasks.change
    if tasks.pruned.get("skipped"):
        le = {"skipped": tasks.pruned["skipped"]}
    if tasks.vllm:
        le["pruned_vllm"] = lm_eval.task_scores_vllm(export_dir, tasks.folder, say=say)
    accuracy = {"lm_eval": le, "max_ppl_increase": profile.accuracy.max_ppl_increase,
                "min_task_accuracy": profile.accuracy.min_task_accuracy}
    lines = budget_lines(profile, lat, {"perplexity": perplexity, "lm_eval": le})
    text, _code = summary(lines, profile)
    budget = {"passed": passed(lines), "verified": verified(lines), "verdict": text, "target": target(profile),
              "lines": lines, "limits": profile.budget.model_dump(), "accuracy_floor": profile.accuracy.model_dump()}
    for ln in lines:
        say(describe(ln))
    return lat, accuracy, budget
