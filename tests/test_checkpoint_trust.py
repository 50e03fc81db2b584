"""A model folder is trusted for nothing: a shard index that names files outside its folder or is
not a mapping, a safetensors header that is not a table of tensors or whose data ranges overlap or
leave holes, and integer tensors where the config implies weights are all refused in one sentence,
in memory and out of core, before any weight is read. Symlinked shards (the Hugging Face cache
layout) keep working."""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from compressor.cli import main
from compressor.errors import UserError
from compressor.model.safetensors_files import header, weight_files

ARGS = ["--profile", "cpu-2core", "--ratio", "0.3", "--nsamples", "4", "--seqlen", "32", "--round-to", "8",
        "--domain-windows", "0", "--no-checks", "--threads", "1"]


def _raw(path: Path, table: dict, data: bytes) -> Path:
    body = json.dumps(table).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


def _sharded(src: Path, dst: Path, shard: str = "model-00001-of-00001.safetensors") -> Path:
    """`src` (a one-file checkpoint) as a sharded one whose index names `shard`."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors"))
    keys = list(load_file(str(src / "model.safetensors")))
    index = {"metadata": {}, "weight_map": dict.fromkeys(keys, shard)}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


@pytest.mark.parametrize("name", ["/etc/hostname", "../outside/model.safetensors", "sub/../../x.safetensors",
                                  "C:\\\\x.safetensors", "notes.txt"])
def test_an_index_naming_a_file_outside_the_folder_is_refused(tmp_path, name):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": name}}))
    with pytest.raises(UserError, match="outside the checkpoint's folder"):
        weight_files(tmp_path / "m")


@pytest.mark.parametrize("weight_map", [[], "x", {"a": 3}, {}, None])
def test_an_index_that_is_not_a_mapping_of_names_is_refused(tmp_path, weight_map):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(UserError, match="shard index .* is not valid"):
        weight_files(tmp_path)


def test_symlinked_shards_as_in_the_hub_cache_are_read(tmp_path):
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    save_file({"w": torch.zeros(2, 3)}, str(blobs / "abc"))
    snap = tmp_path / "snapshots" / "rev"
    snap.mkdir(parents=True)
    (snap / "model-00001-of-00001.safetensors").symlink_to("../../blobs/abc")
    (snap / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "model-00001-of-00001.safetensors"}}))
    assert weight_files(snap) == {"w": "model-00001-of-00001.safetensors"}
    assert header(snap / "model-00001-of-00001.safetensors")[0]["w"]["shape"] == [2, 3]


@pytest.mark.parametrize("table, match", [
    ([1, 2], "not a table of tensors"),
    ({"a": 5}, "is not an entry"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, "overlaps another"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, "leaves a hole"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, "bytes of data where"),
    ({"a": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}}, "unknown dtype"),
    ({"a": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}, "no valid shape"),
])
def test_a_header_that_lies_about_its_tensors_is_refused(tmp_path, table, match):
    f = _raw(tmp_path / "model.safetensors", table, bytes(16))
    with pytest.raises(UserError, match=match):
        header(f)


@pytest.mark.parametrize("mode", ["off", "on"], ids=["in-memory", "out-of-core"])
def test_cli_refuses_an_escaping_index_and_integer_weights(tmp_path, tiny_model_dir, mode, capsys):
    """Through the main command, in memory and out of core: one sentence, non-zero exit, nothing
    written (the file the index names is never exported), and a real hub-style checkpoint works."""
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(tiny_model_dir / "model.safetensors", outside / "model.safetensors")
    escaping = _sharded(tiny_model_dir, tmp_path / "esc", "../outside/model.safetensors")
    ints = tmp_path / "ints"
    shutil.copytree(tiny_model_dir, ints)
    sd = load_file(str(tiny_model_dir / "model.safetensors"))
    sd["model.layers.0.mlp.up_proj.weight"] = sd["model.layers.0.mlp.up_proj.weight"].to(torch.int32)
    save_file(sd, str(ints / "model.safetensors"))
    for model, match in ((escaping, "outside the checkpoint's folder"), (ints, "is stored as I32")):
        out = tmp_path / f"o-{model.name}"
        assert main([str(model), *ARGS, "--out-of-core", mode, "--out", str(out)]) != 0
        err = " ".join(capsys.readouterr().err.split())
        assert match in err and "Traceback" not in err, err[-1500:]
        assert not out.exists() and not list(tmp_path.glob(f".o-{model.name}*"))


@pytest.mark.parametrize("mode", ["off", "on"], ids=["in-memory", "out-of-core"])
@pytest.mark.parametrize("key, value, match", [("num_hidden_layers", 1_000_000, "beyond what any model"),
                                               ("num_hidden_layers", 3, "is incomplete: it has no tensor"),
                                               ("hidden_size", 10**9, "beyond what any model")])
def test_a_config_that_asks_too_much_is_refused_before_building(tmp_path, tiny_model_dir, mode, key, value, match,
                                                                capsys):
    """A config claiming a million layers (or a width beyond any model) is refused from the config
    before a skeleton is built; one claiming more layers than the checkpoint holds, from the headers."""
    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg[key] = value
    (model / "config.json").write_text(json.dumps(cfg))
    assert main([str(model), *ARGS, "--out-of-core", mode, "--out", str(tmp_path / "o")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert match in err and "Traceback" not in err, err[-1500:]
    assert not (tmp_path / "o").exists()


_PER_LAYER = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
              "num_hidden_layers": 3, "intermediate_size": 128, "vocab_size": 100}


@pytest.mark.parametrize("q, kv, inter, match", [
    ([4, 0, 2], [2, 0, 1], [128, 0, 64], None),  # removed attention and MLP blocks: 0 is a width
    ([4, 0, 2], [2, 1, 1], [128, 64, 64], "both 0 where attention was removed"),
    ([4, 3, 2], [2, 2, 1], [128, 64, 64], "a multiple of the second"),
    ([4, -1, 2], [2, 1, 1], [128, 64, 64], "one non-negative integer per layer"),
    ([4, 2], [2, 1], [128, 64], "one non-negative integer per layer (3)"),
])
def test_per_layer_widths_in_a_config(q, kv, inter, match):
    """A per-layer config's widths: 0 marks a removed block (export-onnx and loading take it), a
    negative width, a wrong count or heads that are no multiple of their key-value heads are refused."""
    from compressor.model.validate import check_config

    cfg = {**_PER_LAYER, "layer_num_attention_heads": q, "layer_num_key_value_heads": kv,
           "layer_intermediate_size": inter}
    if match is None:
        check_config(cfg, "c.json")
    else:
        with pytest.raises(UserError, match=re.escape(match)):
            check_config(cfg, "c.json")
