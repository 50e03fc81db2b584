"""Why the tests run one torch thread per xdist worker and give the tiny model a small tokenizer.

    PYTHONPATH=. python benchmarks/test_suite_costs.py

1. Threads: a SmolLM2 forward (16 x 128 tokens) while a second process keeps the other core busy with
   the same thread count (CI's two xdist workers), at 2 threads each and at 1 thread each.
2. Vocabulary: lm-eval (400 cloze items and the word perplexity, one thread) on the 2-layer tiny model
   with SmolLM2's 49,152-token tokenizer and with it retrained to 1,024 tokens (tests/conftest.py).
Each case runs `--repeats` times; the medians and their ratio are printed.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BUSY = "import torch, sys; torch.set_num_threads(int(sys.argv[1])); a = torch.randn(1024, 1024)\nwhile True: a @ a"


def forward_seconds(threads: int, model) -> float:
    import torch

    torch.set_num_threads(threads)
    x = torch.randint(0, model.config.vocab_size, (16, 128))
    busy = subprocess.Popen([sys.executable, "-c", BUSY, str(threads)])
    try:
        time.sleep(2)
        with torch.no_grad():
            model(input_ids=x[:4], use_cache=False)
            t = time.monotonic()
            for b in x.split(4):
                model(input_ids=b, use_cache=False)
            return time.monotonic() - t
    finally:
        busy.kill()
        busy.wait()


def lm_eval_seconds(model_dir: Path) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compressor.data import heldout_text
    from compressor.evaluate.lm_eval import Tasks, lm_eval_scores

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with Tasks(heldout_text(tok), True, n_cloze=400) as tasks:
        t = time.monotonic()
        lm_eval_scores(model, tok, tasks.folder)
        return time.monotonic() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compressor.model.loading import embedded_model_dir
    from tests.conftest import small_tokenizer, tiny_model

    smol = embedded_model_dir()
    model = AutoModelForCausalLM.from_pretrained(smol, dtype=torch.float32).eval()
    two, one = [], []
    for _ in range(args.repeats):  # A B A B
        two.append(forward_seconds(2, model))
        one.append(forward_seconds(1, model))
    print(f"SmolLM2 forward beside a busy process: 2 threads {statistics.median(two):.1f} s {two}, "
          f"1 thread {statistics.median(one):.1f} s {one}; ratio {statistics.median(two) / statistics.median(one):.2f}")

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {}
        for name, vocab in (("49,152 tokens", None), ("1,024 tokens", 1024)):
            d = Path(tmp) / name.split()[0].replace(",", "")
            tok = AutoTokenizer.from_pretrained(smol) if vocab is None else small_tokenizer(smol, d, vocab)
            tiny_model("llama-gqa", vocab_size=len(tok), layers=2).save_pretrained(d)
            tok.save_pretrained(d)
            dirs[name] = d
        times = {name: [] for name in dirs}
        for _ in range(args.repeats):
            for name, d in dirs.items():
                times[name].append(lm_eval_seconds(d))
    med = {name: statistics.median(v) for name, v in times.items()}
    print("lm-eval (400 items) on the 2-layer tiny model, 1 thread: "
          + ", ".join(f"{name} {med[name]:.1f} s {times[name]}" for name in times)
          + f"; ratio {med['49,152 tokens'] / med['1,024 tokens']:.1f}")


if __name__ == "__main__":
    main()
