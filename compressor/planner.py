"""The planner: which pruning ratio does a profile's budget force?

For every ratio of a grid (0 to 0.7 in steps of 0.05) the widths that uniform pruning would give
(the allocation's own rules: whole attention units, MLP channels for the rest, rounded to the
profile's multiple) go through the cost model (`profiles.costmodel`); the plan is the smallest
ratio whose prediction meets every budget line (memory, TTFT, TPOT, throughput). When none does,
the budget is infeasible and the plan names the closest ratio and the lines it still misses.

Only the model's config is read. Where the profile's device is the one at hand, `calibrate`
measures the dense architecture (and a skeleton of it: the same depth and embeddings, minimal
widths) in the runtime, with random weights, and fits the efficiency factors to the two
measurements, so that the plan predicts this device rather than a datasheet.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from profiles import Efficiency, Profile
from profiles.costmodel import Arch, CostModel, Prediction, Violation

from .allocation import _round_channels
from .errors import UserError

GRID = tuple(round(0.05 * i, 2) for i in range(15))  # 0.0 .. 0.7


class InfeasibleBudget(UserError):
    """No ratio of the grid meets the budget (exit code 3)."""

    def __init__(self, message: str):
        super().__init__(message, exit_code=3)


class NothingToPrune(UserError):
    """The dense model meets the budget already and no --ratio was given (exit code 4)."""

    def __init__(self, message: str):
        super().__init__(message, exit_code=4)


def arch_at_ratio(arch: Arch, ratio: float, attn_unit: str = "auto", round_to: int = 1) -> Arch:
    """The widths uniform pruning gives at `ratio` (the same fraction of every layer's weights)."""
    if ratio <= 0:
        return arch
    q, kv, inter = [], [], []
    for i in range(arch.layers):
        nq, nkv, n_i = arch.q_heads[i], arch.kv_heads[i], arch.intermediate[i]
        per = nq // nkv
        unit = attn_unit
        if unit == "auto" or (unit == "query" and per == 1):
            unit = "query" if per > 1 else "kv"
        n_units = per if unit == "query" else nkv
        n_rm = min(n_units - 1, int(round(n_units * ratio)))
        if unit == "query":
            cost = arch.hidden * arch.head_dim * 2 * nkv
            q.append(nq - n_rm * nkv)
            kv.append(nkv)
        else:
            cost = arch.hidden * arch.head_dim * (2 * per + 2)
            q.append(nq - n_rm * per)
            kv.append(nkv - n_rm)
        mlp_target = ratio * arch.layer_params(i) - n_rm * cost
        removed = max(0.0, mlp_target / (3 * arch.hidden))
        inter.append(_round_channels(int(round(n_i - removed)), n_i, round_to))
    return Arch(arch.hidden, arch.vocab, arch.head_dim, tuple(q), tuple(kv), tuple(inter), arch.tied_embeddings)


@dataclass
class PlanRow:
    ratio: float
    arch: Arch
    prediction: Prediction
    violations: list[Violation]

    @property
    def ok(self) -> bool:
        return not self.violations

    @property
    def worst_excess(self) -> float:
        return max((v.excess for v in self.violations), default=1.0)

    def as_dict(self, dense_decoder: int) -> dict:
        return {"ratio": self.ratio, "params": self.arch.total_params,
                "decoder_removed": round(1 - self.arch.decoder_params / dense_decoder, 4),
                **self.prediction.as_dict(), "meets_budget": self.ok,
                "violations": [v.sentence() for v in self.violations]}


@dataclass
class Plan:
    profile: str
    rows: list[PlanRow]
    efficiency: dict
    calibration: dict | None = None
    chosen: PlanRow | None = None
    closest: PlanRow | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def feasible(self) -> bool:
        return self.chosen is not None

    @property
    def ratio(self) -> float:
        row = self.chosen or self.closest
        assert row is not None
        return row.ratio

    def infeasible_sentence(self) -> str:
        c = self.closest
        assert c is not None
        return (f"The budget of profile '{self.profile}' is infeasible: even at the closest ratio "
                f"{c.ratio:.2f} the predicted " + "; ".join(v.sentence() for v in c.violations) + ".")

    def as_dict(self) -> dict:
        dense = self.rows[0].arch.decoder_params
        rows = [r.as_dict(dense) for r in self.rows]
        return {
            "profile": self.profile, "feasible": self.feasible,
            "chosen_ratio": self.chosen.ratio if self.chosen else None,
            "closest_ratio": None if self.chosen else (self.closest.ratio if self.closest else None),
            "efficiency": self.efficiency, "calibration": self.calibration, "notes": self.notes,
            "rows": rows, "predicted": True,
        }


def make_plan(profile: Profile, arch: Arch, cost: CostModel | None = None, grid: tuple[float, ...] = GRID,
              attn_unit: str = "auto", round_to: int | None = None) -> Plan:
    cost = cost or CostModel(profile)
    rt = round_to or profile.round_to
    rows = []
    for r in grid:
        a = arch_at_ratio(arch, r, attn_unit, rt)
        pred = cost.predict(a)
        rows.append(PlanRow(r, a, pred, cost.violations(pred)))
    plan = Plan(profile.name, rows, {**cost.efficiency.model_dump(), "source": cost.efficiency_source})
    plan.chosen = next((row for row in rows if row.ok), None)
    if plan.chosen is None:
        plan.closest = min(rows, key=lambda row: (row.worst_excess, row.ratio))
    return plan


# ---- the model's architecture, from its config only --------------------------------------------

def read_config(model: str | None) -> tuple[dict, Path | None]:
    """The model's config as a dict, and its local directory when it has one (None for a hub id)."""
    from . import models

    name = models.resolve(model)
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"The GGUF file {name} does not exist.")
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name).to_dict(), None
    if path.exists():
        cfg = path / "config.json"
        if not cfg.is_file():
            raise UserError(f"{name} is not a Hugging Face model directory (no config.json in it).")
        try:
            return json.loads(cfg.read_text(encoding="utf-8")), path
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"The config {cfg} is not valid JSON.") from exc
    if models._is_hub_id(name):
        try:
            from transformers import AutoConfig

            return AutoConfig.from_pretrained(name).to_dict(), None
        except OSError as exc:
            raise UserError(f"Cannot read the config of '{name}' from the Hugging Face hub (offline?).") from exc
    raise UserError(f"The model path {name} does not exist.")


