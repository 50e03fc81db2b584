"""A random-weight Llama checkpoint of a real model's shape, written shard by shard.

The result is an ordinary Hugging Face directory (config.json, generation_config.json, sharded
safetensors with model.safetensors.index.json, and the embedded SmolLM2 tokenizer), so anything
that loads Llama checkpoints loads it. No more than one shard's tensors are in memory at any time:
the shard plan is computed from the shapes first (so every file has its final -of-N name), then
each tensor is generated, added to the current shard and the shard is flushed when full. The
directory is written under a temporary name and renamed into place when complete, so a directory
with the final name is always whole.

    python benchmarks/random_checkpoint.py /tmp/llama8b                        # Llama-3.1-8B's shape
    python benchmarks/random_checkpoint.py /tmp/tiny --shape tiny --check      # ... and load + forward it
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
GIB = 1024 ** 3
FORMAT = "fitprune-random-llama/1"  # marker in the index metadata; bump when the written content changes

# decoder shapes; max_position_embeddings 8192 and no rope scaling for all of them
SHAPES: dict[str, dict] = {
    # vocab: the embedded tokenizer's, so that its token ids are all in range
    "tiny": dict(layers=2, hidden=256, heads=4, kv_heads=2, intermediate=512, vocab=49152),
    "llama-3.2-1b": dict(layers=16, hidden=2048, heads=32, kv_heads=8, intermediate=8192, vocab=128256,
                         tie_word_embeddings=True),
    "llama-3.2-3b": dict(layers=28, hidden=3072, heads=24, kv_heads=8, intermediate=8192, vocab=128256,
                         tie_word_embeddings=True),
    "llama-3.1-8b": dict(layers=32, hidden=4096, heads=32, kv_heads=8, intermediate=14336, vocab=128256),
    "llama-3.1-70b": dict(layers=80, hidden=8192, heads=64, kv_heads=8, intermediate=28672, vocab=128256),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


@dataclass(frozen=True)
class Written:
    path: Path
    total_bytes: int  # tensor bytes (= metadata.total_size)
    shards: int
    seconds: float  # wall time of write_checkpoint
    generate_s: float  # of which generating tensors
    save_s: float  # of which serialising + writing (and fsync)
    reused: bool = False

    @property
    def gb_per_s(self) -> float:
        return self.total_bytes / 1e9 / self.seconds if self.seconds else 0.0


def tensor_plan(layers: int, hidden: int, heads: int, kv_heads: int, intermediate: int, vocab: int,
                tie_word_embeddings: bool = False) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of LlamaForCausalLM, in the order they are written."""
    head_dim = hidden // heads
    plan: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        plan += [
            (p + "self_attn.q_proj.weight", (heads * head_dim, hidden)),
            (p + "self_attn.k_proj.weight", (kv_heads * head_dim, hidden)),
            (p + "self_attn.v_proj.weight", (kv_heads * head_dim, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, heads * head_dim)),
            (p + "mlp.gate_proj.weight", (intermediate, hidden)),
            (p + "mlp.up_proj.weight", (intermediate, hidden)),
            (p + "mlp.down_proj.weight", (hidden, intermediate)),
            (p + "input_layernorm.weight", (hidden,)),
            (p + "post_attention_layernorm.weight", (hidden,)),
        ]
    plan.append(("model.norm.weight", (hidden,)))
    if not tie_word_embeddings:
        plan.append(("lm_head.weight", (vocab, hidden)))
    return plan


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def shard_plan(plan: list[tuple[str, tuple[int, ...]]], itemsize: int, shard_bytes: int) -> list[list[int]]:
    """Indices into `plan` per shard: a new shard starts when the next tensor would overflow the
    current one (a tensor larger than shard_bytes gets a shard of its own)."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, shape) in enumerate(plan):
        b = _numel(shape) * itemsize
        if shards[-1] and size + b > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += b
    return shards


def checkpoint_bytes(layers: int = 32, hidden: int = 4096, heads: int = 32, kv_heads: int = 8,
                     intermediate: int = 14336, vocab: int = 128256, dtype: torch.dtype = torch.bfloat16,
                     tie_word_embeddings: bool = False) -> int:
    """Tensor bytes of the checkpoint write_checkpoint would write (files are a few KiB more)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    plan = tensor_plan(layers, hidden, heads, kv_heads, intermediate, vocab, tie_word_embeddings)
    return sum(_numel(s) for _, s in plan) * itemsize


