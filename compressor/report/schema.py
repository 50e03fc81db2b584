"""The report, typed and versioned: what the pipeline fills, `report.json` holds, the markdown,
plot and model card render, and the gate reads.

Schema `fitprune.report/5`: /4 plus `perplexity.cross_domain` (perplexity on text of other domains
than the calibration text, per domain and as a geometric mean). /4 added the provenance of every
budget line (`kind`, `runtime`, `device`, `verified`) and the budget's `verified` and `verdict`;
/3 renamed /2's `plan.calibration` to `cost_fit`. Older files still read; budget lines of files
before /4 count as not verified.
Every figure says whether it was measured or predicted, and where. Sections are optional so that
a partial report (a baseline written by hand, an older run) still reads; NaN and infinity
are written as JSON null, never as bare `NaN`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import UserError

SCHEMA = "fitprune.report/5"
READABLE = ("fitprune.report/1", "fitprune.report/2", "fitprune.report/3", "fitprune.report/4", SCHEMA)


class Section(BaseModel):
    model_config = ConfigDict(extra="allow")  # a section may carry notes a later version adds


class Method(Section):
    metric: str
    compensation: str
    structure: str
    attn_unit: str
    ratio_requested: float
    round_to: int
    calib: str
    nsamples: int
    seqlen: int
    seed: int
    passes: int
    search: dict | None = None
    dtype: str = ""  # the weights' dtype while pruning (--dtype; "" in reports before it was recorded)


class Params(Section):
    before: dict[str, int]
    after: dict[str, int]
    achieved_ratio_decoder: float
    achieved_ratio_total: float


class LayerWidths(Section):
    q_heads: list[int]
    kv_heads: list[int]
    intermediate: list[int]


class CrossDomain(Section):
    """Perplexity on text of other domains than the calibration text (data.DOMAINS): the yardstick
    methods are judged on, since the in-domain held-out region flatters re-fitted weights."""

    dense: float | None = None  # geometric mean over the domains
    pruned: float | None = None
    relative_increase: float | None = None
    domains: dict[str, dict] = Field(default_factory=dict)  # name -> {dense, pruned, description}
    windows: int = 0  # per domain
    seqlen: int = 0


class Perplexity(Section):
    dense: float | None = None  # in-domain: the held-out region of the builtin text's own stream
    pruned: float | None = None
    relative_increase: float | None = None
    text: str = ""
    windows: int = 0
    seqlen: int = 0
    measured: bool = True
    device: str = ""
    precision: str = ""  # the forward passes': "bfloat16 autocast", or "" (the weights' own dtype)
    cross_domain: CrossDomain | None = None


class Memory(Section):
    peak_rss_mib: float = 0.0
    peak_device_mib: float = 0.0
    what: str = ""
    # per stage (load, data, plan, perplexity_dense, pruning_step, export, checks, ...): peak host RSS and
    # peak device memory, each reset at the start of the stage
    stages: dict[str, dict[str, float]] = Field(default_factory=dict)
    stages_what: str = ""


class Export(Section):
    format: str
    architecture: str
    dtype: str
    files: list[str]


class BudgetLine(Section):
    line: str
    value: float | None
    limit: float
    unit: str
    ok: bool
    kind: str  # measured | proxy | predicted | computed | not measured (evaluate/verdict.py)
    device: str
    runtime: str | None = None  # where the figure was measured (or, predicted, what it is predicted for)
    verified: bool = False  # measured in the profile's runtime on its device (reports before /4: unknown, False)
    why: str | None = None  # why a line is not verified


class Budget(Section):
    passed: bool  # every line that has a figure holds
    verified: bool = False  # every line verified in the profile's runtime on its device
    verdict: str = ""  # the verdict in words
    target: str = ""  # the profile's runtime and device
    lines: list[BudgetLine] = Field(default_factory=list)
    limits: dict = Field(default_factory=dict)
    accuracy_floor: dict = Field(default_factory=dict)


class Host(Section):
    """The machine the run computed on."""

    machine: str = ""
    processor: str = ""
    torch_threads: int = 0
    torch: str = ""


class PlanSection(Section):
    """How the run came to its width and format: the lever frontier (every lever, or width only), or
    the option that fixed them (`ratio_source`); every figure in it predicted."""

    ratio_source: str = ""
    predicted: bool | None = None
    chosen: dict | None = None  # the lever frontier's choice
    frontier: list[dict] | None = None  # every lever candidate priced (and its KL where measured)
    rule: str | None = None  # how the lever plan chose
    notes: list[str] = Field(default_factory=list)
    # reports of the former width-only planner (fitprune.report/5 and before): its ratio grid, choice
    # and the cost model it fitted on the device
    rows: list[dict] | None = None
    chosen_ratio: float | None = None
    cost_fit: dict | None = None


class Latency(Section):
    """Measured on this host in a named runtime, and predicted for the profile's device."""

    runtime: str | None = None
    runtime_note: str | None = None
    on_profile_device: bool = False
    profile_device: str = ""
    profile_runtime: str = ""
    workload: dict = Field(default_factory=dict)
    measured: dict = Field(default_factory=dict)  # dense / pruned, or {"skipped": why}
    predicted: dict = Field(default_factory=dict)  # dense / pruned on the profile's device