def arch_of(config: dict) -> Arch:
    try:
        return Arch.from_config(config)
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"The model config lacks what the cost model needs ({exc}); is it a decoder-only LM?") from exc


# ---- calibration on the device at hand ----------------------------------------------------------

def device_present(profile: Profile) -> bool:
    """Is the profile's device the one this process runs on? (CPU profile on a CPU-only host, or a
    GPU whose name contains the profile's device name's model part.)"""
    import torch

    if profile.device.kind == "cpu":
        return not torch.cuda.is_available()
    if not torch.cuda.is_available():
        return False
    here = torch.cuda.get_device_name().lower()
    words = [w for w in profile.device.name.lower().replace("nvidia", "").split() if len(w) > 2]
    return bool(words) and any(w in here for w in words[:2]) and torch.cuda.device_count() >= profile.device.count


def measurement_runtime(profile: Profile) -> tuple[str, str | None]:
    """The runtime to measure in: the profile's when it works here, else torch, with a note saying so."""
    from runtimes.base import RuntimeUnavailable, get_runtime

    try:
        get_runtime(profile.runtime).check_available()
        return profile.runtime, None
    except RuntimeUnavailable as exc:
        if profile.runtime == "torch":
            raise UserError(f"The torch runtime is not usable here: {exc}") from exc
        return "torch", f"the profile's runtime '{profile.runtime}' is not available here ({exc}); measured in torch"


def skeleton(arch: Arch, round_to: int) -> Arch:
    """The same depth, hidden size and embeddings with one head and one MLP channel group per layer."""
    n = arch.layers
    return Arch(arch.hidden, arch.vocab, arch.head_dim, (1,) * n, (1,) * n,
                (min(round_to, min(arch.intermediate)),) * n, arch.tied_embeddings)


