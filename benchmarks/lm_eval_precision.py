"""lm-eval on the embedded SmolLM2-135M in float32 and under bfloat16 autocast (what `compress` uses
where the profile serves bfloat16, `steps.serving_precision`), A B A B: seconds, word perplexity and
cloze accuracy of each run.

    python benchmarks/lm_eval_precision.py --items 100 --pairs 2
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=100, help="cloze items")
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from compressor.data import load_texts
    from compressor.evaluate.lm_eval import lm_eval_scores, write_tasks
    from compressor.model.loading import load

    torch.set_num_threads(args.threads)
    m = load(None)
    texts = load_texts("builtin", m.tokenizer, m.model, 8, 128, 8, 0)
    folder = Path(tempfile.mkdtemp(prefix="fitprune-lmeval-precision-"))
    try:
        write_tasks(folder, texts.heldout_text, n_cloze=args.items)
        times: dict[str, list[float]] = {"float32": [], "bfloat16": []}
        for _ in range(args.pairs):
            for name in times:
                t = time.perf_counter()
                r = lm_eval_scores(m.model, m.tokenizer, folder, precision=None if name == "float32" else name)
                times[name].append(time.perf_counter() - t)
                print(f"{name}: {times[name][-1]:.1f} s, word perplexity {r.word_perplexity:.3f}, "
                      f"cloze accuracy {r.cloze_acc:.3f}", flush=True)
        a, b = statistics.median(times["float32"]), statistics.median(times["bfloat16"])
        print(f"medians: float32 {a:.1f} s, bfloat16 autocast {b:.1f} s, ratio {a / b:.2f}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
