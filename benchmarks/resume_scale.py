"""An out-of-core run of a real model's shape, interrupted during its pruned perplexity and resumed,
both under a memory limit (issue 27): random weights of Llama-3.1-8B's shape (at --layers depth),
`compress --profile PROFILE CKPT --ratio R --nsamples N --seqlen S --no-checks --out OUT` in a cgroup
v1 memory group, SIGTERM once the pruned model's layer-wise perplexity has stored its first layer,
then the same command with `--resume` in a fresh group of the same limit. Prints both runs' exit
status, wall time and peak anonymous memory, and what the resumed run's report says. Needs root and a
cgroup v1 memory controller (benchmarks/scale.py).

    python benchmarks/resume_scale.py --layers 4 --limit-gib 8
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from random_checkpoint import GIB, drop_page_cache, shape_kwargs, write_checkpoint  # noqa: E402
from scale import MIB, limited  # noqa: E402


def _interrupt_when(folder: Path, out: Path, stop: threading.Event, fired: list) -> None:
    """SIGTERM the compress process writing `out` once `folder` holds a file."""
    while not stop.is_set():
        if folder.is_dir() and any(folder.iterdir()):
            pids = subprocess.run(["pgrep", "-f", "--", f"--out {out}"], capture_output=True, text=True).stdout.split()
            for pid in pids:
                subprocess.run(["kill", "-TERM", pid], check=False)
            fired.append(time.time())
            return
        time.sleep(0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--shape", default="llama-3.1-8b")
    ap.add_argument("--limit-gib", type=float, default=8.0)
    ap.add_argument("--profile", default="a10g-24gb")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    from compressor.prune.resume import work_dir_for

    root = Path(args.workdir or tempfile.mkdtemp(prefix="fitprune-resume-scale-"))
    ckpt, out = root / f"ckpt-{args.layers}", root / f"out-{args.layers}"
    write_checkpoint(ckpt, **shape_kwargs(args.shape, args.layers), fsync=False)
    drop_page_cache(ckpt)
    cmd = ["compress", "--profile", args.profile, str(ckpt), "--ratio", "0.2", "--nsamples", "16", "--seqlen", "256",
           "--seed", "0", "--no-checks", "--out", str(out)]
    limit = int(args.limit_gib * GIB)
    stop, fired = threading.Event(), []
    watcher = threading.Thread(target=_interrupt_when, args=(work_dir_for(out) / "ppl-pruned", out, stop, fired))
    watcher.start()
    first = limited(cmd, limit, stdout=subprocess.DEVNULL, stderr=open(root / "first.log", "w"))  # noqa: SIM115
    stop.set()
    watcher.join()
    print(f"first run: exit {first.rc}, {first.wall_s:.0f} s, anon peak {first.peak_anon_bytes / MIB:.0f} MiB, "
          f"OOM {first.oom_killed}, interrupted during the pruned perplexity: {bool(fired)}", flush=True)
    second = limited(cmd + ["--resume"], limit, stdout=subprocess.DEVNULL,
                     stderr=open(root / "resume.log", "w"))  # noqa: SIM115
    print(f"--resume: exit {second.rc}, {second.wall_s:.0f} s, anon peak {second.peak_anon_bytes / MIB:.0f} MiB, "
          f"OOM {second.oom_killed}")
    resumed = [ln for ln in (root / "resume.log").read_text().splitlines() if "resum" in ln.lower()]
    print("\n".join(resumed[:5]))
    if second.rc == 0:
        r = json.loads((out / "report.json").read_text())
        print(f"report: removed {r['params']['achieved_ratio_decoder']:.2%} of the decoder, perplexity "
              f"{r['perplexity']['dense']:.1f} -> {r['perplexity']['pruned']:.1f}, stages (s) "
              f"{json.dumps(r['seconds'])}")
    print(f"logs in {root}")
    signal.signal(signal.SIGINT, signal.SIG_DFL)


if __name__ == "__main__":
    main()
