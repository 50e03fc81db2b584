"""The local lm-eval tasks: hundreds of cloze items from two text domains, per-item results, the
statistics the gate and the verdict judge with, and a task folder that never outlives its run.

Interruptions are real signals delivered by a real `compress` process to itself from inside the
stage under test (as in test_reliability.py)."""

from __future__ import annotations

import json
import random

import pytest

from compressor.errors import UserError
from compressor.evaluate import lm_eval as le
from tests.conftest import run_python

FAST = ["--nsamples", "4", "--seqlen", "32", "--round-to", "8", "--ratio", "0.3", "--threads", "1"]


@pytest.fixture(scope="module")
def heldout(tiny_model_dir) -> str:
    """The builtin held-out region as the pipeline decodes it (the SmolLM2 tokenizer)."""
    from transformers import AutoTokenizer

    from compressor.data import heldout_text

    return heldout_text(AutoTokenizer.from_pretrained(tiny_model_dir))


def _items(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "cloze.jsonl").read_text().splitlines()]


def test_hundreds_of_cloze_items_from_two_domains(tmp_path, heldout):
    le.write_tasks(tmp_path, heldout)
    items = _items(tmp_path)
    assert len(items) == le.CLOZE_ITEMS >= 400
    by_domain = {d: [i for i in items if i["domain"] == d] for d in ("pydoc", "docstrings")}
    assert all(len(v) >= 150 for v in by_domain.values()), {k: len(v) for k, v in by_domain.items()}
    domains = le.cloze_domains(heldout)
    for item in items:
        assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4 and 0 <= item["gold"] < 4
        assert all(len(c.split()) == le.CHOICE_WORDS for c in item["choices"])
        assert le.CONTEXT_WORDS[0] <= len(item["context"].split()) <= le.CONTEXT_WORDS[1]
    for item in random.Random(0).sample(items, 40):  # the true continuation follows its passage in the text
        true = item["context"] + item["choices"][item["gold"]]
        assert any(true in p for p in domains[item["domain"]])
    assert len({i["context"] for i in items}) == len(items)  # no passage asked twice
    # the gold position is not a giveaway
    assert max(sum(i["gold"] == g for i in items) for g in range(4)) < 0.3 * len(items)


def test_the_items_are_the_same_every_run(tmp_path, heldout):
    le.write_tasks(tmp_path / "a", heldout)
    le.write_tasks(tmp_path / "b", heldout)
    assert le.items_digest(tmp_path / "a") == le.items_digest(tmp_path / "b")
    le.write_tasks(tmp_path / "c", heldout, seed=1)
    assert le.items_digest(tmp_path / "c") != le.items_digest(tmp_path / "a")


def test_docstring_paragraphs_are_prose():
    from compressor.data import docstring_paragraphs

    paras = docstring_paragraphs()
    assert len(paras) >= 300
    assert not any(">>>" in p for p in paras)
    assert all(len(p.split()) >= 24 for p in paras)


def test_scores_carry_per_item_results_and_no_datasets_cache_outside_the_folder(tmp_path, tiny_model_dir):
    """A real lm-eval run (tiny model, 24 items): one result per item, in item order, consistent with
    the accuracy; per-domain accuracies; the datasets cache stays inside the task folder."""
    cache = tmp_path / "hf-datasets"
    code = r"""
import json, sys
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer
from compressor.data import builtin_text
from compressor.evaluate import lm_eval as le
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
tok = AutoTokenizer.from_pretrained(sys.argv[1])
folder = Path(sys.argv[2])
le.write_tasks(folder, builtin_text()[-60000:], n_cloze=24)
s = le.lm_eval_scores(model, tok, folder)
print(json.dumps(s.as_dict()))
"""
    folder = tmp_path / "tasks"
    p = run_python(code, str(tiny_model_dir), str(folder), env={"HF_DATASETS_CACHE": str(cache)})
    assert p.returncode == 0, p.stderr[-3000:]
    d = json.loads(p.stdout.strip().splitlines()[-1])
    assert d["cloze_n"] == 24 and len(d["cloze_correct"]) == 24
    assert d["cloze_acc"] == pytest.approx(d["cloze_correct"].count("1") / 24)
    assert d["cloze_items"] == le.items_digest(folder)
    assert set(d["cloze_domains"]) == {"pydoc", "docstrings"}
    assert sum(v["n"] for v in d["cloze_domains"].values()) == 24
    lo, hi = d["cloze_ci95"]
    assert lo <= d["cloze_acc"] <= hi and d["cloze_stderr"] > 0
    assert not cache.exists() or not any(cache.rglob("*")), sorted(str(x) for x in cache.rglob("*"))[:5]
    assert (folder / "datasets-cache").is_dir()


# -- statistics --------------------------------------------------------------------------------------

def test_accuracy_stats():
    st = le.accuracy_stats("1" * 50 + "0" * 50)
    assert st["acc"] == 0.5 and st["n"] == 100 and st["stderr"] == pytest.approx(0.05)
    assert st["ci95"] == pytest.approx([0.4038, 0.5962], abs=1e-4)  # Wilson
    lo, hi = le.accuracy_stats("1" * 40)["ci95"]
    assert hi == pytest.approx(1.0) and 0.9 < lo < 0.92  # not zero-width at 100%


