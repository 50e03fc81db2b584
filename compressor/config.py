"""The run configuration: every option of the main job, validated once, here.

`RunConfig.make(**options)` turns a bad value into one sentence (a `UserError`), before any work
starts: unknown names (metric, compensation, structure, attention unit, export dtype, lm-eval
backend), counts that must be positive, more threads than CPUs, a seed outside numpy's range, a
calibration file that is missing or a directory, a compute device this machine does not have, and
an output path that is empty, under a file, not empty, or on a disk that cannot be written. What
only the model can tell (the longest sequence it takes, its MLP width against --round-to) is
checked by `check_model` right after the model's config is read. `refuse_out_dir` and
`refuse_out_file` give the sub-commands the same checks for their output paths.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import UserError
from .prune import ATTN_UNITS, COMPENSATION, DEPTH_BLOCKS, IMPORTANCE, STRUCTURES

EXPORT_DTYPES = ("auto", "float32", "bfloat16", "float16")
LM_EVAL_BACKENDS = ("hf", "vllm")
OUT_OF_CORE = ("auto", "on", "off")
PASSES = ("auto", "one", "two")


def _one_of(value: str, allowed: tuple[str, ...] | list[str], option: str) -> str:
    if value not in allowed:
        raise ValueError(f"Unknown {option} '{value}' (use {', '.join(allowed)}).")
    return value


class RunConfig(BaseModel):
    """What `compress run` was asked to do."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    model: str | None = None
    profile: str = "auto"  # auto: the shipped profile of this host's GPUs, else cpu-2core (profiles/auto.py)
    ratio: float | None = None  # None: the planner's choice
    metric: str = "auto"
    compensation: str = "auto"
    structure: str = "auto"  # auto = the metric's default
    attn_unit: str = "auto"
    blocks: str = "auto"  # --structure depth: which blocks it removes (layer, attention, mlp, any)
    round_to: int | None = None  # None = the profile's
    calib: str = "builtin"
    nsamples: int = 128
    seqlen: int = 512
    eval_samples: int = 40
    eval_items: int = 400  # cloze items of the lm-eval task (evaluate/lm_eval.py CLOZE_ITEMS)
    domain_windows: int = 8  # windows per domain of the cross-domain perplexity (data.DOMAINS); 0: not measured
    batch_size: int = 8
    device: str = Field("auto", validate_default=True)  # auto: cuda when torch sees a GPU, else cpu
    seed: int = 0
    out: Path | None = None
    export_dtype: str = "auto"
    # the weights' dtype in memory and in the layer-wise passes (auto: the checkpoint's own; statistics
    # accumulate in float64 either way)
    dtype: str = "auto"
    threads: int | None = None
    trust_remote_code: bool = False
    search: bool = False
    trials: int = 20
    # budget lines in place of the profile's (None: the profile's own)
    memory_gib: float | None = Field(None, gt=0)
    ttft_ms: float | None = Field(None, gt=0)
    tpot_ms: float | None = Field(None, gt=0)
    throughput: float | None = Field(None, gt=0)
    # without --ratio: plan over width, depth and weight format (budget/frontier.py); None: the default,
    # every lever unless an option asks for a width-only plan or the run goes out of core
    levers: bool | None = None
    search_generations: int = 30  # --structure searched: generations of the allocation search (prune/evolve.py)
    checks: bool = True  # after export: latency in the profile's runtime, lm-eval tasks, budget verdict
    lm_eval_backend: str = "hf"  # "vllm": also run the lm-eval tasks on the export as vLLM serves it
    # measure latency in this runtime instead of the profile's (a labelled proxy unless it is the profile's)
    runtime: str | None = None
    # weights stay in the checkpoint and one layer at a time is in memory (auto: when the model in
    # `dtype` would not fit in half of the free memory); see compressor/pipeline/streamed.py
    out_of_core: str = "auto"
    # after pruning, distil from the dense model for this many training tokens (compressor/recover); 0: off
    recover_tokens: int = 0
    recover_lora: int = 0  # LoRA rank of the recovery (merged back before export); 0: every parameter trains
    resume: bool = False  # continue an interrupted out-of-core run on the same --out
    # out of core with a Gram-based compensation: keep every layer's Gram matrices from pass 1 ("one")
    # or recompute one layer's at a time in pass 2 ("two"); auto: from the predicted memory
    passes: str = "auto"
    # after pruning, quantize the export with compressed-tensors (exporters/quantize.py): none,
    # w8a8-int8, w4a16, w8a16 or fp8; a scheme the profile's device has no kernel for is refused
    quantize: str = "none"

    @classmethod
    def make(cls, **options) -> RunConfig:
        """Validate `options`; the first problem becomes one sentence."""
        try:
            return cls(**options)
        except ValidationError as exc:
            raise UserError(_sentence(exc)) from None

    # ---- names -----------------------------------------------------------------------------
    @field_validator("metric", "compensation")
    @classmethod
    def _registered(cls, v: str, info) -> str:
        registry = IMPORTANCE if info.field_name == "metric" else COMPENSATION
        if v not in registry:
            raise ValueError(f"Unknown {registry.kind} '{v}' (known: auto, {', '.join(registry.names())}).")
        return v

    @field_validator("structure", "attn_unit")
    @classmethod
    def _choice(cls, v: str, info) -> str:
        allowed = ("auto", *STRUCTURES) if info.field_name == "structure" else ATTN_UNITS
        return _one_of(v, allowed, "--" + info.field_name.replace("_", "-"))

    @field_validator("blocks")
    @classmethod
    def _blocks(cls, v: str, info) -> str:
        _one_of(v, DEPTH_BLOCKS, "--blocks")
        if v != "auto" and info.data.get("structure") != "depth":
            raise ValueError(f"--blocks {v} chooses the blocks that depth pruning removes; it needs --structure depth.")
        return v

    @field_validator("export_dtype")
    @classmethod
    def _export_dtype(cls, v: str) -> str:
        return _one_of(v, EXPORT_DTYPES, "--export-dtype")

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        return _one_of(v, EXPORT_DTYPES, "--dtype")

    @field_validator("lm_eval_backend")
    @classmethod
    def _backend(cls, v: str) -> str:
        return _one_of(v, LM_EVAL_BACKENDS, "--lm-eval-backend")

    @field_validator("runtime")
    @classmethod
    def _runtime(cls, v: str | None) -> str | None:
        from runtimes.base import RUNTIMES

        return None if v is None else _one_of(v, RUNTIMES.names(), "--runtime")

    @field_validator("quantize")
    @classmethod
    def _quantize(cls, v: str) -> str:
        from exporters.quantize import CHOICES, check_available

        check_available(_one_of(v, CHOICES, "--quantize"))
        return v

    @field_validator("out_of_core", "passes")
    @classmethod
    def _out_of_core(cls, v: str, info) -> str:
        option = "--" + info.field_name.replace("_", "-")
        _one_of(v, OUT_OF_CORE if info.field_name == "out_of_core" else PASSES, option)
        if v == "two" and info.data.get("structure") == "searched":
            raise ValueError("--structure searched builds its candidates from every layer's statistics kept in "
                             "memory, and --passes two keeps one layer's at a time: use one of them.")
        return v

    @field_validator("search")
    @classmethod
    def _one_search(cls, v: bool, info) -> bool:
        if v and info.data.get("structure") == "searched":
            raise ValueError("--search (the metric mixture) and --structure searched (the per-layer allocation) are "
                             "two different searches; use one of them.")
        return v

    # ---- numbers ---------------------------------------------------------------------------
    @field_validator("ratio")
    @classmethod
    def _ratio(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 < v < 1.0:
            raise ValueError(f"The pruning ratio must be between 0 and 1 (exclusive), got {v}.")
        return v

    @field_validator("eval_items")
    @classmethod
    def _eval_items(cls, v: int) -> int:
        if not 20 <= v <= 2000:
            raise ValueError(f"--eval-items must be between 20 and 2000, got {v}.")
        return v

    @field_validator("recover_tokens", "recover_lora")
    @classmethod
    def _recover(cls, v: int, info) -> int:
        most = 100_000_000 if info.field_name == "recover_tokens" else 1024
        if not 0 <= v <= most:
            raise ValueError(f"--{info.field_name.replace('_', '-')} must be between 0 and {most:,}, got {v}.")
        return v

    @field_validator("domain_windows")
    @classmethod
    def _domain_windows(cls, v: int) -> int:
        if not 0 <= v <= 256:
            raise ValueError(f"--domain-windows must be between 0 and 256, got {v}.")
        return v

    @field_validator("round_to", "threads", "nsamples", "eval_samples", "batch_size", "trials", "seqlen",
                     "search_generations")
    @classmethod
    def _at_least(cls, v: int | None, info) -> int | None:
        least = 2 if info.field_name == "seqlen" else 1  # None: the default (the profile's, torch's)
        if v is not None and v < least:
            raise ValueError(f"--{info.field_name.replace('_', '-')} must be at least {least}, got {v}.")
        if info.field_name == "threads" and v is not None and v > (os.cpu_count() or 1):
            # torch starts every one of them: 100000 threads exhaust memory before any work
            raise ValueError(f"--threads {v} is more than the {os.cpu_count()} CPUs of this machine.")
        return v

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int) -> int:
        if not 0 <= v < 2**32:  # numpy's (and Optuna's) seed range
            raise ValueError(f"--seed must be between 0 and {2**32 - 1}, got {v}.")
        return v

    @field_validator("calib")
    @classmethod
    def _calib(cls, v: str) -> str:
        """A calibration file is checked now, not after the model has loaded (builtin, self and
        hf:NAME are checked by the data stage). Several sources joined by `+` (data.MIX) are each
        checked; a file whose whole name holds a `+` is one source."""
        if "+" in v and not Path(v).expanduser().is_file():
            parts = [p.strip() for p in v.split("+")]
            if not all(parts):
                raise ValueError(f"--calib '{v}' has an empty part; join sources with '+', e.g. builtin+self.")
            repeated = sorted({p for p in parts if parts.count(p) > 1})
            if repeated:
                raise ValueError(f"--calib '{v}' names {repeated[0]} twice; each source is one equal share.")
            for part in parts:
                cls._calib(part)
            return v
        if v in ("builtin", "self") or v.startswith("hf:"):
            return v
        if not v.strip():
            raise ValueError("--calib must be builtin, self, hf:NAME or a file, not an empty string.")
        path = Path(v).expanduser()
        if path.is_dir():
            raise ValueError(f"The calibration file {path} is a directory; give a .txt or .jsonl file.")
        if path.exists() and not path.is_file():
            raise ValueError(f"The calibration file {path} is not a regular file (a device, pipe or socket); "
                             "give a .txt or .jsonl file.")
        if not path.is_file():
            raise ValueError(f"The calibration file {path} does not exist (use builtin, self, hf:NAME or a "
                             ".txt/.jsonl file).")
        return v

    # ---- places ----------------------------------------------------------------------------
    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v == "auto":
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        check_device(v)
        return v

    @field_validator("out", mode="before")
    @classmethod
    def _out(cls, v):
        if v is not None:
            if str(v).strip() == "":
                raise ValueError("--out must name a directory, not an empty string.")
            check_out_path(Path(v))
        return v

    # ---- what only the model can tell ------------------------------------------------------
    def check_model(self, model_config) -> None:
        """Options the model limits: a window longer than the model's positions is refused."""
        limit = getattr(model_config, "max_position_embeddings", None)
        if limit and self.seqlen > limit:
            raise UserError(f"--seqlen {self.seqlen} is longer than the model's {limit} positions.")
        width = getattr(model_config, "intermediate_size", None)
        if self.round_to and isinstance(width, int) and self.round_to > width:
            raise UserError(f"--round-to {self.round_to} is wider than the model's MLP ({width} channels), so no MLP "
                            "channel could be removed; choose a multiple that divides it.")
        if self.quantize != "none":  # a group-wise scheme the unpruned widths (hidden size) do not divide
            from exporters.quantize import config_widths, refuse_for_widths

            refuse_for_widths(self.quantize, config_widths(model_config))

    @property
    def quantize_only(self) -> bool:
        """`--quantize F` without `--ratio` (nor --levers or --width-only): no pruning, the format alone."""
        return self.ratio is None and self.quantize != "none" and self.levers is None

    @property
    def plans_levers(self) -> bool:
        """An in-memory run plans with every lever: asked with --levers, or by default where no option
        fixes the width (--ratio), the format (--quantize) or the method (--structure, --search)."""
        if self.levers is not None:
            return self.levers
        return (self.ratio is None and self.quantize == "none" and self.structure == "auto" and not self.search)

    @property
    def compute(self):
        from .prune.driver import Compute

        return Compute(device=self.device, batch_size=self.batch_size)


