"""Compensation: what replaces the removed units' contribution. One function per name in
`prune.COMPENSATION`; each gets the layer (still unpruned), what is kept, and the engine's statistics
of the inputs of `o_proj` / `down_proj`, and returns extra biases and/or re-fitted weights for
`surgery.prune_layer`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..model.adapters import Adapter
from .engine import LayerStats
from .surgery import LayerKeep, head_channels


@dataclass
class Fix:
    o_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    o_weight: torch.Tensor | None = None
    down_weight: torch.Tensor | None = None


@dataclass(frozen=True)
class Compensation:
    name: str
    fn: Callable[[Adapter, nn.Module, LayerKeep, LayerStats], Fix]
    adds_bias: bool
    needs_gram: bool = False  # reads stats.*.gram: computed layer by layer in a second pass
    needs_reference: bool = False  # reads stats.*.cross: a greedy pass with the dense model alongside
    help: str = ""
    # the same method without the biases, for runtimes whose kernels are slow with them (the lever
    # plan's "no biases" candidates, `prune.planned`); None: no such sibling
    bias_free: str | None = None

    def __call__(self, adapter: Adapter, layer: nn.Module, keep: LayerKeep, stats: LayerStats) -> Fix:
        """The fix for `layer` cut to `keep`. A half that keeps every unit is left as it is (no re-fit,
        no bias) unless the method repairs the upstream error too (`needs_reference`): there is
        nothing to compensate, and a bias there is not free: stock Llama holds one only with every
        projection's bias switched on, and vLLM CPU's int8 W8A8 kernel is slower with them
        (docs/benchmarks.md, "Do compensation biases slow vLLM CPU's int8 kernel?")."""
        fix = self.fn(adapter, layer, keep, stats)
        if self.needs_reference:
            return fix
        attn_whole, mlp_whole = keeps_every_unit(adapter.shape(layer), keep)
        if attn_whole:
            fix.o_bias = fix.o_weight = None
        if mlp_whole:
            fix.down_bias = fix.down_weight = None
        return fix

    def biases(self, shape, keep: LayerKeep) -> tuple[bool, bool]:
        """Whether the fix for a layer of `shape` cut to `keep` gives o_proj / down_proj a bias (what a
        streaming export must know before the layers are cut, to set the config's bias switches)."""
        if not self.adds_bias:
            return False, False
        attn_whole, mlp_whole = keeps_every_unit(shape, keep)
        attn, mlp = bool(keep.q_heads), bool(keep.channels)  # a removed half has nothing to bias
        if self.needs_reference:
            return attn, mlp
        return attn and not attn_whole, mlp and not mlp_whole


def keeps_every_unit(shape, keep: LayerKeep) -> tuple[bool, bool]:
    """(attention keeps every head, MLP keeps every channel) of a layer of `shape` cut to `keep`."""
    return (len(keep.q_heads) == shape.num_heads and len(keep.kv_heads) == shape.num_kv_heads,
            len(keep.channels) == shape.intermediate_size)


def compensation(name: str, adds_bias: bool, needs_gram: bool = False, needs_reference: bool = False,
                 help: str = "", bias_free: str | None = None):
    """Turn a function into a `Compensation` called `name` (register it in `prune.COMPENSATION`)."""
    def wrap(fn) -> Compensation:
        return Compensation(name, fn, adds_bias, needs_gram, needs_reference, help, bias_free)

    return wrap


def _removed(total: int, kept: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(total, dtype=torch.bool)
    mask[kept] = False
    return mask.nonzero().flatten()


def removed_channels(adapter: Adapter, layer: nn.Module, keep: LayerKeep) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the removed input channels of o_proj and of down_proj."""
    shape = adapter.shape(layer)
    attn = _removed(shape.num_heads * shape.head_dim, head_channels(keep.q_heads, shape.head_dim))
    mlp = _removed(shape.intermediate_size, torch.tensor(keep.channels, dtype=torch.long))
    return attn, mlp


@compensation("none", adds_bias=False, help="Drop the removed units and do nothing else.")
def no_compensation(adapter, layer, keep, stats) -> Fix:
    return Fix()


@compensation("bias", adds_bias=True, bias_free="none",
              help="FLAP bias compensation: the removed channels' mean contribution W[:, removed] @ mean(x[removed]) "
                   "becomes a bias of o_proj / down_proj.")
def bias_compensation(adapter: Adapter, layer: nn.Module, keep: LayerKeep, stats: LayerStats) -> Fix:
    rm_attn, rm_mlp = removed_channels(adapter, layer, keep)
    o = adapter.attention(layer).o_proj.weight.data.double()
    down = adapter.mlp(layer).down_proj.weight.data.double()
    mean_a, mean_m = stats.attn.mean.cpu(), stats.mlp.mean.cpu()
    return Fix(o_bias=o[:, rm_attn] @ mean_a[rm_attn], down_bias=down[:, rm_mlp] @ mean_m[rm_mlp])


# relative to the mean diagonal of the kept channels' Gram matrix. Chosen on SmolLM2 (flap, 30%) with
#   python benchmarks/grid.py --nsamples 8 --seqlen 128 --ratios 0.3 --metrics flap \
#       --compensations bias,lsq+bias --no-greedy --other-structure "" --ridge R
# with 8 x 128 tokens (fewer than down_proj's 1536 inputs) 0.01 over-fits (held-out ppl 53.8, bias alone 47.4)
# and 0.1 does not (36.9); at 32 x 512 tokens the two tie (15.58 / 15.57 at 20%).
RIDGE = 1e-1


def least_squares(w: torch.Tensor, gram: torch.Tensor, mean: torch.Tensor, n: int, kept: torch.Tensor,
                  intercept: bool, ridge: float | None = None, cross: torch.Tensor | None = None,
                  ref_sum: torch.Tensor | None = None,
                  per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Re-fit the second layer on the kept inputs: argmin ||W R - W' X_K - b||^2 + lam ||W' - P||^2.

    X is d x n (tokens as columns); R is the input the target is computed from: X itself (then
    G = X X^T and the mean are all that is needed), or the dense model's input for the same tokens
    when `cross` = R X^T and `ref_sum` = R 1 are given (the re-fit then also undoes the error the
    earlier pruned layers left in X). With an intercept the normal equations use the augmented Gram
    [[G, n mu], [n mu^T, n]]; the intercept is not penalised. Solved in float64.

    The ridge term (lam = `ridge`, default RIDGE, relative to the mean kept diagonal of G) pulls W'
    towards P = W[:, K], the kept columns as they are, not towards zero. With few calibration tokens
    (fewer than channels, where the Gram matrix is singular) the fit then stays at the original
    weights plus the intercept -- FLAP's bias compensation -- instead of over-fitting; with many it
    is the plain least-squares solution. With `per_channel` each kept input channel j gets its own
    lam_j = ridge x G_jj (scale-free: a loud channel is held as firmly as a quiet one). Returns (W', b or None).
    """
    # Memory matters here (for an 8B model's down_proj, G is 14336^2 float64 = 1.6 GB): the system
    # matrix is built once, in place, with the intercept row and the ridge on its diagonal.
    w = w.double()
    g = gram.double()
    k = kept
    nk = len(k)
    size = nk + 1 if intercept else nk
    a = torch.empty(size, size, dtype=torch.float64, device=g.device)
    a[:nk, :nk] = g[k[:, None], k]
    r = RIDGE if ridge is None else ridge
    if per_channel:
        lam = r * a[:nk, :nk].diagonal().clamp_min(1e-12)
    else:
        lam = r * float(a[:nk, :nk].diagonal().mean().clamp_min(1e-12))
    cross = g if cross is None else cross.double()
    rhs = torch.empty(w.shape[0], size, dtype=torch.float64, device=g.device)
    for c in range(0, nk, 2048):  # W R X_K^T, a block of columns at a time (no full copy of G[:, K])
        rhs[:, c: min(c + 2048, nk)] = w @ cross[:, k[c: c + 2048]]
    rhs[:, :nk] += lam * w[:, k]  # + lam P
    a[:nk, :nk].diagonal().add_(lam)
    if intercept:
        s = n * mean.double()
        target_sum = s if ref_sum is None else ref_sum.double()
        a[:nk, nk] = s[k]
        a[nk, :nk] = s[k]
        a[nk, nk] = float(n)  # the intercept is not penalised
        rhs[:, nk] = w @ target_sum
    del w, g, cross
    # rhs A^-1 for the symmetric positive definite A (a Gram matrix plus a ridge): by Cholesky, half
    # the work of a general solve, each input freed as soon as it is used; a general solve if
    # rounding made A numerically indefinite
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        del a
        rhs_t = rhs.T.contiguous()
        del rhs
        sol = torch.cholesky_solve(rhs_t, chol).T
    else:
        del chol
        sol = torch.linalg.solve(a, rhs.T).T
    if intercept:
        return sol[:, :-1], sol[:, -1]
    return sol, None


def _lsq(adapter: Adapter, layer: nn.Module, keep: LayerKeep, stats: LayerStats, intercept: bool,
         towards_dense: bool = False, ridge: float | None = None, per_channel: bool = False,
         refit: tuple[str, ...] = ("o", "down")) -> Fix:
    """The re-fit of o_proj / down_proj; the projections not in `refit` get FLAP's bias instead."""
    shape = adapter.shape(layer)
    kept_attn = head_channels(keep.q_heads, shape.head_dim)
    kept_mlp = torch.tensor(keep.channels, dtype=torch.long)
    fix = Fix()
    if set(refit) != {"o", "down"}:
        base = bias_compensation(adapter, layer, keep, stats)
        fix.o_bias, fix.down_bias = base.o_bias, base.down_bias
    for kind, lin, kept, st in (("o", adapter.attention(layer).o_proj, kept_attn, stats.attn),
                                ("down", adapter.mlp(layer).down_proj, kept_mlp, stats.mlp)):
        if kind not in refit:
            continue
        ref = {}
        if towards_dense:
            if st.cross is None:
                raise RuntimeError("a re-fit towards the dense outputs needs the engine's reference stream")
            ref = {"cross": st.cross, "ref_sum": st.ref_sum}
        # solved where the Gram matrix is (the compute device during a pass; the CPU for statistics kept
        # from an earlier pass)
        dev = st.gram.device
        new_w, b = least_squares(lin.weight.data.to(dev), st.gram, st.mean.to(dev), st.n, kept.to(dev), intercept,
                                 ridge=ridge, per_channel=per_channel, **{k: v.to(dev) for k, v in ref.items()})
        setattr(fix, f"{kind}_weight", new_w)
        setattr(fix, f"{kind}_bias", b)
    return fix


def shrunk(adapter: Adapter, layer: nn.Module, keep: LayerKeep, stats: LayerStats, t: float,
           ridge: float | None = None) -> Fix:
    """t x the least-squares re-fit (with intercept) + (1 - t) x FLAP's bias compensation, weights and
    biases alike: the re-fit shrunk towards the solution that learns nothing from the calibration
    text but its mean."""
    fit = _lsq(adapter, layer, keep, stats, intercept=True, ridge=ridge)
    base = bias_compensation(adapter, layer, keep, stats)
    kept_attn, kept_mlp = (head_channels(keep.q_heads, adapter.shape(layer).head_dim),
                           torch.tensor(keep.channels, dtype=torch.long))
    o = adapter.attention(layer).o_proj.weight.data.double()[:, kept_attn]
    down = adapter.mlp(layer).down_proj.weight.data.double()[:, kept_mlp]

    def mix(a, b):
        return t * a.to(b.device, torch.float64) + (1 - t) * b.double()

    return Fix(o_bias=mix(fit.o_bias, base.o_bias), down_bias=mix(fit.down_bias, base.down_bias),
               o_weight=mix(fit.o_weight, o), down_weight=mix(fit.down_weight, down))


@compensation("lsq", adds_bias=False, needs_gram=True,
              help="Least-squares re-fit of o_proj / down_proj on the kept channels (ridge, float64), from the "
                   "calibration Gram matrix.")
def lsq(adapter, layer, keep, stats) -> Fix:
    return _lsq(adapter, layer, keep, stats, intercept=False)


@compensation("lsq+bias", adds_bias=True, needs_gram=True, bias_free="lsq",
              help="Least-squares re-fit with an intercept: re-fitted o_proj / down_proj weights plus a bias.")
def lsq_bias(adapter, layer, keep, stats) -> Fix:
    return _lsq(adapter, layer, keep, stats, intercept=True)


@compensation("lsq-dense+bias", adds_bias=True, needs_gram=True, needs_reference=True,
              help="Two-step reconstruction: a greedy pass that runs the dense model alongside the pruned one and "
                   "re-fits o_proj / down_proj (with a bias) so the pruned layer reproduces the dense layer's "
                   "output from the pruned model's own activations, undoing earlier layers' error.")
def lsq_dense_bias(adapter, layer, keep, stats) -> Fix:
    return _lsq(adapter, layer, keep, stats, intercept=True, towards_dense=True)


@compensation("fold", adds_bias=True,
              help="For the mi metric: each removed MLP neuron is folded into its redundant partner by the "
                   "least-squares fit a_removed ~ alpha * a_partner + beta (beta into the bias); attention as bias.")
def fold(adapter: Adapter, layer: nn.Module, keep: LayerKeep, stats: LayerStats) -> Fix:
    fix = bias_compensation(adapter, layer, keep, stats)
    info = stats.extra.get("mi")
    if info is None:
        return fix
    down = adapter.mlp(layer).down_proj.weight.data.double().cpu()
    kept = torch.tensor(keep.channels, dtype=torch.long)
    is_kept = torch.zeros(down.shape[1], dtype=torch.bool)
    is_kept[kept] = True
    w = down.clone()
    bias = torch.zeros(down.shape[0], dtype=torch.float64)
    mean = stats.mlp.mean.cpu()
    for c in (~is_kept).nonzero().flatten().tolist():
        p = int(info["partner"][c])
        if p >= 0 and is_kept[p]:
            w[:, p] += float(info["alpha"][c]) * down[:, c]
            bias += float(info["beta"][c]) * down[:, c]
        else:
            bias += float(mean[c]) * down[:, c]
    fix.down_weight = w[:, kept]
    fix.down_bias = bias
    return fix