class Accuracy(Section):
    """lm-eval scores (measured) and the profile's accuracy floor."""

    lm_eval: dict = Field(default_factory=dict)
    max_ppl_increase: float | None = None
    min_task_accuracy: float | None = None


class RecoveryBefore(Section):
    heldout_perplexity: float | None = None
    cross_domain_perplexity: float | None = None
    device: str = ""


class Recovery(Section):
    """Distillation after pruning (compressor/recover): its cost and the quality before it."""

    tokens: int = 0  # training tokens seen (positions with a target)
    steps: int = 0
    seconds: float = 0.0
    peak_rss_mib: float | None = None
    loss_first: float | None = None  # KL to the dense model at the first step
    loss_last: float | None = None  # mean KL of the last 10% of steps
    mode: str = ""  # "full, embeddings frozen" (every decoder parameter) or "lora (rank r)"
    lr: float | None = None  # AdamW's peak learning rate
    tokens_requested: int = 0
    unique_tokens: int = 0
    text: str = ""
    before: RecoveryBefore | None = None


class Report(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    schema_: str = Field(SCHEMA, alias="schema")
    created_unix: int | None = None
    model: str | None = None
    profile: str | None = None
    method: Method | None = None
    params: Params | None = None
    widths: LayerWidths | None = None
    perplexity: Perplexity | None = None
    memory: Memory | None = None
    host: Host | None = None
    export: Export | None = None
    plan: PlanSection | None = None
    latency: Latency | None = None
    accuracy: Accuracy | None = None
    budget: Budget | None = None
    recovery: Recovery | None = None
    plot: str | None = None
    seconds: dict[str, float] = Field(default_factory=dict)
    peak_rss_mib_total: float | None = None
    output: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The report as report.json holds it (no None sections, NaN/inf as None)."""
        return _finite(self.model_dump(by_alias=True, exclude_none=True))

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2, allow_nan=False)

    @classmethod
    def parse(cls, data: Any, where: str = "the report") -> Report:
        if not isinstance(data, dict) or str(data.get("schema", "")) not in READABLE:
            raise UserError(f"{where} is not a fitprune report (no 'schema: fitprune.report/N' this version reads).")
        data = dict(data)
        if isinstance(data.get("plan"), dict) and "calibration" in data["plan"]:  # /2 name
            data["plan"] = {("cost_fit" if k == "calibration" else k): v for k, v in data["plan"].items()}
        try:
            return cls.model_validate(data)
        except RecursionError:
            raise UserError(f"{where} is not a valid fitprune report (nested too deeply).") from None
        except ValidationError as exc:
            e = exc.errors()[0]
            loc = ".".join(str(p) for p in e.get("loc", ()))
            raise UserError(f"{where} is not a valid fitprune report ({loc}: {e.get('msg')}).") from None

    @classmethod
    def read(cls, path: Path) -> Report:
        path = Path(path)
        if path.is_dir():
            if not (path / "report.json").exists():
                raise UserError(f"The directory {path} holds no report.json (is it a fitprune output directory?).")
            path = path / "report.json"
        if path.is_dir():
            raise UserError(f"The report {path} is a directory, not a report file.")
        if not path.is_file():
            raise UserError(f"The report {path} does not exist.")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"The report {path} is not valid JSON (truncated or not a report).") from exc
        except (ValueError, RecursionError) as exc:  # a number of thousands of digits, nesting past the stack
            raise UserError(f"The report {path} cannot be read as JSON: it is nested too deeply or holds a number "
                            "too long.") from exc
        except OSError as exc:
            raise UserError(f"The report {path} cannot be read ({exc.strerror}).") from exc
        return cls.parse(data, where=f"The file {path}")


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x