def _sentence(exc: ValidationError) -> str:
    err = exc.errors()[0]
    msg = str(err.get("msg", exc))
    if msg.startswith("Value error, "):
        return msg[len("Value error, "):]
    field = ".".join(str(p) for p in err.get("loc", ()))
    return f"--{field.replace('_', '-')}: {msg}."


def check_device(device: str) -> None:
    """Refuse a compute device this machine does not have (one sentence)."""
    kind, _, index = device.partition(":")
    if kind == "cpu" and not index:
        return
    if kind not in ("cuda", "mps", "xpu"):
        raise ValueError(f"Unknown --device '{device}' (use auto, cpu, cuda or cuda:N).")
    import torch

    backend = getattr(torch, kind, None)
    available = bool(backend and backend.is_available())
    if not available:
        raise ValueError(f"--device {device} is not available on this machine (no {kind.upper()} device found).")
    if index:
        count = backend.device_count() if hasattr(backend, "device_count") else 1
        if not index.isdigit() or int(index) >= count:
            raise ValueError(f"--device {device} does not exist here ({count} {kind} device(s)).")


def check_out_path(out: Path) -> None:
    """Refuse an output path that cannot become a new directory, before any work is done."""
    if str(out).strip() == "":
        raise ValueError("--out must name a directory, not an empty string.")
    out = Path(os.path.expanduser(str(out))).absolute()
    if out.exists() and not out.is_dir():
        raise ValueError(f"The output path {out} is a file; choose a directory for --out.")
    if out.is_dir() and any(out.iterdir()):
        raise ValueError(f"The output directory {out} already exists and is not empty; choose another --out.")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"The output path {out} lies under the file {parent}; choose a directory for --out.")
    why = _unwritable(parent)
    if why:
        raise ValueError(f"The output directory {out} cannot be written ({parent}: {why}).")