def default_tokenizer_dir() -> Path:
    """The embedded SmolLM2 model's directory (dequantized into the user's cache on first use)."""
    sys.path.insert(0, str(ROOT))
    try:
        from compressor.model.loading import embedded_model_dir

        return Path(embedded_model_dir())
    except Exception:  # the package mid-rewrite, or no demo extra: the cache entry it would return
        root = os.environ.get("FITPRUNE_CACHE") or os.path.join(
            os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fitprune")
        path = Path(root) / "models" / "SmolLM2-135M-Instruct"
        if not (path / "tokenizer.json").is_file():
            raise
        return path
    finally:
        sys.path.remove(str(ROOT))


def _special_ids(tok_dir: Path) -> dict:
    """bos/eos/pad ids of the tokenizer's own model (so config and tokenizer agree)."""
    ids = {"bos_token_id": 1, "eos_token_id": 2}
    cfg = tok_dir / "config.json"
    if cfg.is_file():
        src = json.loads(cfg.read_text())
        ids.update({k: src[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if src.get(k) is not None})
    return ids


def _config(layers, hidden, heads, kv_heads, intermediate, vocab, dtype_name, tie, rope_theta, rms_norm_eps,
            max_position_embeddings, std, ids) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        **ids,
        "head_dim": hidden // heads,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": std,
        "intermediate_size": intermediate,
        "max_position_embeddings": max_position_embeddings,
        "mlp_bias": False,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": rms_norm_eps,
        "rope_theta": rope_theta,  # older readers (vLLM, transformers 4)
        "rope_parameters": {"rope_theta": rope_theta, "rope_type": "default"},  # transformers 5
        "tie_word_embeddings": tie,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
        "use_cache": True,
        "vocab_size": vocab,
    }


def _drop_cache(path: Path) -> None:
    """Evict a file's pages from the page cache (best effort)."""
    if not hasattr(os, "posix_fadvise"):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def drop_page_cache(ckpt: Path) -> None:
    """Evict a checkpoint's shards from the page cache, so the next reader reads them from disk (and,
    under a cgroup v1 memory limit, is charged for them as a cold reader would be)."""
    for f in Path(ckpt).glob("*.safetensors"):
        _drop_cache(f)


def _params(**kw) -> dict:
    return {"format": FORMAT, **kw}


def existing(out_dir: Path, params: dict) -> int | None:
    """total_size of a complete checkpoint written with `params` in out_dir, else None."""
    index = Path(out_dir) / "model.safetensors.index.json"
    try:
        meta = json.loads(index.read_text())
    except (OSError, ValueError):
        return None
    if meta.get("metadata", {}).get("fitprune_random") != params:
        return None
    files = set(meta.get("weight_map", {}).values())
    if not files or not all((Path(out_dir) / f).is_file() for f in files):
        return None
    if not (Path(out_dir) / "config.json").is_file():
        return None
    return int(meta["metadata"]["total_size"])


def write_checkpoint(out_dir: str | Path, layers: int = 32, hidden: int = 4096, heads: int = 32, kv_heads: int = 8,
                     intermediate: int = 14336, vocab: int = 128256, dtype: torch.dtype = torch.bfloat16,
                     seed: int = 0, shard_bytes: int = 2 * GIB, tie_word_embeddings: bool = False,
                     std: float = 0.02, rope_theta: float = 500000.0, rms_norm_eps: float = 1e-5,
                     max_position_embeddings: int = 8192, tokenizer_dir: str | Path | None = None,
                     fsync: bool = True, reuse: bool = True, say=None) -> Written:
    """Write a random-weight LlamaForCausalLM of the given shape (default: Llama-3.1-8B's) to out_dir.

    Projections and embeddings ~ N(0, std), norms = 1. Each tensor's values depend only on `seed`
    and its name, so a shallower checkpoint's layers equal the deeper one's first layers. With
    `reuse`, a complete checkpoint of the same parameters already in out_dir is kept as it is.
    With `fsync`, each shard is on disk before the next is generated (the timing is the disk's,
    not the page cache's)."""
    out_dir = Path(out_dir)
    dtype_name = str(dtype).replace("torch.", "")
    params = _params(layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, intermediate=intermediate,
                     vocab=vocab, dtype=dtype_name, seed=seed, shard_bytes=shard_bytes, tie=tie_word_embeddings,
                     std=std, rope_theta=rope_theta, rms_norm_eps=rms_norm_eps,
                     max_position_embeddings=max_position_embeddings)
    if hidden % heads or heads % kv_heads:
        raise ValueError(f"hidden {hidden} must divide by heads {heads}, and heads by kv_heads {kv_heads}")
    if reuse and (size := existing(out_dir, params)) is not None:
        n = len(set(json.loads((out_dir / "model.safetensors.index.json").read_text())["weight_map"].values()))
        return Written(out_dir, size, n, 0.0, 0.0, 0.0, reused=True)

    from safetensors.torch import save_file

    t0 = time.perf_counter()
    itemsize = torch.empty((), dtype=dtype).element_size()
    plan = tensor_plan(layers, hidden, heads, kv_heads, intermediate, vocab, tie_word_embeddings)
    shards = shard_plan(plan, itemsize, shard_bytes)
    total = sum(_numel(s) for _, s in plan) * itemsize
    free = shutil.disk_usage(out_dir.parent if out_dir.parent.exists() else Path.cwd()).free
    if free < total + 256 * 1024 ** 2:
        raise OSError(f"{total / 1e9:.1f} GB needed for {out_dir}, {free / 1e9:.1f} GB free")
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else default_tokenizer_dir()

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    gen_s = save_s = 0.0
    try:
        weight_map: dict[str, str] = {}
        n = len(shards)
        for k, idx in enumerate(shards, 1):
            fname = f"model-{k:05d}-of-{n:05d}.safetensors"
            t = time.perf_counter()
            tensors: dict[str, torch.Tensor] = {}
            for i in idx:
                name, shape = plan[i]
                if len(shape) == 1:  # RMSNorm weights
                    tensors[name] = torch.ones(shape, dtype=dtype)
                else:
                    g = torch.Generator().manual_seed((seed << 32) | zlib.crc32(name.encode()))
                    tensors[name] = torch.empty(shape, dtype=dtype).normal_(0.0, std, generator=g)
                weight_map[name] = fname
            gen_s += time.perf_counter() - t
            t = time.perf_counter()
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            del tensors
            os.chmod(tmp / fname, 0o644)  # safetensors creates it 0600
            if fsync:
                fd = os.open(tmp / fname, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                _drop_cache(tmp / fname)  # written pages are clean now; do not let them crowd out the reader
            save_s += time.perf_counter() - t
            if say:
                say(f"  {fname}: {len(idx)} tensors, {time.perf_counter() - t0:.0f} s")
        index = {"metadata": {"total_size": total, "fitprune_random": params}, "weight_map": weight_map}
        ids = _special_ids(tok_dir)
        cfg = _config(layers, hidden, heads, kv_heads, intermediate, vocab, dtype_name, tie_word_embeddings,
                      rope_theta, rms_norm_eps, max_position_embeddings, std, ids)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        gen_cfg = {"_from_model_config": True, **ids, "do_sample": False}
        (tmp / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
        for f in TOKENIZER_FILES:
            if (tok_dir / f).is_file():
                shutil.copy2(tok_dir / f, tmp / f)
        if not (tmp / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in {tok_dir}")
        # the index last: existing() treats a directory with a matching index as complete
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Written(out_dir, total, len(shards), time.perf_counter() - t0, gen_s, save_s)


def shape_kwargs(shape: str, layers: int | None = None) -> dict:
    """write_checkpoint keyword arguments of a named shape (optionally with another depth)."""
    if shape not in SHAPES:
        raise SystemExit(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    kw = dict(SHAPES[shape])
    if layers is not None:
        kw["layers"] = layers
    return kw


def check(path: Path) -> None:
    """Load the checkpoint with transformers and run one forward pass (for small shapes)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("The quick brown fox jumps over the lazy dog. " * 4, return_tensors="pt").input_ids
    ids = ids.clamp(max=cfg.vocab_size - 1)
    with torch.no_grad():
        out = model(ids, labels=ids)
    print(f"config: {cfg.model_type} {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"rope_theta {cfg.rope_parameters['rope_theta']}, dtype {cfg.dtype}; loaded "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params; forward on {ids.shape[1]} tokens: "
          f"loss {out.loss.item():.3f}, perplexity {out.loss.exp().item():.1f}, "
          f"logits finite {bool(torch.isfinite(out.logits).all())}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--shape", default="llama-3.1-8b", choices=list(SHAPES))
    ap.add_argument("--layers", type=int, default=None, help="depth (default: the shape's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-gib", type=float, default=2.0)
    ap.add_argument("--no-fsync", action="store_true")
    ap.add_argument("--check", action="store_true", help="load it with transformers and run one forward")
    args = ap.parse_args()
    kw = shape_kwargs(args.shape, args.layers)
    w = write_checkpoint(args.out_dir, seed=args.seed, shard_bytes=int(args.shard_gib * GIB),
                         fsync=not args.no_fsync, say=print, **kw)
    print(json.dumps({**{k: str(v) if isinstance(v, Path) else v for k, v in asdict(w).items()},
                      "gb_per_s": round(w.gb_per_s, 3)}))
    if args.check:
        check(w.path)


if __name__ == "__main__":
    main()
