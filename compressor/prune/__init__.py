"""Pruning: the layer-wise engine, importance scores, allocation, compensation, surgery, the
pruning driver and the search. The registries below name every importance metric and
compensation without importing torch (for `compress --help`)."""

from ..registry import Registry

_I = "compressor.prune.importance"
_C = "compressor.prune.compensation"

# `auto`: the winner of benchmarks/grid.py on SmolLM2-135M (see README, "Quality")
IMPORTANCE = Registry("importance metric", {
    "flap": f"{_I}:flap",
    "wanda-sp": f"{_I}:wanda_sp",
    "magnitude": f"{_I}:magnitude",
    "output-approx": f"{_I}:output_approx",
    "mi": f"{_I}:mutual_information",
    "taylor": f"{_I}:taylor",
    "taylor-vector": f"{_I}:taylor_vector",
    "fusion": f"{_I}:fusion",
    "obs": f"{_I}:obs",
}, aliases={"auto": "flap"})

COMPENSATION = Registry("compensation", {
    "none": f"{_C}:no_compensation",
    "bias": f"{_C}:bias_compensation",
    "lsq": f"{_C}:lsq",
    "lsq+bias": f"{_C}:lsq_bias",
    "lsq-dense+bias": f"{_C}:lsq_dense_bias",
    "fold": f"{_C}:fold",
}, aliases={"auto": "lsq+bias"})

STRUCTURES = ("global", "uniform", "depth", "searched")  # and "auto": the metric's default; depth: prune/depth.py;
# searched: prune/evolve.py
# --blocks: which blocks depth pruning removes (auto: prune/depth.py DEFAULT_BLOCKS, the measured best)
DEPTH_BLOCKS = ("auto", "layer", "attention", "mlp", "any")
ATTN_UNITS = ("auto", "kv", "query")
