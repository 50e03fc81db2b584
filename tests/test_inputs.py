"""Broken inputs are refused before the work, in one sentence, with nothing left behind.

Each test builds one broken input from the tiny Llama (`tiny_model_dir`) and runs the real CLI:
a checkpoint whose config and tensors disagree, non-finite weights or results, malformed files
given to the sub-commands, and option values that make no sense. `assert_clean_failure` checks the
one `error:` line, the non-zero exit, no traceback and no output; the tests also check that no
temporary directory (TMPDIR, the out-of-core work directory) survives. Checkpoint cases run both
in memory (`--out-of-core off`) and out of core (`on`): a NaN or incomplete checkpoint never
produces an output on either path.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from compressor.report.schema import SCHEMA
from tests.conftest import assert_clean_failure, run_main

# --structure global: the allocation search (auto on a small model in memory) is not what these cases test
FAST = ["--ratio", "0.2", "--no-checks", "--calib", "builtin", "--nsamples", "4", "--seqlen", "64",
        "--structure", "global"]
MODES = pytest.mark.parametrize("mode", ["off", "on"], ids=["in-memory", "out-of-core"])
UP = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(autouse=True)
def _private_tmpdir(tmp_path, monkeypatch):
    """Every CLI run gets its own TMPDIR, checked empty afterwards: no temporary directory survives."""
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    yield
    # .ses: ONNX Runtime's native library records its telemetry session id there on import (one
    # fixed file, reused by every process; not a temporary directory of ours)
    left = [x for x in tmp.iterdir() if x.name != ".ses"]
    assert left == [], f"temporary files left behind: {left}"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_weights(model: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    sd = load_file(str(model / "model.safetensors"))
    edit(sd)
    save_file(sd, str(model / "model.safetensors"), metadata={"format": "pt"})


def _edit_config(model: Path, edit) -> None:
    cfg = json.loads((model / "config.json").read_text())
    edit(cfg)
    (model / "config.json").write_text(json.dumps(cfg))


def _clean_failure(p, out_dir: Path | None, match: str, code: int | None = None) -> None:
    """`assert_clean_failure`, with `match` looked for in the sentence as one line (the console wraps
    a long sentence at its width, with a trailing space before the break)."""
    assert_clean_failure(p, out_dir, "error:", code)
    assert match in " ".join(p.stderr.split()), p.stderr[-2000:]


def _refused(tmp_path: Path, model: Path, mode: str, match: str, *extra: str) -> subprocess.CompletedProcess:
    """Run the main command on `model`; it must fail cleanly, leaving neither --out nor the work directory."""
    out = tmp_path / "o"
    p = run_main(str(model), *FAST, "--out-of-core", mode, "--out", str(out), *extra)
    _clean_failure(p, out, match)
    assert not out.exists()
    assert not list(tmp_path.glob(".o.*")), list(tmp_path.glob(".o.*"))  # .o.tmp-*, .o.fitprune-work
    return p


# ---- the checkpoint against its config (before any weight is allocated) --------------------------

@MODES
def test_nan_in_one_weight(tmp_path, tiny_model_dir, mode):
    """A checkpoint with a NaN in one weight."""
    model = _copy(tiny_model_dir, tmp_path / "m")
    _edit_weights(model, lambda sd: sd[UP].__setitem__((0, 0), float("nan")))
    _refused(tmp_path, model, mode, f"has non-finite values (NaN or inf) in '{UP}'")


def test_infinity_in_a_norm_weight(tmp_path, tiny_model_dir):
    """A checkpoint with an infinite value in a norm weight."""
    model = _copy(tiny_model_dir, tmp_path / "m")
    name = "model.layers.0.input_layernorm.weight"
    _edit_weights(model, lambda sd: sd[name].__setitem__(3, float("inf")))
    _refused(tmp_path, model, "off", f"has non-finite values (NaN or inf) in '{name}'")


@MODES
def test_tensor_missing_from_the_checkpoint(tmp_path, tiny_model_dir, mode):
    """A tensor the config describes is missing from model.safetensors."""
    model = _copy(tiny_model_dir, tmp_path / "m")
    _edit_weights(model, lambda sd: sd.pop(UP))
    _refused(tmp_path, model, mode, f"is incomplete: it has no tensor '{UP}' (1 of the 21 tensors its config "
                                    "describes is missing)")


@MODES
def test_extra_tensor_in_the_checkpoint(tmp_path, tiny_model_dir, mode):
    """The checkpoint holds a tensor its config does not describe (a layer beyond num_hidden_layers)."""
    model = _copy(tiny_model_dir, tmp_path / "m")
    _edit_weights(model, lambda sd: sd.__setitem__("model.layers.9.mlp.up_proj.weight", torch.zeros(64, 48)))
    _refused(tmp_path, model, mode, "holds 1 tensor its config does not describe, the first "
                                    "'model.layers.9.mlp.up_proj.weight'")


@MODES
def test_tensor_of_the_wrong_shape(tmp_path, tiny_model_dir, mode):
    """A tensor whose shape differs from the one the config implies."""
    model = _copy(tiny_model_dir, tmp_path / "m")
    _edit_weights(model, lambda sd: sd.__setitem__(UP, sd[UP][:60].clone()))
    _refused(tmp_path, model, mode, f"does not match its config: '{UP}' has shape [60, 48] where the config "
                                    "implies [64, 48] (1 tensor of the wrong shape)")


@MODES
def test_config_without_size_keys(tmp_path, tiny_model_dir, mode):
    """A config.json without its size keys (transformers would build a default 7B-size model)."""
    model = _copy(tiny_model_dir, tmp_path / "m")

    def strip(cfg):
        for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim"):
            cfg.pop(k, None)

    _edit_config(model, strip)
    _refused(tmp_path, model, mode, "has no 'hidden_size' (and 3 more size keys: intermediate_size, "
                                    "num_hidden_layers, num_attention_heads)")


def test_size_key_of_the_wrong_type(tmp_path, tiny_model_dir):
    """A config.json whose hidden_size is a string."""
    model = _copy(tiny_model_dir, tmp_path / "m")
    _edit_config(model, lambda cfg: cfg.__setitem__("hidden_size", "48"))
    _refused(tmp_path, model, "off", f"'hidden_size' in the config {model}/config.json must be a positive "
                                      "integer, got '48'.")


def test_head_counts_that_do_not_divide(tmp_path, tiny_model_dir):
    """A config.json whose attention heads are not a multiple of its key-value heads."""
    model = _copy(tiny_model_dir, tmp_path / "m")
    _edit_config(model, lambda cfg: cfg.__setitem__("num_key_value_heads", 4))
    _refused(tmp_path, model, "off", "has 6 attention heads, not a multiple of its 4 key-value heads.")


def test_truncated_config(tmp_path, tiny_model_dir):
    """A truncated config.json."""
    model = _copy(tiny_model_dir, tmp_path / "m")
    (model / "config.json").write_text((tiny_model_dir / "config.json").read_text()[:120])
    _refused(tmp_path, model, "off", "config.json is not valid JSON (truncated or not a config file).")


def test_config_that_is_a_directory(tmp_path, tiny_model_dir):
    """A model directory whose config.json is a directory."""
    model = _copy(tiny_model_dir, tmp_path / "m")
    (model / "config.json").unlink()
    (model / "config.json").mkdir()
    _refused(tmp_path, model, "off", "config.json is a directory, not a config file.")


def test_shard_index_naming_a_tensor_its_shard_lacks(tmp_path, tiny_model_dir):
    """A shard index that puts a tensor in a shard which does not hold it."""
    model = _copy(tiny_model_dir, tmp_path / "m")
    from safetensors import safe_open

    with safe_open(str(model / "model.safetensors"), "pt") as f:
        weight_map = {k: "model.safetensors" for k in f.keys()}
    weight_map["model.layers.1.mlp.gate_proj.bias"] = "model.safetensors"
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _refused(tmp_path, model, "on", "its shard index puts 'model.layers.1.mlp.gate_proj.bias' in "
                                    "model.safetensors, which does not hold it.")


# ---- non-finite results ---------------------------------------------------------------------------

@MODES
def test_weights_that_overflow_to_a_nan_perplexity(tmp_path, tiny_model_dir, mode):
    """Finite weights so large that the model's outputs overflow: a NaN perplexity ends the run."""
    model = _copy(tiny_model_dir, tmp_path / "m")

    def blow_up(sd):
        for n in ("up_proj", "gate_proj"):
            sd[f"model.layers.0.mlp.{n}.weight"] *= 1e30

    _edit_weights(model, blow_up)
    _refused(tmp_path, model, mode, "The dense held-out perplexity is nan (not a finite number): the model produces "
                                    "non-finite outputs; nothing was written.")


