"""Exact-Hessian influence for small models: the reference every approximation is checked against.

H = (1/n) Σ_i ∇²_θ ℓ_i over the full vector of tracked parameters (all layers together, cross-
layer blocks included), computed by autograd (torch.func.hessian). In the compressed space of a
Dropout compressor the paper's eq. 3 uses H̃ = Ĩ H Ĩᵀ, i.e. the sub-matrix at the kept indices;
with Identity it is H itself. Then I(q, i) = − g̃_qᵀ (H̃ + λI)⁻¹ g̃_i.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch.func import functional_call, hessian
from tqdm.auto import tqdm

from ..capture.functional import _LossModule, batch_size
from ..errors import ConfigError, EmptyDataError
from ..store.features import Features
from .base import FitContext, require_kind


def full_hessian(ctx: FitContext, names: list[str]) -> tuple[torch.Tensor, int]:
    """Σ_i ∇²ℓ_i over the flat vector of the named parameters, and n. (d × d, float64)"""
    pm = dict(ctx.model.named_parameters(remove_duplicate=False))
    params = [pm[n].detach() for n in names]
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]
    flat0 = torch.cat([p.reshape(-1) for p in params])
    wrapper = _LossModule(ctx.model, ctx.loss_fn)

    def f(flat, batch):
        chunks = torch.split(flat, sizes)
        p = {f"model.{n}": c.reshape(s) for n, c, s in zip(names, chunks, shapes)}
        return functional_call(wrapper, p, (batch,)).sum()

    h, n = None, 0
    for batch in tqdm(ctx.train_loader, desc="exact hessian", disable=not ctx.progress, leave=False):
        hb = hessian(f)(flat0, batch).double()
        h = hb if h is None else h + hb
        n += batch_size(batch)
    if h is None:
        raise EmptyDataError("the train loader yielded no batches; cannot build the Hessian")
    return h, n


class _ConcatScores:
    def __init__(self, layers: list[str], pre: torch.Tensor, train: Features):
        self.layers, self.pre, self.train = layers, pre, train

    def _cat(self, f: Features) -> torch.Tensor:
        return torch.cat([f.data[l].double() for l in self.layers], 1)

    def score(self, query: Features) -> torch.Tensor:
        return -(self._cat(query) @ self.pre.T).float()

    def self_scores(self) -> torch.Tensor:
        return -(self._cat(self.train) * self.pre).sum(1).float()


@dataclass(frozen=True)
class ExactHessian:
    """True Hessian of the mean train loss over the tracked parameters, plus damping·I.

    damping:  λ added to the diagonal (0 for a strictly convex, regularised model).
    max_dim:  refuse models whose tracked parameter count exceeds this (H is d × d).
    """

    damping: float = 0.0
    max_dim: int = 20_000
    name: str = "exact-hessian"

    def fit(self, train: Features, ctx: FitContext) -> _ConcatScores:
        require_kind("ExactHessian", ctx.compressor, {"identity", "dropout"})
        if ctx.train_loader is None:
            raise ConfigError("ExactHessian needs the train loader; call Attributor.featurize(loader).")
        names = [pn for l in ctx.layers for pn in l.param_names]
        d = sum(l.dim for l in ctx.layers)
        if d > self.max_dim:
            raise ConfigError(f"ExactHessian on {d} tracked parameters would build a {d}×{d} matrix; "
                              f"it is meant for small models (max_dim={self.max_dim}). Use GaussNewton.")
        h, n = full_hessian(ctx, names)
        h = h / n
        idx, fac, off = [], [], 0
        for l in ctx.layers:
            comp = ctx.compressors[l.name]
            li = getattr(comp, "indices", torch.arange(l.dim))
            idx.append(li + off)
            fac.append(torch.full((li.numel(),), float(getattr(comp, "factor", 1.0)), dtype=torch.float64))
            off += l.dim
        idx_t, fac_t = torch.cat(idx), torch.cat(fac)
        hs = h[idx_t][:, idx_t] * fac_t[:, None] * fac_t[None, :]
        hs = hs + self.damping * torch.eye(hs.shape[0], dtype=torch.float64)
        g = torch.cat([train.data[l.name].double() for l in ctx.layers], 1)
        L, info = torch.linalg.cholesky_ex(hs)
        if int(info) == 0:
            pre = torch.cholesky_solve(g.T, L).T
        else:
            warnings.warn("the exact Hessian (+ damping) is not positive definite: the loss is not "
                          "convex at these parameters (or the model is under-trained). Solving with "
                          "LU anyway; influence-function assumptions do not hold here.", stacklevel=2)
            pre = torch.linalg.solve(hs, g.T).T
        return _ConcatScores([l.name for l in ctx.layers], pre, train)
