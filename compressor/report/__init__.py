"""The report: its typed schema, report.md, report.png, the model card and the CI gate."""

from .gate import EXIT_BAD_INPUT, EXIT_PASS, EXIT_VIOLATED, GateResult, gate, parse_fraction, read_report
from .schema import SCHEMA, Report

__all__ = ["EXIT_BAD_INPUT", "EXIT_PASS", "EXIT_VIOLATED", "SCHEMA", "GateResult", "Report", "gate",
           "parse_fraction", "read_report"]
