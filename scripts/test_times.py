"""Where the test suite's time went: `python scripts/test_times.py FILE` reads the lines tests/conftest.py
writes when FITPRUNE_TEST_TIMES=FILE and prints, compactly, the seconds per test file and the slowest tests
(setup, call and teardown summed; with xdist the totals add both workers' time)."""

from __future__ import annotations

import collections
import json
import sys


def main(path: str, files: int = 15, tests: int = 12) -> None:
    per_test: dict[str, float] = collections.defaultdict(float)
    busy: dict[str, float] = collections.defaultdict(float)
    last: dict[str, float] = {}
    first = None
    with open(path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            per_test[r["id"]] += r["s"]
            worker = r.get("worker", "main")
            busy[worker] += r["s"]
            if "end" in r:
                first = min(first or r["end"], r["end"] - r["s"])
                last[worker] = max(last.get(worker, 0.0), r["end"])
    per_file: dict[str, float] = collections.defaultdict(float)
    for nodeid, s in per_test.items():
        per_file[nodeid.split("::")[0]] += s
    total = sum(per_file.values())
    print(f"test time: {total:.0f} s over {len(per_test)} tests (both workers' time added)")
    if first is not None:
        print("workers: " + "; ".join(f"{w} busy {busy[w]:.0f} s, done at {last[w] - first:.0f} s"
                                      for w in sorted(last)))
    print("per file: " + "; ".join(f"{name.removeprefix('tests/').removesuffix('.py')} {s:.0f}"
                                   for name, s in sorted(per_file.items(), key=lambda kv: -kv[1])[:files]))
    for nodeid, s in sorted(per_test.items(), key=lambda kv: -kv[1])[:tests]:
        print(f"{s:6.0f} s  {nodeid.removeprefix('tests/')[:110]}")


if __name__ == "__main__":
    main(sys.argv[1])
