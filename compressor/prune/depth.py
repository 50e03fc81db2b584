"""Depth pruning: remove whole blocks (a decoder layer, its attention block or its MLP block),
SLEB / ShortGPT / BlockPruner style, until a fraction of the decoder's weights is gone.

Why blocks: at small batch a decoder's time is mostly per-layer fixed cost plus weights read once
per token; removing a block removes both, where width pruning removes only part of the second
(SLEB: 1.27x from ~20% of blocks vs 1.05x from width pruning at the same size).

Score of a block = the damage skipping it does to the *whole model's* outputs: the KL divergence
from the dense model's next-token distribution to that of the model with the block skipped (and
every block removed so far), averaged over sampled positions of a few calibration windows. Removal
is iterative (SLEB): after each removal the remaining candidates are re-scored on the model as it
now is, since blocks that are redundant one at a time need not be redundant together. A
`shortlist` bounds the cost: each round re-scores only the candidates whose latest scores were the
lowest (0: all of them, SLEB exactly).

Cheap to score: the residual stream at every layer's input is cached for the current model, so a
candidate in layer j only runs layers j..L-1, and logits are computed at every `stride`-th
position only. A skipped block is a module whose forward returns zeros, so the residual stream
passes through unchanged: exactly what removing it does.

The model is then cut through `surgery.prune_layer` with empty keeps (no query/KV heads: the
attention block is gone; no channels: the MLP block is gone; both: the whole layer).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError
from ..model.adapters import Adapter, LayerShape
from .engine import LayerwiseEngine, _to
from .surgery import LayerKeep, prune_layer

PARTS = ("attention", "mlp")
# which units each --blocks value offers: a whole layer, or its attention / MLP block alone;
# "any": attention and MLP blocks separately (both of one layer removed = the layer removed)
BLOCK_PARTS = {"layer": (PARTS,), "attention": (("attention",),), "mlp": (("mlp",),),
               "any": (("attention",), ("mlp",))}
# The default: whole layers. On SmolLM2 (4 x 128 calibration tokens) one whole layer removed (3.3%
# of the decoder) cost KL 0.115, four attention blocks of the same size 0.188 (greedy by damage,
# before scoring per weight); whole layers also export as the stock architecture with fewer layers.
DEFAULT_BLOCKS = "layer"


@dataclass(frozen=True)
class Unit:
    """A removable unit: the `parts` ("attention", "mlp") of decoder layer `layer`."""

    layer: int
    parts: tuple[str, ...]
    params: int

    @property
    def name(self) -> str:
        return f"layer {self.layer}" if len(self.parts) == 2 else f"layer {self.layer} {self.parts[0]}"


def attention_params(shape: LayerShape, hidden: int) -> int:
    """Weights of q/k/v/o (the same arithmetic as `widths.layer_params`)."""
    return hidden * shape.head_dim * (2 * shape.num_heads + 2 * shape.num_kv_heads)


def mlp_params(shape: LayerShape, hidden: int) -> int:
    return 3 * hidden * shape.intermediate_size


def part_params(shape: LayerShape, hidden: int, part: str) -> int:
    return attention_params(shape, hidden) if part == "attention" else mlp_params(shape, hidden)


def units_of(shapes: list[LayerShape], hidden: int, blocks: str) -> list[Unit]:
    """Every candidate unit of a model whose layers have `shapes`, for `--blocks blocks`."""
    if blocks not in BLOCK_PARTS:
        raise UserError(f"Unknown --blocks '{blocks}' (use {', '.join(BLOCK_PARTS)}).")
    return [Unit(i, parts, sum(part_params(s, hidden, p) for p in parts))
            for i, s in enumerate(shapes) for parts in BLOCK_PARTS[blocks]]


# ---- skipping blocks --------------------------------------------------------------------------

def _zero_attention(hidden_states, *args, **kwargs):
    return torch.zeros_like(hidden_states), None


def _zero_mlp(x, *args, **kwargs):
    return torch.zeros_like(x)


@contextmanager
def skipped(adapter: Adapter, layers: nn.ModuleList, blocks: set[tuple[int, str]]) -> Iterator[None]:
    """Within the block, each (layer, part) of `blocks` contributes nothing to the residual stream
    (its module's forward returns zeros), as if it were removed."""
    patched = []
    try:
        for i, part in sorted(blocks):
            mod = adapter.attention(layers[i]) if part == "attention" else adapter.mlp(layers[i])
            patched.append((mod, mod.__dict__.get("forward")))
            mod.forward = _zero_attention if part == "attention" else _zero_mlp
        yield
    finally:
        for mod, own in reversed(patched):
            if own is None:
                del mod.forward
            else:
                mod.forward = own


# ---- scoring ----------------------------------------------------------------------------------

class BlockScorer:
    """KL divergence from the dense model's next-token distribution on `windows` to the model's with
    a set of blocks skipped. Holds layer 0's inputs, the dense log-probabilities at every `stride`-th
    position, and the residual stream at every layer's input for the blocks skipped so far."""

    def __init__(self, model, adapter: Adapter, windows: torch.Tensor, device: str = "cpu", batch_size: int = 8,
                 stride: int = 4):
        self.model, self.adapter = model, adapter
        self.device = torch.device(device)
        self.batch_size = max(1, batch_size)
        self.layers = adapter.layers(model)
        self.positions = torch.arange(0, windows.shape[1], stride)
        model.to(self.device)
        engine = LayerwiseEngine(model, adapter, windows, device=device, batch_size=self.batch_size, observe=False)
        self.inputs, self.kwargs = engine.capture_inputs()  # layer 0's inputs and the layers' kwargs
        self.removed: set[tuple[int, str]] = set()
        self.streams = self._streams()
        self.dense = self._logprobs(self.streams[-1])
        self.forwards = 0  # layers run while scoring (the cost, for the notes)

    def _batches(self, x: torch.Tensor):
        for s in range(0, x.shape[0], self.batch_size):
            yield s, x[s: s + self.batch_size]

    @torch.no_grad()
    def _layer(self, i: int, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        for s, b in self._batches(x):
            kw = _to(self.kwargs[b.shape[0]], self.device)
            y = self.layers[i](b.to(self.device), **kw)
            out[s: s + b.shape[0]] = (y[0] if isinstance(y, tuple) else y).to(out.device)
        return out

    @torch.no_grad()
    def _streams(self) -> list[torch.Tensor]:
        """The residual stream at every layer's input (and after the last) with `removed` skipped."""
        streams = [self.inputs]
        with skipped(self.adapter, self.layers, self.removed):
            for i in range(len(self.layers)):
                streams.append(self._layer(i, streams[-1]))
        return streams

    @torch.no_grad()
    def _logprobs(self, last: torch.Tensor) -> torch.Tensor:
        norm = self.adapter.decoder(self.model).norm
        head = self.model.get_output_embeddings()
        out = []
        for _, b in self._batches(last[:, self.positions]):
            out.append(torch.log_softmax(head(norm(b.to(self.device))).float(), dim=-1).cpu())
        return torch.cat(out)

    def kl(self, logp: torch.Tensor) -> float:
        """Mean over the sampled positions of KL(dense || this)."""
        p = self.dense.exp()
        return float((p * (self.dense - logp)).sum(-1).mean())

    @torch.no_grad()
    def score(self, unit: Unit) -> float:
        """The damage of skipping `unit` on top of what is removed already."""
        x = self.streams[unit.layer]
        extra = {(unit.layer, p) for p in unit.parts}
        with skipped(self.adapter, self.layers, self.removed | extra):
            for i in range(unit.layer, len(self.layers)):
                x = self._layer(i, x)
                self.forwards += 1
        return self.kl(self._logprobs(x))

    def remove(self, unit: Unit) -> None:
        """Skip `unit` from now on; the cached streams after it are recomputed."""
        self.removed |= {(unit.layer, p) for p in unit.parts}
        x = self.streams[unit.layer]
        with skipped(self.adapter, self.layers, self.removed):
            for i in range(unit.layer, len(self.layers)):
                x = self._layer(i, x)
                self.streams[i + 1] = x

    def current_kl(self) -> float:
        return self.kl(self._logprobs(self.streams[-1]))


def scoring_windows(calib: torch.Tensor, n: int, tokens: int = 0) -> torch.Tensor:
    """`n` calibration windows spread evenly over the calibration set, each cut to its first
    `tokens` tokens (0: whole). Scoring runs the model's tail once per candidate and round, so
    it works on a few short windows: the ranking of blocks needs far fewer tokens than a re-fit."""
    if n < calib.shape[0]:
        calib = calib[torch.linspace(0, calib.shape[0] - 1, n).round().long()]
    return calib[:, :tokens] if tokens else calib


@dataclass
class Removal:
    unit: Unit
    score: float  # KL of the model with this unit skipped (and those before it), when it was chosen
    removed_fraction: float  # of the decoder's weights, after this removal


def choose_blocks(scorer: BlockScorer, units: list[Unit], target: int, total: int, shortlist: int = 0,
                  say=print) -> list[Removal]:
    """Greedy iterative removal: each round (re-)score the candidates, remove the one that adds the
    least damage per weight removed and brings the removed weights closer to `target`, until none
    does (with units of one size, the least damaging one; with `any`, an attention block is not
    preferred just because it is small: on SmolLM2 four attention blocks did more damage than one
    whole layer of the same size). Each round re-scores all
    candidates (`shortlist` 0), or lazily: the `shortlist` whose latest scores are lowest, again
    until the lowest score is one measured this round (damage grows as blocks go, so an old score
    is usually an underestimate; taking it unchecked picks blocks that are no longer harmless)."""
    left = list(units)
    latest: dict[Unit, float] = {}
    removed_params = 0
    current = 0.0  # KL of the model as it is now

    def cost(u: Unit) -> tuple:  # damage added per weight removed: units of unequal size compete fairly
        return ((latest[u] - current) / u.params, u.layer, u.parts)

    out: list[Removal] = []
    while left:
        closer = [u for u in left if abs(removed_params + u.params - target) < abs(removed_params - target)]
        if not closer:
            break
        fresh: set[Unit] = set()  # scored on the model as it is now
        while True:
            stale = [u for u in closer if u not in fresh]
            if shortlist > 0 and all(u in latest for u in stale):
                stale = sorted(stale, key=cost)[:shortlist]
            for u in stale:
                latest[u] = scorer.score(u)
                fresh.add(u)
            best = min(closer, key=cost)
            if best in fresh:  # lazy greedy: a stale score (measured with fewer blocks removed) is
                break  # no lower bound of today's, so the winner must be re-scored before it is taken
        scorer.remove(best)
        left.remove(best)
        # a unit overlapping the removed one (a whole layer vs its blocks) is gone with it
        left = [u for u in left if not (u.layer == best.layer and set(u.parts) & set(best.parts))]
        removed_params += best.params
        current = latest.pop(best)
        out.append(Removal(best, current, removed_params / total))
        say(f"depth: removed {best.name} (KL {out[-1].score:.4f}); {out[-1].removed_fraction:.1%} of decoder "
            "weights removed")
    return out


# ---- the entry point --------------------------------------------------------------------------

def max_fraction(shapes: list[LayerShape], hidden: int, blocks: str) -> float:
    """The largest fraction of decoder weights `blocks` can remove: layer 0 always stays whole (the
    first layer is the most damaging to remove in every study, and an attention no-op in layer 0
    crashes vLLM's DeciLM), and `attention` / `mlp` remove only blocks of that kind."""
    total = sum(attention_params(s, hidden) + mlp_params(s, hidden) for s in shapes)
    parts = {"layer": PARTS, "any": PARTS, "attention": ("attention",), "mlp": ("mlp",)}[blocks]
    removable = sum(part_params(s, hidden, p) for s in shapes[1:] for p in parts)
    return removable / total


def prune_depth(model, adapter: Adapter, calib: torch.Tensor, spec, compute, say=print, blocks: str | None = None,
                windows: int = 4, tokens: int = 256, stride: int = 8, shortlist: int = 4):
    """Remove the least damaging blocks of `model` in place until about `spec.ratio` of its decoder
    weights are gone; returns a `driver.PruneResult` whose notes list the removed blocks, their
    scores and the exact fraction removed."""
    from .driver import PruneResult

    blocks = DEFAULT_BLOCKS if blocks in (None, "auto") else blocks  # auto: the documented default
    layers = adapter.layers(model)
    hidden = model.config.hidden_size
    shapes = [adapter.shape(layer) for layer in layers]
    units = units_of(shapes, hidden, blocks)
    if not 0.0 < spec.ratio < 1.0:
        raise UserError(f"The pruning ratio must be between 0 and 1 (exclusive), got {spec.ratio}.")
    limit = max_fraction(shapes, hidden, blocks)
    if spec.ratio > limit:
        raise UserError(f"--blocks {blocks} can remove at most {limit:.0%} of this model's decoder weights "
                        f"(layer 0 stays whole), less than the ratio {spec.ratio:.0%}.")
    units = [u for u in units if u.layer > 0]
    total = sum(attention_params(s, hidden) + mlp_params(s, hidden) for s in shapes)
    target = round(spec.ratio * total)
    t0 = time.perf_counter()
    scorer = BlockScorer(model, adapter, scoring_windows(calib, windows, tokens), compute.device,
                         compute.batch_size, stride)
    removals = choose_blocks(scorer, units, target, total, shortlist, say)
    final_kl = scorer.current_kl()
    seconds = time.perf_counter() - t0
    del scorer
    keeps = apply_removals(model, adapter, removals)
    fraction = sum(r.unit.params for r in removals) / total
    say(f"depth: removed {len(removals)} blocks, {fraction:.2%} of decoder weights (asked {spec.ratio:.0%}); "
        f"KL to the dense model on the scoring windows {final_kl:.4f}")
    notes = {"depth": {
        "blocks": blocks,
        "removed": [{"layer": r.unit.layer, "block": "layer" if len(r.unit.parts) == 2 else r.unit.parts[0],
                     "kl": round(r.score, 6), "params": r.unit.params} for r in removals],
        "removed_fraction": round(fraction, 6),
        "final_kl": round(final_kl, 6),
        "scoring": {"windows": int(min(windows, calib.shape[0])),
                    "tokens": int(min(tokens or calib.shape[1], calib.shape[1])),
                    "position_stride": stride, "shortlist": shortlist, "seconds": round(seconds, 2)},
    }}
    return PruneResult(keeps, {}, 1, "depth", notes=notes)


def removed_parts(removals: list[Removal]) -> dict[int, set[str]]:
    out: dict[int, set[str]] = {}
    for r in removals:
        out.setdefault(r.unit.layer, set()).update(r.unit.parts)
    return out


def apply_removals(model, adapter: Adapter, removals: list[Removal]) -> list[LayerKeep]:
    """Cut the removed blocks through `surgery.prune_layer` (empty keeps); every other block stays whole."""
    gone = removed_parts(removals)
    keeps = []
    for i, layer in enumerate(adapter.layers(model)):
        s = adapter.shape(layer)
        parts = gone.get(i, set())
        heads = [] if "attention" in parts else list(range(s.num_heads))
        kv = [] if "attention" in parts else list(range(s.num_kv_heads))
        keeps.append(LayerKeep(heads, kv, [] if "mlp" in parts else list(range(s.intermediate_size))))
    for layer, keep in zip(list(adapter.layers(model)), keeps, strict=True):
        if not keep.q_heads or not keep.channels:
            prune_layer(adapter, layer, keep)
    adapter.set_config_widths(model.config, keeps)
    return keeps

