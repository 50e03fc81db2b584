"""How long a vLLM CPU engine takes to start, with vLLM's default and with its CI switch
(`VLLM_CPU_CI_ENV=1`: dynamo traces the model, inductor does not compile it, no warm-up), which
tests/conftest.py sets for the tests. Each mode runs in a fresh process; each start opens and closes
`VllmRuntime` on a tiny random Llama with SmolLM2's tokenizer (a new shape, so the first start of
each mode compiles from scratch where inductor is on). Prints seconds per start and the medians.

    python benchmarks/engine_start.py [--starts 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _write_model(path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(ROOT))
    from compressor.model.loading import embedded_model_dir
    from tests.conftest import tiny_config

    tok = AutoTokenizer.from_pretrained(embedded_model_dir())
    cfg = tiny_config("llama-gqa", vocab_size=len(tok), layers=2, hidden_size=128, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=64, intermediate_size=256)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)


def _starts(path: str, n: int) -> list[float]:
    """Inside one mode's process: open and close the engine n times."""
    sys.path.insert(0, str(ROOT))
    from runtimes.base import load_runtime

    out = []
    for _ in range(n):
        t = time.perf_counter()
        with load_runtime("vllm", path, dtype="bfloat16", threads=2):
            out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--starts", type=int, default=2)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(_starts(args.child[0], int(args.child[1]))), flush=True)
        return
    with tempfile.TemporaryDirectory() as d:
        results = {}
        for mode, value in (("vLLM default", "0"), ("VLLM_CPU_CI_ENV=1", "1")):
            path = Path(d) / f"model-{value}"  # its own directory: the first start of each mode is a new shape
            _write_model(path)
            env = {**os.environ, "VLLM_CPU_CI_ENV": value, "VLLM_CPU_KVCACHE_SPACE": "1"}
            p = subprocess.run([sys.executable, __file__, "--child", str(path), str(args.starts)], env=env,
                               capture_output=True, text=True, timeout=1800)
            if p.returncode != 0:
                sys.exit(f"{mode}: the engine did not start:\n{p.stderr[-3000:]}")
            results[mode] = json.loads(next(ln for ln in p.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    for mode, secs in results.items():
        print(f"{mode}: starts {', '.join(f'{s:.1f}' for s in secs)} s (engine opened; closing not counted), "
              f"median {statistics.median(secs):.1f} s")
    a, b = (statistics.median(v) for v in results.values())
    print(f"median start with the switch / without: {b / a:.2f}")


if __name__ == "__main__":
    main()
