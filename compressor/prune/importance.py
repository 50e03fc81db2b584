"""Importance scores: one function per metric, each registered by name in `prune.IMPORTANCE`.

A metric looks at one decoder layer and the statistics the engine streamed at the inputs of
`o_proj` and `down_proj`, and returns a score per *input channel* of those two modules (higher =
more important): `attn` has num_heads x head_dim entries, `mlp` has intermediate_size entries.
Allocation turns channel scores into unit scores (a head, a GQA slice, a KV group, an MLP
channel) and picks what to keep. Adding a metric = one function decorated with `@importance(...)`
(here or in a module of its own) plus its `"module:name"` line in `compressor/prune/__init__.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..model.adapters import Adapter
from .engine import LayerStats


@dataclass
class ChannelScores:
    attn: torch.Tensor  # [num_heads * head_dim], float64
    mlp: torch.Tensor  # [intermediate_size], float64


@dataclass(frozen=True)
class Metric:
    name: str
    fn: Callable[[Adapter, nn.Module, LayerStats], ChannelScores]
    default_structure: str  # "global" or "uniform"
    standardize: bool  # standardize per layer and module before a global ranking (FLAP)
    needs_gram: bool = False  # reads stats.attn.gram / stats.mlp.gram
    sample_rows: int = 0  # reads stats.mlp.sample (raw activation rows)
    sequential: bool = False  # greedy: score each layer on the already-pruned model's activations
    # computed once on the dense model before the layer-wise pass; one dict per layer -> stats.extra
    precompute: Callable | None = None
    help: str = ""

    def __call__(self, adapter: Adapter, layer: nn.Module, stats: LayerStats) -> ChannelScores:
        return self.fn(adapter, layer, stats)


def importance(name: str, default_structure: str, standardize: bool, help: str = "", **kw):
    """Turn a scoring function into a `Metric` called `name` (register it in `prune.IMPORTANCE`)."""
    def wrap(fn) -> Metric:
        return Metric(name, fn, default_structure, standardize, help=help, **kw)

    return wrap


def _col_sq_norm(lin: nn.Linear) -> torch.Tensor:
    return lin.weight.data.double().pow(2).sum(0)


@importance("flap", "global", standardize=True,
        help="FLAP fluctuation: variance of the input channel over calibration tokens x squared norm of its "
             "weight column.")
def flap(adapter: Adapter, layer: nn.Module, stats: LayerStats) -> ChannelScores:
    o = adapter.attention(layer).o_proj
    down = adapter.mlp(layer).down_proj
    return ChannelScores(
        attn=stats.attn.var * _col_sq_norm(o).to(stats.attn.var.device),
        mlp=stats.mlp.var * _col_sq_norm(down).to(stats.mlp.var.device),
    )


@importance("wanda-sp", "uniform", standardize=False,
        help="Structured Wanda: mean |W| of the weight column x the input channel's L2 norm over calibration tokens.")
def wanda_sp(adapter: Adapter, layer: nn.Module, stats: LayerStats) -> ChannelScores:
    o = adapter.attention(layer).o_proj
    down = adapter.mlp(layer).down_proj

    def score(lin: nn.Linear, s) -> torch.Tensor:
        return lin.weight.data.double().abs().mean(0).to(s.mean.device) * s.sq_norm.sqrt()

    return ChannelScores(attn=score(o, stats.attn), mlp=score(down, stats.mlp))


@importance("magnitude", "uniform", standardize=False,
        help="Data-free: squared L2 norm of every weight the unit owns (q rows + o columns; gate/up rows + "
             "down column).")
def magnitude(adapter: Adapter, layer: nn.Module, stats: LayerStats) -> ChannelScores:
    attn, mlp = adapter.attention(layer), adapter.mlp(layer)
    q = attn.q_proj.weight.data.double().pow(2).sum(1)
    o = _col_sq_norm(attn.o_proj)
    gate = mlp.gate_proj.weight.data.double().pow(2).sum(1)
    up = mlp.up_proj.weight.data.double().pow(2).sum(1)
    down = _col_sq_norm(mlp.down_proj)
    return ChannelScores(attn=q + o, mlp=gate + up + down)


def _per_head(values: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Give every channel of a head its head's score."""
    return values.repeat_interleave(head_dim)


