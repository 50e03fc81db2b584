"""`compress` on real model sizes under a memory limit: random-weight Llama checkpoints of a real
shape (default Llama-3.1-8B's) at several depths, each pruned by the CLI in a cgroup v1 memory
group so that the peak is the kernel's count and going over the limit ends in the OOM killer, as
on a machine with that much memory.

    python benchmarks/scale.py --layers 2,4 --limit-gib 8
    python benchmarks/scale.py --layers 2 --shape tiny --limit-gib 2 -- --metric flap
    python benchmarks/scale.py --layers 32 --workdir /data/scale --keep      # the full 8B (16 GB on disk)

Per depth: write the checkpoint (or reuse a complete one in --workdir), evict it from the page cache
(a cold start), run `compress --profile PROFILE CKPT [--ratio R] --nsamples N --seqlen S --out OUT
--no-checks [EXTRA...]` under the limit, and read OUT/report.json for the seconds per stage and the
`memory` section. Columns: "peak MiB" is the group's memory.max_usage_in_bytes, which counts page
cache (the checkpoint read through mmap, the export written) as well as anonymous memory; page cache
is reclaimable, so under a limit it tends to the limit without causing an OOM. "anon MiB" is the
largest anonymous (rss) figure of the group's memory.stat, sampled every 0.1 s (`--json` also has
ru_maxrss, which only covers the time since the child last reset its VmHWM, as compress does per
stage). Needs root and a cgroup v1 memory controller.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from random_checkpoint import GIB, SHAPES, checkpoint_bytes, drop_page_cache, shape_kwargs, write_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 ** 2
_groups = itertools.count()


@dataclass
class Limited:
    rc: int  # exit status; -9 when killed by SIGKILL (the OOM killer, or the timeout)
    wall_s: float
    peak_bytes: int  # memory.max_usage_in_bytes: anonymous + page cache charged to the group
    oom_killed: bool
    failcnt: int  # memory.failcnt (max with memsw.failcnt); stays 0 on some kernels even at the limit
    peak_anon_bytes: int  # largest sampled total_rss of memory.stat
    maxrss_bytes: int  # ru_maxrss of the child: its VmHWM at exit, i.e. since its last reset of it, if any
    limit_bytes: int | None
    timed_out: bool = False


def memory_mount() -> Path:
    """The mount point of the cgroup v1 memory controller."""
    with open("/proc/self/mounts") as f:
        for line in f:
            _, mnt, fstype, opts, *_ = line.split()
            if fstype == "cgroup" and "memory" in opts.split(","):
                return Path(mnt)
    raise RuntimeError("no cgroup v1 memory controller is mounted (see `mount | grep cgroup`)")


def _parent_group(mount: Path) -> Path:
    """This process's own memory group when it can make groups in it (nested groups stay inside
    whatever limit the caller has), else the root of the hierarchy."""
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if "memory" in controllers.split(","):
                own = mount / path.lstrip("/")
                if own.is_dir() and os.access(own, os.W_OK):
                    return own
    if not os.access(mount, os.W_OK):
        raise PermissionError(f"cannot create a memory group under {mount} (run as root)")
    return mount


def _read(group: Path, name: str) -> str:
    return (group / name).read_text()


def _read_int(group: Path, name: str) -> int:
    return int(_read(group, name).strip())


def _stat(group: Path, name: str) -> dict[str, int]:
    out = {}
    for line in _read(group, name).splitlines():
        k, _, v = line.partition(" ")
        if v.strip().lstrip("-").isdigit():
            out[k] = int(v)
    return out


def _kill_all(group: Path) -> None:
    for pid in _read(group, "cgroup.procs").split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


def _remove_group(group: Path) -> None:
    """Kill what is left in the group (descendants of the child only) and remove it."""
    for _ in range(200):
        try:
            if _read(group, "cgroup.procs").split():
                _kill_all(group)
                time.sleep(0.05)
                continue
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:  # EBUSY while the last task exits
            time.sleep(0.05)
    print(f"warning: could not remove the memory group {group}", file=sys.stderr)


def limited(cmd: list[str], limit_bytes: int | None, *, timeout: float | None = None, sample_s: float = 0.1,
            **popen) -> Limited:
    """Run `cmd` in a fresh cgroup v1 memory group limited to `limit_bytes` (memory and, where the
    kernel accounts swap, memory+swap, so swap cannot hide usage; None: no limit, measure only), wait
    for it and return its exit status, wall time, peak memory and whether the OOM killer ended it.
    `popen` goes to subprocess.Popen (stdout, stderr, cwd, env). The child puts itself in the group
    before it execs `cmd`, so everything it starts is in the group too."""
    mount = memory_mount()
    group = _parent_group(mount) / f"fitprune-bench-{os.getpid()}-{next(_groups)}"
    group.mkdir()
    try:
        if limit_bytes is not None:
            (group / "memory.limit_in_bytes").write_text(str(int(limit_bytes)))
            if (group / "memory.memsw.limit_in_bytes").exists():  # memsw >= memory: set after it
                (group / "memory.memsw.limit_in_bytes").write_text(str(int(limit_bytes)))
        procs = group / "cgroup.procs"
        wrapper = ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(procs), *cmd]
        stop = threading.Event()
        peak_anon = [0]

        def sample() -> None:
            while not stop.is_set():
                try:
                    st = _stat(group, "memory.stat")
                    peak_anon[0] = max(peak_anon[0], st.get("total_rss", st.get("rss", 0)))
                except OSError:
                    pass
                stop.wait(sample_s)

        timed_out = threading.Event()

        def expire() -> None:
            timed_out.set()
            _kill_all(group)

        sampler = threading.Thread(target=sample, daemon=True)
        t0 = time.perf_counter()
        proc = subprocess.Popen(wrapper, **popen)
        sampler.start()
        timer = threading.Timer(timeout, expire) if timeout else None
        if timer:
            timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            _kill_all(group)
            proc.wait()
            raise
        finally:
            if timer:
                timer.cancel()
        wall = time.perf_counter() - t0
        proc.returncode = rc = os.waitstatus_to_exitcode(status)
        stop.set()
        sampler.join()
        failcnt = _read_int(group, "memory.failcnt")
        if (group / "memory.memsw.failcnt").exists():
            failcnt = max(failcnt, _read_int(group, "memory.memsw.failcnt"))
        oom = _stat(group, "memory.oom_control")
        oom_killed = oom["oom_kill"] > 0 if "oom_kill" in oom else (rc == -signal.SIGKILL and failcnt > 0)
        peak = _read_int(group, "memory.max_usage_in_bytes")
        if (group / "memory.memsw.max_usage_in_bytes").exists():
            peak = max(peak, _read_int(group, "memory.memsw.max_usage_in_bytes"))
        return Limited(rc, round(wall, 2), peak, oom_killed, failcnt, peak_anon[0], usage.ru_maxrss * 1024,
                       limit_bytes, timed_out.is_set())
    finally:
        _remove_group(group)


# ---------------------------------------------------------------- the benchmark


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _pruning_seconds(seconds: dict) -> float | None:
    """Seconds of the pruning stage (calibration + scoring + surgery) under whatever name it has."""
    for k in ("pruning_step", "pruning", "prune"):
        if seconds.get(k):
            return seconds[k]
    keys = [k for k in seconds if "prun" in k and "perplexity" not in k]
    return seconds[keys[0]] if keys and seconds[keys[0]] else None


def _tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + ln for ln in lines[-n:])


def run_depth(layers: int, args, extra: list[str], workdir: Path) -> dict:
    kw = shape_kwargs(args.shape, layers)
    ckpt = workdir / f"{args.shape}-{layers}L"
    out = workdir / f"out-{args.shape}-{layers}L"
    log = workdir / f"log-{args.shape}-{layers}L.txt"
    print(f"\n== {layers} layers: checkpoint {ckpt} ({checkpoint_bytes(**kw) / 1e9:.2f} GB)", flush=True)
    w = write_checkpoint(ckpt, seed=args.seed, shard_bytes=int(args.shard_gib * GIB), **kw)
    if w.reused:
        print("   reused the complete checkpoint already there")
    else:
        print(f"   written in {w.seconds:.1f} s ({w.gb_per_s:.2f} GB/s; generate {w.generate_s:.1f} s, "
              f"save+fsync {w.save_s:.1f} s), {w.shards} shards")
    drop_page_cache(ckpt)
    shutil.rmtree(out, ignore_errors=True)
    ratio = [] if args.ratio == "plan" else ["--ratio", args.ratio]  # plan: the default plan, every lever
    cmd = [sys.executable, "-m", "compressor", "--profile", args.profile, str(ckpt), *ratio,
           "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--out", str(out), "--no-checks", *extra]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    limit = int(args.limit_gib * GIB) if args.limit_gib else None
    print(f"   compress {' '.join(cmd[3:])}  (limit {f'{args.limit_gib:g} GiB' if limit else 'none'}, log {log})",
          flush=True)
    with open(log, "w") as f:
        res = limited(cmd, limit, timeout=args.timeout, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    status = "OOM-killed" if res.oom_killed else "timed out" if res.timed_out else f"rc {res.rc}"
    at_limit = limit and res.peak_bytes >= limit - MIB and not res.oom_killed
    at_limit = " = the limit (page cache reclaimed)" if at_limit else ""
    print(f"   {status} after {res.wall_s:.1f} s, peak {res.peak_bytes / MIB:.0f} MiB (cgroup){at_limit}, anon "
          f"{res.peak_anon_bytes / MIB:.0f} MiB", flush=True)
    if res.rc != 0:
        print(_tail(log))
    row = {"layers": layers, "checkpoint_gb": round(w.total_bytes / 1e9, 2),
           "write_s": None if w.reused else round(w.seconds, 1),
           "write_gb_s": None if w.reused else round(w.gb_per_s, 3), **asdict(res)}
    report = out / "report.json"
    if report.is_file():
        rep = json.loads(report.read_text())
        row["seconds"] = rep.get("seconds") or {}
        row["memory"] = _flatten(rep.get("memory") or {})
        row["report_peak_rss_mib_total"] = rep.get("peak_rss_mib_total")
        ppl = rep.get("perplexity") or {}
        row["perplexity"] = {k: ppl.get(k) for k in ("dense", "pruned")}
        prune_s = _pruning_seconds(row["seconds"])
        if prune_s:
            row["calib_tokens_s"] = round(args.nsamples * args.seqlen * layers / prune_s, 1)
    if not args.keep:
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    return row


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.1f}" if abs(v) >= 10 or v == int(v) else f"{v:.3g}"
    return str(v)


def _render(headers: list[str], cells: list[list[str]], markdown: bool) -> str:
    """A table, first column left-aligned and the others right-aligned."""
    if markdown:
        return "\n".join(["| " + " | ".join(headers) + " |", "|:---|" + "|".join("---:" for _ in headers[1:]) + "|"]
                         + ["| " + " | ".join(c) + " |" for c in cells])
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    return "\n".join("  ".join(v.ljust(w) if i == 0 else v.rjust(w)
                                for i, (v, w) in enumerate(zip(line, widths, strict=True)))
                      for line in [headers, *cells])


def tables(rows: list[dict]) -> tuple[tuple, tuple | None, tuple | None, dict[str, str]]:
    """(headers, cells) of the main table (one row per depth), of the seconds per stage and of the
    report's numeric `memory` figures (one row per stage or key, one column per depth; rows that are
    zero or absent at every depth are left out), and the non-numeric `memory` entries."""
    main_h = ["layers", "checkpoint GB", "rc", "OOM", "wall s", "peak MiB (cgroup)", "anon MiB", "ppl dense",
              "ppl pruned", "calib tok/s"]
    main_c = [[_fmt(r["layers"]), _fmt(r["checkpoint_gb"]), _fmt(r["rc"]), _fmt(r["oom_killed"]), _fmt(r["wall_s"]),
               _fmt(round(r["peak_bytes"] / MIB)), _fmt(round(r["peak_anon_bytes"] / MIB)),
               _fmt(r.get("perplexity", {}).get("dense")), _fmt(r.get("perplexity", {}).get("pruned")),
               _fmt(r.get("calib_tokens_s"))] for r in rows]
    cols = [f"{r['layers']} layers" for r in rows]

    def transposed(section: str, first: str):
        keys = list(dict.fromkeys(k for r in rows for k, v in r.get(section, {}).items()
                                  if isinstance(v, (int, float)) and not isinstance(v, bool)))
        keys = [k for k in keys if any(r.get(section, {}).get(k) for r in rows)]
        if not keys:
            return None
        return [first, *cols], [[k, *(_fmt(r.get(section, {}).get(k)) for r in rows)] for k in keys]

    notes = {k: v for r in rows for k, v in r.get("memory", {}).items() if isinstance(v, str)}
    return (main_h, main_c), transposed("seconds", "stage (seconds)"), transposed("memory", "memory (report)"), notes


def print_tables(rows: list[dict], args, extra: list[str]) -> None:
    main_t, secs, mem, notes = tables(rows)
    for markdown in (False, True):
        if markdown:
            limit = f"a {args.limit_gib:g} GiB" if args.limit_gib else "no"
            ratio = "" if args.ratio == "plan" else f"--ratio {args.ratio} "
            print(f"\nmarkdown for docs/benchmarks.md:\n\n`python benchmarks/scale.py {' '.join(sys.argv[1:])}`: "
                  f"random-weight {args.shape} checkpoints (bfloat16) at each depth, `compress --profile "
                  f"{args.profile} CKPT {ratio}--nsamples {args.nsamples} --seqlen {args.seqlen} "
                  f"--no-checks{' ' + ' '.join(extra) if extra else ''}` in a cgroup v1 memory group with {limit} "
                  f"limit, cold page cache; {os.cpu_count()} CPU cores. Peak MiB (cgroup) counts page cache too; "
                  "anon MiB is the sampled peak of anonymous memory.")
        print()
        print(_render(*main_t, markdown))
        for t in (secs, mem):
            if t:
                print()
                print(_render(*t, markdown))
        if notes:
            print()
            for k, v in notes.items():
                print(f"{'- ' if markdown else ''}memory.{k}: {v}")


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 usage="%(prog)s [options] [-- EXTRA COMPRESS ARGUMENTS]")
    ap.add_argument("--layers", default="2,4,8,16,32", help="depths, comma-separated (default: %(default)s)")
    ap.add_argument("--shape", default="llama-3.1-8b", choices=list(SHAPES), help="default: %(default)s")
    ap.add_argument("--limit-gib", type=float, default=8.0, help="memory limit (0: none, measure only)")
    ap.add_argument("--workdir", default=None, help="where checkpoints and outputs go (default: a fresh temporary "
                                                    "directory); complete checkpoints already there are reused")
    ap.add_argument("--profile", default="a10g-24gb")
    ap.add_argument("--ratio", default="0.2", help="the width ratio, or 'plan': no --ratio, the default plan")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0, help="of the random weights")
    ap.add_argument("--shard-gib", type=float, default=2.0)
    ap.add_argument("--timeout", type=float, default=None, help="seconds per compress run, then SIGKILL")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("--keep", action="store_true", help="keep checkpoints and outputs (default: delete them)")
    args = ap.parse_args(argv)
    depths = [int(x) for x in args.layers.split(",") if x.strip()]
    own = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="fitprune-scale-")) if own else Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"workdir {workdir}, {shutil.disk_usage(workdir).free / 1e9:.0f} GB free; shape {args.shape}, depths "
          f"{depths}, limit {args.limit_gib:g} GiB, {os.cpu_count()} CPU cores")
    rows = []
    try:
        for layers in depths:
            rows.append(run_depth(layers, args, extra, workdir))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
    finally:
        if rows:
            print_tables(rows, args, extra)
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
        if own and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        elif args.keep:
            print(f"\nkept: {workdir}")


if __name__ == "__main__":
    main()