def test_a_healthy_checkpoint_still_runs_on_both_paths(tmp_path, tiny_model_dir):
    """The checks refuse nothing a healthy checkpoint holds (tied and untied heads, rotary buffers)."""
    for mode in ("off", "on"):
        out = tmp_path / f"o-{mode}"
        p = run_main(str(tiny_model_dir), *FAST, "--out-of-core", mode, "--out", str(out))
        assert p.returncode == 0, p.stderr[-3000:]
        assert (out / "model.safetensors").is_file() or (out / "model.safetensors.index.json").is_file()


def test_the_checks_accept_the_embedded_model_and_a_per_layer_export(tmp_path, smollm2_dir, tiny_model_dir):
    """The embedded SmolLM2 (tied head, stored once) and a fitprune per-layer export pass the checks."""
    from compressor.model.lazy import LazyModel
    from compressor.model.loading import check_checkpoint

    assert check_checkpoint(smollm2_dir).tie_word_embeddings
    LazyModel(smollm2_dir)
    out = tmp_path / "g"
    p = run_main(str(tiny_model_dir), *FAST, "--structure", "global", "--round-to", "8", "--ratio", "0.4",
                "--out", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["model_type"] == "fitprune"
    check_checkpoint(out)
    LazyModel(out)


# ---- the gate ------------------------------------------------------------------------------------

def _report(path: Path, perplexity=20.0, **sections) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    data = {"schema": SCHEMA, "perplexity": {"dense": 18.0, "pruned": perplexity}, **sections}
    (path / "report.json").write_text(json.dumps(data))  # a NaN is written as bare NaN, as older versions did
    return path


_LATENCY = {"measured": {"pruned": {"ttft_s": 0.4, "tpot_s": 0.05, "throughput_tok_s": 30.0, "device": "cpu",
                                    "runtime": "torch"}}}


@pytest.mark.parametrize("case, perplexity, latency, match", [
    ("nan perplexity", float("nan"), None, "FAIL report: perplexity.pruned is not a finite number"),
    ("infinite perplexity", float("inf"), None, "FAIL report: perplexity.pruned is not a finite number"),
    ("null perplexity", None, None, "FAIL accuracy: the baseline has a held-out perplexity but the report has none"),
    ("text TTFT", 20.0, "fast", "FAIL report: latency.measured.pruned.ttft_s is not a finite number"),
    ("NaN TTFT", 20.0, float("nan"), "FAIL report: latency.measured.pruned.ttft_s is not a finite number"),
])
def test_the_gate_fails_nan_reports(tmp_path, case, perplexity, latency, match):
    """The gate fails a report with a NaN, infinite, null or text figure (never PASS against a healthy baseline)."""
    lat = json.loads(json.dumps(_LATENCY))
    if latency is not None:
        lat["measured"]["pruned"]["ttft_s"] = latency
    report = _report(tmp_path / "r", perplexity, latency=lat)
    base = _report(tmp_path / "b", 20.0, latency=_LATENCY)
    p = run_main("gate", str(report), "--baseline", str(base))
    assert p.returncode == 1, (case, p.stdout, p.stderr)
    assert match in p.stdout, (case, p.stdout)
    assert "PASS" not in p.stdout
    _clean_failure(p, None, "gate rule")


def test_the_gate_fails_a_nan_baseline(tmp_path):
    """The gate fails against a baseline whose figures are NaN (nothing can be compared with it)."""
    p = run_main("gate", str(_report(tmp_path / "r")), "--baseline", str(_report(tmp_path / "b", float("nan"))))
    assert p.returncode == 1
    assert "FAIL baseline: perplexity.pruned is not a finite number" in p.stdout
    _clean_failure(p, None, "gate rule")


def test_the_gate_reads_skipped_task_scores(tmp_path):
    """A report whose lm-eval tasks were skipped, against a baseline with scores."""
    report = _report(tmp_path / "r", accuracy={"lm_eval": {"pruned": {"skipped": "out of core"}}})
    base = _report(tmp_path / "b", accuracy={"lm_eval": {"pruned": {"cloze_acc": 0.5}}})
    p = run_main("gate", str(report), "--baseline", str(base))
    assert "FAIL accuracy: the baseline has lm-eval scores but the report has none" in p.stdout
    _clean_failure(p, None, "gate rule", code=1)


def test_gate_report_that_is_a_directory(tmp_path):
    """`compress gate` given a report.json that is a directory."""
    (tmp_path / "r" / "report.json").mkdir(parents=True)
    p = run_main("gate", str(tmp_path / "r"), "--baseline", str(_report(tmp_path / "b")))
    _clean_failure(p, None, "report.json is a directory, not a report file.", code=2)


def test_gate_directory_without_a_report(tmp_path):
    """`compress gate` given a directory that holds no report.json."""
    (tmp_path / "r").mkdir()
    p = run_main("gate", str(tmp_path / "r"), "--baseline", str(_report(tmp_path / "b")))
    _clean_failure(p, None, f"The directory {tmp_path / 'r'} holds no report.json", code=2)


def test_gate_truncated_report(tmp_path):
    """`compress gate` given a truncated report.json."""
    r = _report(tmp_path / "r")
    (r / "report.json").write_text((r / "report.json").read_text()[:30])
    p = run_main("gate", str(r), "--baseline", str(_report(tmp_path / "b")))
    _clean_failure(p, None, "is not valid JSON (truncated or not a report).", code=2)


def test_gate_report_section_of_the_wrong_type(tmp_path):
    """`compress gate` given a report whose perplexity section is a string."""
    r = _report(tmp_path / "r")
    data = json.loads((r / "report.json").read_text())
    data["perplexity"] = "low"
    (r / "report.json").write_text(json.dumps(data))
    p = run_main("gate", str(r), "--baseline", str(_report(tmp_path / "b")))
    _clean_failure(p, None, "is not a valid fitprune report (perplexity:", code=2)


@pytest.mark.parametrize("value", ["nan%", "inf"])
def test_gate_non_finite_threshold(tmp_path, value):
    """`compress gate` with a NaN or infinite allowed regression (NaN would pass everything)."""
    r = _report(tmp_path / "r")
    p = run_main("gate", str(r), "--baseline", str(r), "--max-latency-regression", value)
    _clean_failure(p, None, "--max-latency-regression must be a finite percentage", code=2)


# ---- options of the main command -----------------------------------------------------------------

@pytest.mark.parametrize("args, match", [
    (["--threads", "100000"], "--threads 100000 is more than the"),
    (["--seed", "-5"], "--seed must be between 0 and 4294967295, got -5."),
    (["--seed", "99999999999999999999999"], "--seed must be between 0 and 4294967295"),
    (["--calib", "/nonexistent/calib.txt"], "The calibration file /nonexistent/calib.txt does not exist"),
    (["--calib", "/"], "The calibration file / is a directory; give a .txt or .jsonl file."),
    (["--calib", "/dev/null"], "The calibration file /dev/null is not a regular file (a device, pipe or socket)"),
    (["--profile", "/"], "The profile path / is a directory; give a profile name or a YAML file."),
    (["--device", "cuda:7"], "--device cuda:7"),
], ids=["threads-huge", "seed-negative", "seed-huge", "calib-missing", "calib-directory", "calib-device",
        "profile-directory",
        "device-cuda7"])
def test_nonsense_option_values(tmp_path, tiny_model_dir, args, match):
    """Option values that make no sense (huge thread counts, negative seeds, a directory as a file, a GPU not here)."""
    if "cuda:7" in args and torch.cuda.is_available() and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    out = tmp_path / "o"
    p = run_main(str(tiny_model_dir), *FAST, *args, "--out", str(out))
    _clean_failure(p, out, match)


def test_a_calibration_path_that_is_a_pipe_is_named_as_such(tmp_path):
    """A FIFO exists but is no file to calibrate on: the message says what it is (reading it would block)."""
    import os

    from compressor.config import RunConfig
    from compressor.data import _read_file
    from compressor.errors import UserError

    fifo = tmp_path / "calib.txt"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match="is not a regular file"):
        _read_file(fifo)
    with pytest.raises(ValueError, match="is not a regular file"):
        RunConfig._calib(str(fifo))


