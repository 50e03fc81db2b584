"""Peak memory and time of quantizing an export: one decoder layer at a time (`quantize_export`,
exporters/quantize_stream.py) against the whole model in memory (`quantize_in_memory`).

The checkpoint is random-weight, of a real model's widths, written shard by shard
(benchmarks/random_checkpoint.py: never whole in memory). Each mode quantizes its own fresh copy of
it (the quantizers work in place), its pages evicted from the page cache first, in a fresh
interpreter, and reports:

- `peak_rss_mib`: the child's own peak resident set (getrusage RUSAGE_SELF, which includes the
  file pages the in-memory loader maps), and `over_baseline_mib`: that minus the peak of an
  interpreter that only imports what quantizing imports;
- `cgroup_peak_mib` (root and a cgroup v1 memory controller only): the memory cgroup's
  `memory.max_usage_in_bytes`, which also counts the page cache the run filled;
- with `--limit-gib`, each mode runs under that cgroup memory limit (page cache is reclaimed at the
  limit, resident memory is not: a mode that needs more is killed, `killed: true`).

    python benchmarks/quantize_memory.py                                  # 8 layers of Llama-3.1-8B, W8A8
    python benchmarks/quantize_memory.py --limit-gib 3                    # ... under 3 GiB (the model is 5.6 GB)
    python benchmarks/quantize_memory.py --shape tiny --layers 4 --modes stream,memory   # a quick check
    python benchmarks/quantize_memory.py --checkpoint ~/.cache/fitprune/models/SmolLM2-135M-Instruct --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from random_checkpoint import GIB, drop_page_cache, shape_kwargs, write_checkpoint  # noqa: E402

MODES = {"stream": "quantize_export", "memory": "quantize_in_memory"}
CGROUP_V1 = Path("/sys/fs/cgroup/memory")

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
t = time.perf_counter()
import torch, transformers, compressed_tensors.compressors  # what quantizing imports: the baseline
from exporters import quantize
imported = time.perf_counter() - t
seconds = 0.0
if sys.argv[1] != "baseline":
    t = time.perf_counter()
    info = getattr(quantize, sys.argv[1])(Path(sys.argv[2]), sys.argv[3])
    seconds = time.perf_counter() - t
print("RESULT " + json.dumps({"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                              "seconds": seconds, "import_s": imported}))
"""


class MemoryGroup:
    """A cgroup v1 memory group for one child (None of it where there is no controller or no root)."""

    def __init__(self, limit_bytes: int | None):
        self.path = CGROUP_V1 / f"fitprune-qbench-{os.getpid()}-{time.monotonic_ns()}"
        self.ok = CGROUP_V1.is_dir() and os.access(CGROUP_V1, os.W_OK)
        if not self.ok:
            return
        self.path.mkdir()
        if limit_bytes:
            (self.path / "memory.limit_in_bytes").write_text(str(limit_bytes))
            # no swap here; where there is, keep the limit a limit
            swap = self.path / "memory.memsw.limit_in_bytes"
            if swap.exists():
                try:
                    swap.write_text(str(limit_bytes))
                except OSError:
                    pass

    def enter(self) -> None:
        """In the child, before exec: the whole run is charged to the group."""
        if self.ok:
            (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak_mib(self) -> float | None:
        return int((self.path / "memory.max_usage_in_bytes").read_text()) / 2**20 if self.ok else None

    def close(self) -> None:
        if self.ok:
            for _ in range(50):
                try:
                    self.path.rmdir()
                    return
                except OSError:  # the child's pages are still being uncharged
                    time.sleep(0.1)


def run_child(how: str, path: Path | None, scheme: str, limit_bytes: int | None) -> dict:
    group = MemoryGroup(limit_bytes)
    try:
        t = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", CHILD, how, str(path or ""), scheme], capture_output=True,
                           text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                           preexec_fn=group.enter)
        wall = time.perf_counter() - t
        out = {"wall_s": round(wall, 2), "cgroup_peak_mib": group.peak_mib(), "returncode": p.returncode}
        line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            out["killed"] = p.returncode < 0 or p.returncode == 137
            out["stderr_tail"] = p.stderr[-600:]
        else:
            out.update(json.loads(line[len("RESULT "):]))
        return out
    finally:
        group.close()


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    total_bytes: int


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/fitprune-quantize-bench", help="where the checkpoint and copies go")
    ap.add_argument("--checkpoint", default=None, help="quantize copies of this checkpoint instead of a random one")
    ap.add_argument("--shape", default="llama-3.1-8b")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--scheme", default="w8a8-int8")
    ap.add_argument("--modes", default="stream,memory", help="comma-separated: stream, memory")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--limit-gib", type=float, default=None, help="run each mode under this cgroup memory limit")
    ap.add_argument("--keep", action="store_true", help="keep the quantized copies")
    args = ap.parse_args()

    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    if args.checkpoint:
        w = Checkpoint(Path(args.checkpoint), folder_bytes(Path(args.checkpoint)))
        args.shape, args.layers = w.path.name, None
    else:
        t = time.perf_counter()
        w = write_checkpoint(root / f"{args.shape}-{args.layers}L", fsync=False, shard_bytes=2 * GIB,
                             **shape_kwargs(args.shape, args.layers))
        print(f"random checkpoint: {w.path} ({w.shards} shards, "
              f"{'reused' if w.reused else f'written in {time.perf_counter() - t:.0f} s'})", flush=True)
    print(f"checkpoint: {w.path} ({w.total_bytes / 1e9:.2f} GB)", flush=True)
    limit = int(args.limit_gib * GIB) if args.limit_gib else None
    base = run_child("baseline", None, args.scheme, None)
    print(f"baseline (imports only): peak RSS {base['peak_rss_mib']:.0f} MiB", flush=True)
    rows = []
    for r in range(args.repeat):
        for mode in args.modes.split(","):
            copy = root / f"copy-{mode}"
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(w.path, copy)
            drop_page_cache(copy)
            res = run_child(MODES[mode], copy, args.scheme, limit)
            res.update(mode=mode, run=r + 1, checkpoint_gb=round(w.total_bytes / 1e9, 3),
                       limit_gib=args.limit_gib)
            if "peak_rss_mib" in res:
                res["over_baseline_mib"] = round(res["peak_rss_mib"] - base["peak_rss_mib"], 1)
                res["quantized_gb"] = round(folder_bytes(copy) / 1e9, 3)
            rows.append(res)
            if "peak_rss_mib" in res:
                print(f"{mode:>6} run {r + 1}: {res['seconds']:.1f} s quantizing, peak RSS {res['peak_rss_mib']:.0f} "
                      f"MiB ({res['over_baseline_mib']:+.0f} over the baseline), cgroup peak "
                      f"{res['cgroup_peak_mib'] or float('nan'):.0f} MiB, output {res['quantized_gb']:.2f} GB",
                      flush=True)
            else:
                print(f"{mode:>6} run {r + 1}: failed (returncode {res['returncode']}, killed {res['killed']}) under "
                      f"{args.limit_gib} GiB: {res['stderr_tail'][-200:]!r}", flush=True)
            if not args.keep:
                shutil.rmtree(copy, ignore_errors=True)
    print(json.dumps({"shape": args.shape, "layers": args.layers, "scheme": args.scheme,
                      "checkpoint_gb": round(w.total_bytes / 1e9, 3), "baseline_rss_mib": base["peak_rss_mib"],
                      "runs": rows}))


if __name__ == "__main__":
    main()