def test_accuracy_change_counts_and_signs():
    before = "1" * 60 + "0" * 40
    after = "0" * 10 + "1" * 50 + "1" * 5 + "0" * 35  # 10 lost, 5 gained
    ch = le.accuracy_change(before, after)
    assert (ch["lost"], ch["gained"], ch["n"]) == (10, 5, 100)
    assert ch["delta"] == pytest.approx(-0.05)
    assert ch["ci95"][0] < -0.05 < ch["ci95"][1]
    assert ch["ratio"] == pytest.approx(55 / 60)
    same = le.accuracy_change(before, before)
    assert same["delta"] == 0 and same["ci95"][0] < 0 < same["ci95"][1]
    assert same["ci95"][1] == pytest.approx(le.Z95 / 102, rel=0.02)  # agreeing on every item: about 1.96/n
    with pytest.raises(ValueError):
        le.accuracy_change("101", "10")


@pytest.mark.parametrize("n,p_before,lost,gained", [(600, 0.6, 0.08, 0.03), (400, 0.45, 0.02, 0.02),
                                                    (200, 0.7, 0.15, 0.05)])
def test_paired_interval_covers_the_true_change_95_percent_of_the_time(n, p_before, lost, gained):
    """Simulated pairs of runs with a known true change: the 95% interval holds it in about 95% of
    them (a wrong variance formula gives far less or far more)."""
    rng = random.Random(n)
    truth, hits, trials = gained - lost, 0, 1500
    for _ in range(trials):
        b, a = [], []
        for _ in range(n):
            x = rng.random() < p_before
            u = rng.random()
            # lost among the right answers, gained among the wrong ones, at the given overall rates
            y = (u >= lost / p_before) if x else (u < gained / (1 - p_before))
            b.append(int(x))
            a.append(int(y))
        lo, hi = le.accuracy_change(b, a)["ci95"]
        hits += lo <= truth <= hi
    assert 0.93 <= hits / trials <= 0.975, hits / trials


def test_unpaired_interval_covers_the_true_change():
    rng = random.Random(1)
    hits, trials = 0, 2000
    for _ in range(trials):
        kb = sum(rng.random() < 0.6 for _ in range(300))
        ka = sum(rng.random() < 0.55 for _ in range(300))
        lo, hi = le.accuracy_change_unpaired(kb / 300, 300, ka / 300, 300)["ci95"]
        hits += lo <= -0.05 <= hi
    assert 0.93 <= hits / trials <= 0.97, hits / trials


def test_pairing_needs_the_same_items():
    a = {"cloze_acc": 0.6, "cloze_n": 5, "cloze_correct": "11100", "cloze_items": "x"}
    assert le.compare_scores(a, dict(a))["method"].startswith("paired")
    assert le.compare_scores(a, {**a, "cloze_items": "y"})["method"].startswith("unpaired")
    assert le.compare_scores({"cloze_acc": 0.6, "cloze_n": 40}, a)["method"].startswith("unpaired")  # an old report
    assert le.compare_scores({"cloze_acc": 0.6}, a) is None  # no item count at all
    assert le.compare_scores({**a, "cloze_correct": "1x100"}, a)["method"].startswith("unpaired")


def test_the_dense_to_pruned_change_of_a_run():
    t = le.Tasks("", enabled=False)
    assert t.change is None
    t.dense = {"cloze_correct": "1101", "cloze_items": "d"}
    t.pruned = {"cloze_correct": "1001", "cloze_items": "d"}
    assert t.change == le.accuracy_change("1101", "1001")
    t.pruned = {"skipped": "no lm-eval"}
    assert t.change is None


# -- the task folder never outlives its run ---------------------------------------------------------

def test_a_failure_while_writing_the_tasks_removes_the_folder(tmp_path, monkeypatch):
    """`__exit__` does not run when `__enter__` fails: the folder must be removed there."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(UserError, match="too short"), le.Tasks("a few words", enabled=True):
        pass
    assert list(tmp_path.iterdir()) == []
    with le.Tasks("", enabled=False) as t:
        assert t.folder is None
    assert list(tmp_path.iterdir()) == []


# the CLI in a fresh process, sending itself a real signal from inside one stage
_WRAPPER = r"""
import os, signal, sys
sig = getattr(signal, sys.argv[1])
stage = sys.argv[2]
import compressor.evaluate.lm_eval as le
if stage == "writing-tasks":  # after part of the task folder is on disk
    real_items = le.cloze_items
    def cloze_items(*a, **k):
        os.kill(os.getpid(), sig)
        return real_items(*a, **k)
    le.cloze_items = cloze_items
elif stage == "scoring":  # lm-eval on the dense model has started
    real_eval = le._evaluate
    def _evaluate(lm, folder):
        os.kill(os.getpid(), sig)
        return real_eval(lm, folder)
    le._evaluate = _evaluate
from compressor.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("sig,stage", [("SIGINT", "writing-tasks"), ("SIGTERM", "writing-tasks"),
                                       ("SIGINT", "scoring")])
def test_an_interrupt_leaves_no_task_folder(tmp_path, tiny_model_dir, sig, stage):
    """Ctrl-C or SIGTERM while the tasks are written (before the `with` block is entered) or while
    lm-eval scores (an interrupt is a UserError, and was once taken for "lm-eval skipped", after
    which the run went on): exit 130, one sentence, nothing in TMPDIR nor beside --out."""
    from tests.test_reliability import assert_clean_failure

    tmpdir, out = tmp_path / "tmp", tmp_path / "o"
    tmpdir.mkdir()
    p = run_python(_WRAPPER, sig, stage, str(tiny_model_dir), *FAST, "--out", str(out),
                   env={"TMPDIR": str(tmpdir), "COLUMNS": "200"})
    assert_clean_failure(p, out, f"Interrupted by {sig}; nothing was written.", code=130)
    assert "skipped" not in p.stderr
    assert [x.name for x in tmpdir.iterdir() if x.name.startswith("fitprune-")] == []
    assert sorted(x.name for x in tmp_path.iterdir()) == ["tmp"]