def test_round_to_wider_than_the_mlp(tmp_path, tiny_model_dir):
    """--round-to wider than the model's MLP (no MLP channel could be removed)."""
    _refused(tmp_path, tiny_model_dir, "off", "--round-to 4096 is wider than the model's MLP (64 channels)",
             "--round-to", "4096")


def test_model_path_that_is_a_file(tmp_path):
    """A model path that is a file, not a directory or a .gguf file."""
    f = tmp_path / "model"
    f.write_text("x")
    p = run_main(str(f), *FAST, "--out", str(tmp_path / "o"))
    _clean_failure(p, tmp_path / "o", f"The model path {f} is a file;")


def test_default_out_in_an_unwritable_directory(tmp_path, tiny_model_dir):
    """No --out, run from a read-only directory: refused before the work, not at the export."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        p = run_main(str(tiny_model_dir), *FAST, cwd=ro)
        _clean_failure(p, None, "cannot be written")
        assert "perplexity" not in p.stderr  # refused before the work
    finally:
        subprocess.run(["umount", str(ro)], check=False)


# ---- the sub-commands ----------------------------------------------------------------------------

def test_plan_json_that_is_a_directory(tmp_path, tiny_model_dir):
    """`compress plan --json` naming a directory (refused before the plan, not after)."""
    p = run_main("plan", str(tiny_model_dir), "--no-fit", "--json", str(tmp_path))
    _clean_failure(p, None, f"--json {tmp_path} is a directory; give a file name.")
    assert "ratio" not in p.stdout


def test_plan_json_under_a_file(tmp_path, tiny_model_dir):
    """`compress plan --json` naming a path under a file."""
    (tmp_path / "f").write_text("x")
    p = run_main("plan", str(tiny_model_dir), "--no-fit", "--json", str(tmp_path / "f" / "plan.json"))
    _clean_failure(p, None, f"lies under the file {tmp_path / 'f'}.")


@pytest.mark.parametrize("args, match", [
    (["--runs", "100000"], "--runs must be between 1 and 1000, got 100000."),
    (["--round-to", "100000"], "--round-to 100000 is wider than the model's MLP (64 channels)"),
], ids=["runs-huge", "round-to-wider-than-mlp"])
def test_plan_nonsense_option_values(tiny_model_dir, args, match):
    """`compress plan` with option values that make no sense."""
    p = run_main("plan", str(tiny_model_dir), "--no-fit", *args)
    _clean_failure(p, None, match)


def test_plan_truncated_config(tmp_path, tiny_model_dir):
    """`compress plan` on a model whose config.json is truncated."""
    model = _copy(tiny_model_dir, tmp_path / "m")
    (model / "config.json").write_text("{\"model_type\": \"lla")
    p = run_main("plan", str(model), "--no-fit")
    _clean_failure(p, None, "is not valid JSON (truncated or not a config file).")


def test_export_onnx_of_a_file(tmp_path):
    """`compress export-onnx` given a file where the model directory belongs."""
    f = tmp_path / "model"
    f.write_text("x")
    p = run_main("export-onnx", str(f), "--out", str(tmp_path / "x"))
    _clean_failure(p, tmp_path / "x", "is a file; export-onnx needs an exported model directory.")


def test_export_onnx_out_under_a_file(tmp_path, tiny_model_dir):
    """`compress export-onnx --out` under a file (refused before the load)."""
    (tmp_path / "f").write_text("x")
    p = run_main("export-onnx", str(tiny_model_dir), "--out", str(tmp_path / "f" / "x"))
    _clean_failure(p, None, f"lies under the file {tmp_path / 'f'}")


def test_export_onnx_threshold_above_the_onnx_limit(tmp_path, tiny_model_dir):
    """`compress export-onnx` with an external-data threshold above ONNX's 2 GiB file limit."""
    p = run_main("export-onnx", str(tiny_model_dir), "--out", str(tmp_path / "x"),
                "--external-data-threshold-mb", "99999999")
    _clean_failure(p, tmp_path / "x", "--external-data-threshold-mb must be between 0 and 2047")