@importance("output-approx", "global", standardize=True, needs_gram=True, sequential=True,
        help="Greedy output approximation: MLP channel = second moment of its activation x squared norm of its "
             "down_proj column; head = 1 - cosine similarity of the attention output with and without the head. "
             "Scored layer by layer on the already-pruned model.")
def output_approx(adapter: Adapter, layer: nn.Module, stats: LayerStats) -> ChannelScores:
    attn = adapter.attention(layer)
    shape = adapter.shape(layer)
    n = max(stats.attn.n, 1)
    # heads: expectations over tokens from the Gram matrix G = sum x x^T of o_proj's input
    w = attn.o_proj.weight.data.double().to(stats.attn.gram.device)
    m = w.T @ w  # (W^T W)_jk: <o_j, o_k> for input channels j, k
    mg = m * stats.attn.gram / n  # E[<W x, W x>] = sum_jk (W^T W)_jk E[x_j x_k]
    total = mg.sum()
    hd = shape.head_dim
    heads = []
    for h in range(shape.num_heads):
        sl = slice(h * hd, (h + 1) * hd)
        cross = mg[sl, :].sum()  # E<o, delta_h>
        own = mg[sl, sl].sum()  # E||delta_h||^2
        rest = (total - 2 * cross + own).clamp_min(1e-30)  # E||o - delta_h||^2
        cos = (total - cross) / (total * rest).sqrt().clamp_min(1e-30)
        heads.append(1.0 - cos)
    head_scores = torch.stack(heads).clamp_min(0)
    down = adapter.mlp(layer).down_proj
    return ChannelScores(
        attn=_per_head(head_scores, hd).cpu(),
        mlp=(stats.mlp.sq_norm / n * _col_sq_norm(down).to(stats.mlp.sq_norm.device)).cpu(),
    )


def _gaussian_copula(x: torch.Tensor) -> torch.Tensor:
    """Rank-transform each column to standard normal scores, then z-score (Gaussian copula)."""
    t = x.shape[0]
    ranks = x.argsort(0).argsort(0).double() + 1
    z = torch.special.ndtri(ranks / (t + 1))
    return (z - z.mean(0)) / z.std(0).clamp_min(1e-12)


def redundancy_partners(sample: torch.Tensor, projections: int = 8, window: int = 8, seed: int = 0):
    """For each neuron, its most correlated other neuron in Gaussian-copula space, found by screening.

    Instead of all d^2 pairs, neurons are sorted along a few random projections of their
    (copula-transformed, normalized) activation vectors and only neighbours within `window` in
    each ordering are compared exactly: O(d x projections x window x tokens). Returns
    (partner index, rho) per neuron; MI of a Gaussian pair is -0.5 log(1 - rho^2).
    """
    z = _gaussian_copula(sample.double())  # [t, d]
    t, d = z.shape
    zn = z / z.norm(dim=0).clamp_min(1e-12)  # unit columns: dot products are correlations
    gen = torch.Generator().manual_seed(seed)
    proj = zn.T @ torch.randn(t, projections, generator=gen, dtype=torch.float64)  # [d, p]
    best_rho = torch.zeros(d, dtype=torch.float64)
    best = torch.full((d,), -1, dtype=torch.long)
    for p in range(projections):
        order = proj[:, p].argsort()
        for off in range(1, window + 1):
            a, b = order[:-off], order[off:]
            rho = (zn[:, a] * zn[:, b]).sum(0)
            for i, j in ((a, b), (b, a)):
                better = rho.abs() > best_rho[i].abs()
                best_rho[i[better]] = rho[better]
                best[i[better]] = j[better]
    return best, best_rho