def _unwritable(folder: Path) -> str | None:
    """Why a file cannot be created in `folder` (tried with a probe file, removed at once), or None."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".fitprune-probe-", dir=folder)
    except OSError as exc:
        return exc.strerror
    os.close(fd)
    os.unlink(probe)
    return None


def refuse_out_dir(out: Path, option: str = "--out") -> None:
    """`check_out_path` for the sub-commands: one sentence (a `UserError`) before any work."""
    if str(out).strip() == "":
        raise UserError(f"{option} must name a directory, not an empty string.")
    try:
        check_out_path(Path(out))
    except ValueError as exc:
        raise UserError(str(exc).replace("--out", option)) from None


def refuse_out_file(path: Path, option: str) -> None:
    """A file the command will write at the end (e.g. `plan --json`): refused before the work when
    it is a directory, lies under a file, or its directory cannot be written."""
    path = Path(os.path.expanduser(str(path))).absolute()
    if path.is_dir():
        raise UserError(f"{option} {path} is a directory; give a file name.")
    parent = path.parent
    if not parent.exists():
        above = next((p for p in parent.parents if p.exists()), None)
        if above is not None and not above.is_dir():
            raise UserError(f"{option} {path} lies under the file {above}.")
        raise UserError(f"{option} {path} is in a directory that does not exist ({parent}).")
    if not parent.is_dir():
        raise UserError(f"{option} {path} lies under the file {parent}.")
    why = _unwritable(parent)
    if why:
        raise UserError(f"{option} {path} cannot be written ({parent}: {why}).")
