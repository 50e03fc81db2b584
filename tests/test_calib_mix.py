"""`--calib` mixing several sources joined by `+`: each source gives an equal share of the N
calibration windows (interleaved), builtin's share comes from its calibration region only, and a
bad part is refused in one sentence with nothing written.

The window tests use the real SmolLM2 tokenizer with a local text whose tokens never occur in the
builtin text's calibration windows, so where each window came from is checked, not assumed."""

from __future__ import annotations

import json

import pytest
import torch

from compressor.data import calib_parts, calib_windows, load_source, self_generated_ids, shares
from compressor.errors import UserError
from tests.conftest import assert_clean_failure, run_cli, tiny_model

FAST = ["--ratio", "0.2", "--no-checks", "--nsamples", "4", "--seqlen", "64"]
WORDS = "zebra quokka narwhal axolotl " * 400  # ~1600 words, of tokens the pydoc topics hardly use


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture
def animals(tmp_path):
    path = tmp_path / "animals.txt"
    path.write_text(WORDS)
    return path


def _inside(window: torch.Tensor, stream: torch.Tensor) -> bool:
    """Whether `window` occurs verbatim in `stream`."""
    return bool((stream.unfold(0, window.numel(), 1) == window).all(1).any())


def test_equal_shares_interleaved_builtin_from_its_calibration_region(tokenizer, animals):
    """builtin+FILE, 6 windows: 3 from each, alternating; builtin's from its calibration region."""
    windows = calib_windows(f"builtin+{animals}", tokenizer, None, 6, 32, seed=0)
    assert windows.shape == (6, 32)
    builtin = load_source("builtin", tokenizer)
    region = builtin.region("calibration")
    file_ids = load_source(str(animals), tokenizer).ids
    for i, w in enumerate(windows):
        if i % 2 == 0:
            assert _inside(w, region), i
        else:
            assert _inside(w, file_ids) and not _inside(w, builtin.ids), i


def test_three_sources_uneven_split(tokenizer, animals, tmp_path):
    """7 windows over 3 sources: 3, 2, 2 (the first N mod k sources one more)."""
    other = tmp_path / "other.txt"
    other.write_text("lorem ipsum dolor sit amet " * 300)
    assert shares(7, 3) == [3, 2, 2]
    windows = calib_windows(f"builtin+{animals}+{other}", tokenizer, None, 7, 16, seed=1)
    ids = [load_source("builtin", tokenizer).region("calibration"),
           load_source(str(animals), tokenizer).ids, load_source(str(other), tokenizer).ids]
    source = [next(k for k, s in enumerate(ids) if _inside(w, s)) for w in windows]
    assert source == [0, 1, 2, 0, 1, 2, 0]


def test_single_source_unchanged(tokenizer):
    """One source is what it always was: N seeded windows of its calibration stream."""
    from compressor.data import sample_windows

    region = load_source("builtin", tokenizer).region("calibration")
    assert torch.equal(calib_windows("builtin", tokenizer, None, 5, 32, seed=3), sample_windows(region, 5, 32, 3))


@pytest.mark.slow
def test_self_share_is_consecutive_generated_text(tokenizer):
    """builtin+self: the self share is the model's own seeded text cut into consecutive windows.
    (One thread: 256 sampling steps of a tiny model are all synchronisation on a busy host.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _check_self_share(tokenizer)
    finally:
        torch.set_num_threads(threads)


def _check_self_share(tokenizer):
    # positions for the generator's 256-token chunks
    model = tiny_model("llama-gqa", vocab_size=len(tokenizer), layers=2, max_position_embeddings=1024).eval()
    windows = calib_windows("builtin+self", tokenizer, model, 4, 32, seed=5)
    generated = self_generated_ids(model, tokenizer, 2 * 32, seed=5)
    assert torch.equal(windows[1], generated[:32]) and torch.equal(windows[3], generated[32:64])
    region = load_source("builtin", tokenizer).region("calibration")
    assert _inside(windows[0], region) and _inside(windows[2], region)


def test_file_named_with_a_plus_is_one_source(tmp_path):
    path = tmp_path / "c++notes.txt"
    path.write_text("x")
    assert calib_parts(str(path)) == [str(path)]
    assert calib_parts("builtin+self") == ["builtin", "self"]


@pytest.mark.parametrize("spec, n, match", [
    ("builtin+self+", 4, "has an empty part"),
    ("self+self", 4, "names self twice"),
    ("builtin+{file}", 1, "mixes 2 sources but --nsamples is 1"),
], ids=["empty-part", "repeated", "fewer-windows-than-sources"])
def test_bad_mix_refused_by_the_data_stage(tokenizer, animals, spec, n, match):
    with pytest.raises(UserError, match=match):
        calib_windows(spec.format(file=animals), tokenizer, None, n, 32, seed=0)


def test_short_part_names_itself(tokenizer, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    with pytest.raises(UserError, match=r"The calibration \('.*short.txt'\) text has \d+ tokens"):
        calib_windows(f"builtin+{short}", tokenizer, None, 4, 32, seed=0)


# ---- the CLI ---------------------------------------------------------------------------------------

def test_cli_runs_with_a_mix(tmp_path, tiny_model_dir, animals):
    """The main command calibrates on builtin+FILE and says so in its report."""
    out = tmp_path / "o"
    p = run_cli(str(tiny_model_dir), *FAST, "--calib", f"builtin+{animals}", "--out", str(out))
    assert p.returncode in (0, 5), p.stderr[-3000:]  # 5: the profile's runtime is missing (no verdict)
    assert f"builtin+{animals}" in json.dumps(json.loads((out / "report.json").read_text()))


@pytest.mark.parametrize("part, match", [
    ("builtin+", "--calib 'builtin+' has an empty part; join sources with '+'"),
    ("builtin+builtin", "--calib 'builtin+builtin' names builtin twice"),
    ("builtin+/nonexistent/calib.txt", "The calibration file /nonexistent/calib.txt does not exist"),
    ("self+/", "The calibration file / is a directory"),
    ("builtin+{short}", "text has"),
], ids=["empty", "repeated", "missing-file", "directory", "too-short"])
def test_cli_refuses_a_bad_part(tmp_path, tiny_model_dir, part, match):
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    out = tmp_path / "o"
    p = run_cli(str(tiny_model_dir), *FAST, "--calib", part.format(short=short), "--out", str(out))
    assert_clean_failure(p, out, match)