def _mi_precompute_partners(stats: LayerStats, down: nn.Linear) -> None:
    sample = stats.mlp.sample
    partner, rho = redundancy_partners(sample)
    energy = stats.mlp.var.cpu() * _col_sq_norm(down).cpu()
    # a neuron may fold only into a stronger partner, so of two duplicates exactly one goes first
    stronger = (energy[partner.clamp_min(0)] > energy) | (
        (energy[partner.clamp_min(0)] == energy) & (partner < torch.arange(len(partner))))
    valid = (partner >= 0) & stronger
    # least-squares fold a_c ~ alpha * a_p + beta on the raw sample
    x = sample.double()
    p = partner.clamp_min(0)
    xc, xp = x - x.mean(0), x[:, p] - x[:, p].mean(0)
    alpha = (xc * xp).sum(0) / (xp * xp).sum(0).clamp_min(1e-12)
    beta = x.mean(0) - alpha * x[:, p].mean(0)
    stats.extra["mi"] = {"partner": torch.where(valid, partner, torch.full_like(partner, -1)),
                         "rho": torch.where(valid, rho, torch.zeros_like(rho)), "alpha": alpha, "beta": beta,
                         "energy": energy}


@importance("mi", "global", standardize=True, sample_rows=2048,
        help="Mutual-information neuron pruning: an MLP neuron whose activation carries the same information as a "
             "stronger neuron (Gaussian-copula MI, screened by random projections) goes first; score = its energy "
             "left unexplained by that partner. Heads as in flap.")
def mutual_information(adapter: Adapter, layer: nn.Module, stats: LayerStats) -> ChannelScores:
    down = adapter.mlp(layer).down_proj
    _mi_precompute_partners(stats, down)
    info = stats.extra["mi"]
    residual = info["energy"] * (1 - info["rho"] ** 2)
    return ChannelScores(attn=flap(adapter, layer, stats).attn.cpu(), mlp=residual)


def _taylor_precompute(model, adapter, samples, device="cpu") -> list[dict]:
    from .gradients import taylor_batches

    return [{"taylor": t} for t in taylor_batches(model, adapter, samples, device=device)]


@importance("taylor", "uniform", standardize=True, precompute=_taylor_precompute,
        help="LLM-Pruner first-order Taylor, element-wise: sum over the unit's weights of |w * dL/dw| "
             "(gradients from a few calibration batches).")
def taylor(adapter: Adapter, layer: nn.Module, stats: LayerStats) -> ChannelScores:
    t = stats.extra["taylor"]
    return ChannelScores(attn=t["attn_elem"].mean(0), mlp=t["mlp_elem"].mean(0))


@importance("taylor-vector", "uniform", standardize=True, precompute=_taylor_precompute,
        help="LLM-Pruner first-order Taylor, vector-wise: |sum over the unit's weights of w * dL/dw|.")
def taylor_vector(adapter: Adapter, layer: nn.Module, stats: LayerStats) -> ChannelScores:
    t = stats.extra["taylor"]
    return ChannelScores(attn=t["attn_vec"].mean(0), mlp=t["mlp_vec"].mean(0))


