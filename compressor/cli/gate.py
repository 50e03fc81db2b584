"""`compress gate`: a CI gate on two report.json files.

Exit codes (also in docs/ci-gate.md): 0 every rule holds; 1 at least one rule is violated (one
line per violated rule); 2 could not judge: unreadable report or option, a report of another model,
no budget section (unless --no-budget), a section in neither report or only in the report (unless
--allow-missing names it), no figure in common, latency from other hosts.
"""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import UserError
from . import app


@app.command("gate", help="Compare REPORT (a report.json or an output directory) with BASELINE; exit 0 when every "
                          "rule holds, 1 with one line per violated rule, 2 when it cannot judge (unreadable input, "
                          "another model, no budget section, nothing in common).")
def gate_cmd(
    report: Path = typer.Argument(..., help="report.json (or the output directory holding it)."),
    baseline: Path = typer.Option(..., "--baseline", "-b", help="The baseline report.json (or its directory)."),
    max_latency_regression: str = typer.Option("5%", "--max-latency-regression",
                                               help="Allowed TTFT/TPOT increase and throughput decrease."),
    max_accuracy_drop: str = typer.Option("2%", "--max-accuracy-drop",
                                          help="Allowed relative perplexity increase and task accuracy decrease."),
    budget: bool = typer.Option(True, "--budget/--no-budget",
                                help="Also fail on budget lines the report itself misses."),
    allow_unverified: bool = typer.Option(False, "--allow-unverified",
                                          help="Accept a budget verdict whose figures were not all measured in the "
                                               "profile's runtime on its device (proxy or predicted)."),
    allow_missing: list[str] = typer.Option([], "--allow-missing",
                                            help="A section that may be missing from both reports (latency, "
                                                 "perplexity, accuracy, budget); repeat for several. Otherwise a "
                                                 "section the gate cannot judge exits 2."),
):
    from ..report import gate, parse_fraction, read_report
    from ..report.gate import SECTIONS

    for section in allow_missing:
        if section not in SECTIONS:
            raise UserError(f"--allow-missing {section!r} is not a section of a report (use {', '.join(SECTIONS)}).")

    lat = parse_fraction(max_latency_regression, "--max-latency-regression")
    acc = parse_fraction(max_accuracy_drop, "--max-accuracy-drop")
    try:
        res = gate(read_report(report), read_report(baseline), lat, acc, check_budget=budget,
                   allow_unverified=allow_unverified, allow_missing=tuple(allow_missing))
    except RecursionError:
        raise UserError("A report is nested too deeply to judge.") from None
    for v in res.violations:
        print(f"FAIL {v}")
    for u in res.unjudged:
        print(f"CANNOT JUDGE {u}")
    if res.violations:
        n = len(res.violations)
        raise UserError(f"{n} gate rule{'s' if n > 1 else ''} violated against the baseline {baseline}.",
                        exit_code=res.exit_code)
    if res.unjudged:
        raise UserError(f"The gate could not judge the report against the baseline {baseline} "
                        f"({res.unjudged[0].split(':')[0]}); nothing was found violated.", exit_code=res.exit_code)
    print(f"PASS: {', '.join(res.checked)} within limits (latency +{lat:.1%}, accuracy -{acc:.1%})")
