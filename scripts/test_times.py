"""Where the test suite's time went: `python scripts/test_times.py FILE` reads the lines tests/conftest.py
writes when FITPRUNE_TEST_TIMES=FILE and prints, compactly, the seconds per test file and the slowest tests
(setup, call and teardown summed; with xdist the totals add both workers' time)."""

from __future__ import annotations

import collections
import json
import sys


def main(path: str, files: int = 15, tests: int = 12) -> None:
    per_test: dict[str, float] = collections.defaultdict(float)
    with open(path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            per_test[r["id"]] += r["s"]
    per_file: dict[str, float] = collections.defaultdict(float)
    for nodeid, s in per_test.items():
        per_file[nodeid.split("::")[0]] += s
    total = sum(per_file.values())
    print(f"test time: {total:.0f} s over {len(per_test)} tests (both workers' time added)")
    print("per file: " + "; ".join(f"{name.removeprefix('tests/').removesuffix('.py')} {s:.0f}"
                                   for name, s in sorted(per_file.items(), key=lambda kv: -kv[1])[:files]))
    for nodeid, s in sorted(per_test.items(), key=lambda kv: -kv[1])[:tests]:
        print(f"{s:6.0f} s  {nodeid.removeprefix('tests/')[:110]}")


if __name__ == "__main__":
    main(sys.argv[1])
