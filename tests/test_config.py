"""The run configuration: every option is validated once, before any work, with one sentence."""

from __future__ import annotations

import os

import pytest

from compressor.config import RunConfig
from compressor.errors import UserError
from tests.conftest import assert_clean_failure, run_main


@pytest.mark.parametrize("options, match", [
    ({"attn_unit": "heads"}, "Unknown --attn-unit 'heads' (use auto, kv, query)."),
    ({"structure": "random"}, "Unknown --structure 'random'"),
    ({"metric": "astrology"}, "Unknown importance metric 'astrology' (known: auto, "),
    ({"compensation": "prayer"}, "Unknown compensation 'prayer' (known: auto, "),
    ({"export_dtype": "int3"}, "Unknown --export-dtype 'int3'"),
    ({"lm_eval_backend": "gpt"}, "Unknown --lm-eval-backend 'gpt'"),
    ({"round_to": 0}, "--round-to must be at least 1, got 0."),
    ({"batch_size": 0}, "--batch-size must be at least 1, got 0."),
    ({"threads": -2}, "--threads must be at least 1, got -2."),
    ({"nsamples": 0}, "--nsamples must be at least 1, got 0."),
    ({"trials": 0}, "--trials must be at least 1, got 0."),
    ({"seqlen": 1}, "--seqlen must be at least 2, got 1."),
    ({"ratio": 1.0}, "between 0 and 1"),
    ({"device": "cuda:7"}, "--device cuda:7 is not available on this machine"),
    ({"device": "tpu"}, "Unknown --device 'tpu'"),
    ({"out": ""}, "--out must name a directory"),
])
def test_bad_options_are_one_sentence(options, match):
    if options.get("device", "").startswith("cuda"):
        import torch

        if torch.cuda.is_available() and torch.cuda.device_count() > 7:
            pytest.skip("this machine has 8 GPUs")
    with pytest.raises(UserError) as err:
        RunConfig.make(**options)
    assert match in str(err.value)
    assert "\n" not in str(err.value)


def test_an_output_path_under_a_file_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        RunConfig.make(out=f)
    with pytest.raises(UserError, match="lies under the file"):
        RunConfig.make(out=f / "sub" / "out")


def test_an_output_directory_on_a_read_only_disk_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.system(f"mount -t tmpfs -o ro,size=1m tmpfs {ro} 2>/dev/null") != 0:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        with pytest.raises(UserError, match="cannot be written"):
            RunConfig.make(out=ro / "out")
    finally:
        os.system(f"umount {ro}")


def test_seqlen_longer_than_the_model_is_refused_before_calibration(tmp_path, tiny_model_dir):
    out = tmp_path / "o"
    p = run_main(str(tiny_model_dir), "--seqlen", "100000", "--nsamples", "1", "--ratio", "0.2", "--no-checks",
                "--out", str(out))
    assert_clean_failure(p, out, "--seqlen 100000 is longer than the model's")


def test_a_bogus_attn_unit_fails_at_the_command_line(tmp_path, tiny_model_dir):
    out = tmp_path / "o"
    p = run_main(str(tiny_model_dir), "--attn-unit", "bogus", "--ratio", "0.2", "--out", str(out))
    assert_clean_failure(p, out, "'bogus' is not one of 'auto', 'kv', 'query'")


def test_defaults_are_valid():
    cfg = RunConfig.make()
    assert cfg.metric == "auto" and cfg.compute.batch_size == 8


def test_an_empty_out_fails_at_the_command_line(tmp_path, tiny_model_dir):
    p = run_main(str(tiny_model_dir), "--ratio", "0.2", "--out", "")
    assert_clean_failure(p, None, "--out must name a directory")


def test_device_auto_is_cuda_when_present():
    import torch

    from compressor.config import RunConfig

    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert RunConfig().device == want and RunConfig(device="auto").device == want
    assert RunConfig().profile == "auto"


@pytest.mark.parametrize("options, levers, quantize_only", [
    ({}, True, False),  # no option fixes the plan: every lever
    ({"ratio": 0.2}, False, False),  # --ratio R is width pruning of R
    ({"quantize": "w8a8-int8"}, False, True),  # --quantize F alone: quantization only
    ({"structure": "depth"}, False, False),  # a method option: the width-only plan's ratio
    ({"search": True}, False, False),
    ({"levers": False}, False, False),  # --width-only
    ({"levers": False, "quantize": "w8a8-int8"}, False, False),  # width plan, then the format
    ({"levers": True, "metric": "flap"}, True, False),
])
def test_the_plan_is_every_lever_unless_an_option_fixes_it(options, levers, quantize_only):
    cfg = RunConfig.make(**options)
    assert cfg.plans_levers is levers and cfg.quantize_only is quantize_only

