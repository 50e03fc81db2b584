"""Bit-identity check for refactors: prune the embedded SmolLM2 with fixed seeds in several
configurations through the CLI of a given checkout, and print the SHA-256 of every exported
weight file. Run it on the old and the new checkout and compare the lines.

    python benchmarks/identical.py --root /path/to/old/checkout > old.txt
    python benchmarks/identical.py > new.txt && diff old.txt new.txt
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIGS = {
    "default": [],
    "flap-bias-uniform-kv": ["--metric", "flap", "--compensation", "bias", "--structure", "uniform",
                             "--attn-unit", "kv"],
    "wanda-sp-lsq": ["--metric", "wanda-sp", "--compensation", "lsq"],
    "output-approx-greedy": ["--metric", "output-approx", "--compensation", "lsq+bias"],
    "mi-fold": ["--metric", "mi", "--compensation", "fold"],
    "taylor-none": ["--metric", "taylor", "--compensation", "none"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(Path(__file__).resolve().parents[1]), help="checkout to run")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    args = ap.parse_args()
    base = ["--ratio", "0.3", "--nsamples", "8", "--seqlen", "128", "--no-checks", "--seed", "1", "--threads", "1"]
    env = dict(os.environ, PYTHONPATH=args.root)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs.split(","):
            out = Path(tmp) / name
            cmd = [sys.executable, "-m", "compressor", "--profile", "cpu-2core", *base, *CONFIGS[name],
                   "--out", str(out)]
            res = subprocess.run(cmd, cwd=args.root, env=env, capture_output=True, text=True)
            if res.returncode:
                last = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode
                print(f"{name}: FAILED ({last})")
                continue
            for f in sorted(out.glob("*.safetensors")):
                print(f"{name} {f.name} {hashlib.sha256(f.read_bytes()).hexdigest()}", flush=True)


if __name__ == "__main__":
    main()