def test_export_onnx_of_a_nan_checkpoint(tmp_path, tiny_model_dir):
    """`compress export-onnx` of a checkpoint with a NaN weight."""
    model = _copy(tiny_model_dir, tmp_path / "m")
    _edit_weights(model, lambda sd: sd[UP].__setitem__((0, 0), float("nan")))
    p = run_main("export-onnx", str(model), "--out", str(tmp_path / "x"))
    _clean_failure(p, tmp_path / "x", f"has non-finite values (NaN or inf) in '{UP}'")


def test_container_of_a_file(tmp_path):
    """`compress container` given a file where the export directory belongs."""
    f = tmp_path / "export"
    f.write_text("x")
    p = run_main("container", str(f), "--out", str(tmp_path / "c"))
    _clean_failure(p, tmp_path / "c", "is a file; container needs an export directory")


def test_container_out_under_a_file(tmp_path, tiny_model_dir):
    """`compress container --out` under a file."""
    (tmp_path / "f").write_text("x")
    p = run_main("container", str(tiny_model_dir), "--out", str(tmp_path / "f" / "c"))
    _clean_failure(p, None, f"lies under the file {tmp_path / 'f'}")


@pytest.mark.parametrize("command", ["container", "export-onnx"])
def test_sub_command_on_truncated_weights(tmp_path, tiny_model_dir, command):
    """`compress container` / `export-onnx` on an export whose model.safetensors is truncated."""
    model = _copy(tiny_model_dir, tmp_path / "m")
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 2])
    p = run_main(command, str(model), "--out", str(tmp_path / "c"))
    _clean_failure(p, tmp_path / "c", "model.safetensors is corrupt or truncated")