def fuse(fine: torch.Tensor, coarse: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Adaptive fusion of a fine-grained and a coarse-grained estimate of the same importance.

    `fine` and `coarse` are [batches, channels]: each estimate computed separately on K
    calibration batches. Each is z-scored per batch (so scales are comparable), its estimate is
    the mean over batches, and its noise is the variance of that mean, sigma^2 = mean over
    channels of Var_batches(z) / K. The fused score is the minimum-variance (inverse-variance)
    combination w * z_fine + (1 - w) * z_coarse with w = sigma_coarse^2 / (sigma_fine^2 +
    sigma_coarse^2): a layer or module whose fine-grained estimate is unstable across calibration
    batches leans on the coarse one, and vice versa. The weight is chosen per layer and module.
    """
    def z(x):
        return (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True).clamp_min(1e-12)

    zf, zc = z(fine.double()), z(coarse.double())
    k = fine.shape[0]
    var_f = zf.var(0).mean() / k if k > 1 else torch.tensor(1.0)
    var_c = zc.var(0).mean() / k if k > 1 else torch.tensor(1.0)
    w = float(var_c / (var_f + var_c).clamp_min(1e-12))
    return w * zf.mean(0) + (1 - w) * zc.mean(0), w


@importance("fusion", "uniform", standardize=True, precompute=_taylor_precompute,
        help="Adaptive estimation fusion: element-wise and vector-wise Taylor estimates combined per layer and "
             "module with inverse-variance weights measured across calibration batches.")
def fusion(adapter: Adapter, layer: nn.Module, stats: LayerStats) -> ChannelScores:
    t = stats.extra["taylor"]
    attn, wa = fuse(t["attn_elem"], t["attn_vec"])
    mlp, wm = fuse(t["mlp_elem"], t["mlp_vec"])
    stats.extra["fusion_weights"] = {"attn": wa, "mlp": wm}
    return ChannelScores(attn=attn, mlp=mlp)


def _inverse_covariance(st, ridge: float = 1e-2) -> torch.Tensor:
    """(C + lambda I)^-1 of the centred input covariance C = G/n - mu mu^T (float64)."""
    n = max(st.n, 1)
    c = st.gram.double() / n - torch.outer(st.mean.double(), st.mean.double())
    lam = ridge * float(c.diagonal().mean().clamp_min(1e-12))
    return torch.linalg.inv(c + lam * torch.eye(c.shape[0], dtype=c.dtype, device=c.device))


@importance("obs", "global", standardize=False, needs_gram=True, sequential=True,
        help="Output error after least-squares recovery (Optimal Brain Surgeon on a layer's second matrix): the "
             "increase of E||W x - W' x_kept - b||^2 when a unit goes and the rest are re-fitted, per weight "
             "removed. Greedy, for use with lsq+bias.")
def obs(adapter: Adapter, layer: nn.Module, stats: LayerStats) -> ChannelScores:
    """Two-step reconstruction, step one: decisions that already assume the re-fit.

    For the second matrix W of a depth-2 structure with centred input covariance C, removing the
    input channels S and re-fitting the rest (with an intercept) raises the per-token output error
    by tr(W_S ([C^-1]_SS)^-1 W_S^T). For one MLP channel that is ||w_j||^2 / [C^-1]_jj (FLAP's
    var_j ||w_j||^2 when channel j is uncorrelated with the others); a head uses its 64x64 block.
    Scores are divided by the weights the unit removes (one MLP channel: 3 x hidden; one query
    head: 2 x head_dim x hidden), so one threshold over all layers ranks error per weight saved.
    """
    shape = adapter.shape(layer)
    hidden = adapter.attention(layer).o_proj.out_features
    hd = shape.head_dim
    inv_a = _inverse_covariance(stats.attn)
    wo = adapter.attention(layer).o_proj.weight.data.double().to(inv_a.device)
    heads = []
    for h in range(shape.num_heads):
        sl = slice(h * hd, (h + 1) * hd)
        block = inv_a[sl, sl]
        w = wo[:, sl]
        heads.append(torch.trace(w @ torch.linalg.solve(block, w.T)))
    head_scores = torch.stack(heads) / (2 * hd * hidden)
    inv_m = _inverse_covariance(stats.mlp)
    wd = adapter.mlp(layer).down_proj.weight.data.double().to(inv_m.device)
    mlp = (wd**2).sum(0) / inv_m.diagonal().clamp_min(1e-30) / (3 * hidden)
    return ChannelScores(attn=_per_head(head_scores, hd).cpu(), mlp=mlp.cpu())