def _write_random_model(config: dict, arch: Arch, tokenizer_dir: Path, dtype: str, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    d = {k: v for k, v in config.items() if k not in ("architectures", "auto_map", "quantization_config",
                                                       "_name_or_path", "transformers_version")}
    uniform = len(set(arch.q_heads)) == 1 and len(set(arch.kv_heads)) == 1 and len(set(arch.intermediate)) == 1
    if not uniform:
        raise ValueError("calibration models have uniform widths")
    d.update(num_attention_heads=arch.q_heads[0], num_key_value_heads=arch.kv_heads[0],
             intermediate_size=arch.intermediate[0], head_dim=arch.head_dim)
    for key in ("layer_num_attention_heads", "layer_num_key_value_heads", "layer_intermediate_size"):
        d.pop(key, None)
    model_type = d.pop("model_type")
    if model_type == "llama" and arch.hidden % arch.q_heads[0]:
        model_type = "mistral"  # takes an explicit head_dim (see exporters/hf.py)
        d["sliding_window"] = None
    if model_type == "fitprune":
        model_type = "llama"
    cfg = AutoConfig.for_model(model_type, **d)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(out)


def measure_batch1(rt, prompt_tokens: int, output_tokens: int, runs: int):
    """TTFT and TPOT at batch 1 (what the fit needs; throughput is predicted from them), medians."""
    import statistics

    from runtimes.base import Measurement, benchmark_prompt

    prompt = benchmark_prompt(rt.tokenizer, prompt_tokens)
    rt.time_per_output_token(prompt, output_tokens, 1)  # warm-up
    ttft = statistics.median(rt.time_to_first_token(prompt, runs))
    tpot = statistics.median(rt.time_per_output_token(prompt, output_tokens, runs))
    return Measurement(runtime=rt.name, device=rt.device, dtype=rt.dtype, prompt_tokens=prompt_tokens,
                       output_tokens=output_tokens, concurrency=1, ttft_s=ttft, tpot_s=tpot,
                       throughput_tok_s=1 / tpot, runs=runs, warmup=1,
                       extra={"throughput": "batch 1 (1 / TPOT); the workload's concurrency was not measured"})


@dataclass
class Calibration:
    efficiency: Efficiency
    source: str
    details: dict


def calibrate(profile: Profile, config: dict, tokenizer_dir: Path, runtime: str, runs: int = 3,
              say=print) -> Calibration:
    """Measure the dense architecture and its skeleton (random weights, the profile's dtype and
    workload) in `runtime`; fit decode = overhead + bytes / bandwidth and prefill = overhead +
    FLOPs / compute to the two points. The weights' values do not change the time."""
    from .checks import open_runtime

    dense = arch_of(config)
    skel = skeleton(dense, profile.round_to)
    cost = CostModel(profile)
    w = profile.workload
    threads = profile.device.threads if profile.device.kind == "cpu" else None
    meas = {}
    tmp = Path(tempfile.mkdtemp(prefix="fitprune-calib-"))
    try:
        for name, arch in (("dense", dense), ("skeleton", skel)):
            path = tmp / name
            _write_random_model(config, arch, tokenizer_dir, profile.dtype, path)
            say(f"calibrating: measuring the {name} architecture in {runtime} "
                f"({w.prompt_tokens} prompt + {w.output_tokens} output tokens, batch 1)")
            with open_runtime(runtime, path, profile.dtype, threads) as rt:
                meas[name] = measure_batch1(rt, w.prompt_tokens, w.output_tokens, runs)
            shutil.rmtree(path, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    d, s = meas["dense"], meas["skeleton"]
    dev, nb = profile.device, cost.dtype_bytes
    ctx = w.prompt_tokens + w.output_tokens // 2
    bytes_d = dense.params_read_per_token * nb + ctx * dense.kv_bytes_per_token(nb)
    bytes_s = skel.params_read_per_token * nb + ctx * skel.kv_bytes_per_token(nb)
    sec_per_byte = (d.tpot_s - s.tpot_s) / (bytes_d - bytes_s)
    flops_d, flops_s = cost.prefill_flops(dense, w.prompt_tokens), cost.prefill_flops(skel, w.prompt_tokens)
    sec_per_flop = (d.ttft_s - s.ttft_s) / (flops_d - flops_s)
    notes = []
    if sec_per_byte <= 0 or sec_per_flop <= 0:
        # noise swamped the difference: keep the profile's factors, fit only the overheads
        notes.append("the dense and skeleton runs were too close to separate; bandwidth/compute factors "
                     "kept from the profile")
        base = profile.efficiency
        sec_per_byte = 1 / (dev.bandwidth_gbs * 1e9 * base.bandwidth * dev.count)
        sec_per_flop = 1 / (dev.peak_tflops * 1e12 * base.compute * dev.count)
    bandwidth = 1 / (sec_per_byte * dev.bandwidth_gbs * 1e9 * dev.count)
    compute = 1 / (sec_per_flop * dev.peak_tflops * 1e12 * dev.count)
    # The intercepts are fitted, not clamped: they hold the fixed cost per step *and* the
    # difference between how fast the LM head (one large matrix, never pruned) and the decoder's
    # small matrices stream, so on CPUs they can come out negative. Pruned models lie between the
    # two measured points, where the fitted line is what was measured.
    step = d.tpot_s - bytes_d * sec_per_byte
    prefill = d.ttft_s - flops_d * sec_per_flop
    # measured factors may exceed 1 where the profile's nominal peak understates the device (caches)
    eff = Efficiency.model_construct(bandwidth=bandwidth, compute=compute, step_overhead_ms=step * 1e3,
                                     prefill_overhead_ms=prefill * 1e3, layer_overhead_us=0.0,
                                     allreduce_us=profile.efficiency.allreduce_us)
    source = f"calibrated: dense + skeleton measured in {runtime} on {d.device}"
    return Calibration(eff, source, {
        "runtime": runtime, "device": d.device, "dtype": profile.dtype, "notes": notes,
        "measured": {k: m.as_dict() for k, m in meas.items()},
        "fit": {"seconds_per_gb_read": sec_per_byte * 1e9, "effective_gb_s": 1e-9 / sec_per_byte,
                "effective_tflops": 1e-12 / sec_per_flop, "decode_overhead_ms": step * 1e3,
                "prefill_overhead_ms": prefill * 1e3},
    })


def plan_for(profile: Profile, model: str | None, calibrate_here: bool | None = None, attn_unit: str = "auto",
             round_to: int | None = None, runs: int = 3, say=print) -> tuple[Plan, Arch]:
    """Read the model's config, calibrate where the device is present (unless told not to), plan."""
    config, model_dir = read_config(model)
    arch = arch_of(config)
    cost = CostModel(profile)
    cal = None
    notes = []
    want = device_present(profile) if calibrate_here is None else calibrate_here
    if want:
        if model_dir is None or not (model_dir / "tokenizer_config.json").is_file() and not (
                model_dir / "tokenizer.json").is_file():
            notes.append("no local tokenizer beside the config, so no calibration run; profile factors used")
        else:
            runtime, note = measurement_runtime(profile)
            if note:
                notes.append(note)
            cal = calibrate(profile, config, model_dir, runtime, runs=runs, say=say)
            cost = cost.with_efficiency(cal.efficiency, cal.source)
            notes += cal.details["notes"]
    elif calibrate_here is None:
        notes.append(f"the profile's device ({profile.device.name}) is not present here: "
                     "predictions use the profile's efficiency factors")
    plan = make_plan(profile, arch, cost, attn_unit=attn_unit, round_to=round_to)
    plan.calibration = cal.details if cal else None
    plan.notes = notes
    return plan, arch


def plan_for_run(profile: Profile, model: str | None, attn_unit: str, round_to: int, say=print) -> Plan:
    """The main job's plan: the chosen ratio, or one clear sentence (infeasible / nothing to prune)."""
    plan, _ = plan_for(profile, model, attn_unit=attn_unit, round_to=round_to, runs=2, say=say)
    if not plan.feasible:
        raise InfeasibleBudget(plan.infeasible_sentence() + " Pass --ratio to prune anyway.")
    if plan.chosen.ratio == 0:
        p = plan.chosen.prediction
        raise NothingToPrune(
            f"The dense model already meets every budget line of profile '{profile.name}' (predicted "
            f"{p.memory.total_gib:.2f} GiB, TTFT {p.ttft_s * 1e3:.1f} ms, TPOT {p.tpot_s * 1e3:.2f} ms, "
            f"{p.throughput_tok_s:.1f} tok/s); nothing to prune, so nothing was written. Pass --ratio to prune anyway.")
    for n in plan.notes:
        say(f"plan note: {n}")
    pred = plan.chosen.prediction
    say(f"plan: ratio {plan.chosen.ratio:.2f} is the smallest that meets every budget line of '{profile.name}' "
        f"(predicted TPOT {pred.tpot_s * 1e3:.2f} ms, TTFT {pred.ttft_s * 1e3:.1f} ms)")
    return plan