def test_profiles_validate_a_directory(tmp_path):
    """`compress profiles validate` given a directory."""
    p = run_main("profiles", "validate", str(tmp_path))
    _clean_failure(p, None, f"The profile path {tmp_path} is a directory")


def test_no_probe_files_are_left_behind(tmp_path, tiny_model_dir):
    """The writability probes of --out and --json leave nothing in the directory they probe."""
    p = run_main("plan", str(tiny_model_dir), "--no-fit", "--json", str(tmp_path / "plan.json"))
    assert p.returncode == 0, p.stderr[-2000:]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["plan.json", "tmpdir"]
    assert json.loads((tmp_path / "plan.json").read_text())["frontier"]
    assert not [x for x in os.listdir(tmp_path) if x.startswith(".")]


def test_plan_json_writes_through_links_and_devices_and_fails_loudly(tmp_path, tiny_model_dir, capsys):
    """`--json` replaces only a regular file (atomically); a symlink is written through (the link
    stays), and a device that cannot take the bytes (/dev/full) is one sentence and a non-zero exit."""
    from compressor.cli import main

    args = ["plan", str(tiny_model_dir), "--profile", "cpu-2core", "--no-fit", "--width-only"]
    target, link = tmp_path / "target.json", tmp_path / "link.json"
    target.write_text("{}")
    link.symlink_to(target)
    assert main([*args, "--json", str(link)]) == 0
    assert link.is_symlink() and json.loads(target.read_text())["frontier"]
    capsys.readouterr()
    rc = main([*args, "--json", "/dev/full"])
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 28 and "could not be written" in err and "Traceback" not in err
    assert Path("/dev/full").is_char_device()  # written to, never replaced by a file
