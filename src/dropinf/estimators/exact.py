"""Exact-Hessian influence for small models: the reference every approximation is checked against.

H = (1/n) Σ_i ∇²_θ ℓ_i over the full vector of tracked parameters (all layers together, cross-
layer blocks included), computed by autograd (torch.func.hessian). In the compressed space of a
Dropout compressor the paper's eq. 3 uses H̃ = Ĩ H Ĩᵀ, i.e. the sub-matrix at the kept indices;
with Identity it is H itself. Then I(q, i) = − g̃_qᵀ (H̃ + λI)⁻¹ g̃_i: one joint dense block
M = (H̃ + λI)⁻¹ over all tracked layers (the only estimator besides LiSSA(hvp="model") whose M
couples layers). The train rows are not read: H comes from the model and the train loader.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..options import option
from ..errors import ConfigError
from .base import FitContext, require_kind
from .model_hessian import full_hessian, kept_coordinates
from .preconditioner import Block, Preconditioner, estimator_signature


@dataclass(frozen=True)
class ExactHessian:
    """True Hessian of the mean train loss over the tracked parameters, plus damping·I.

    damping:  λ added to the diagonal. H is the Hessian of *loss_fn* (the per-example losses),
              so weight decay applied by the optimizer (not written into loss_fn) is not in it:
              a model trained with L2 coefficient α needs damping=α — with the default 0 its
              Hessian is often indefinite and the scores unrelated to leave-one-out. Weight decay
              written into loss_fn is already in H (then keep damping=0).
    max_dim:  refuse models whose tracked parameter count exceeds this (H is d × d).
    """

    damping: float = option(0.0, "a fixed lambda for every layer instead of the rule (0 = undamped; exact: its damping, default 0)")
    max_dim: int = option(20_000, "refuse models whose tracked parameter count exceeds this",
                          flag="--exact-max-dim")
    name: str = "exact"

    def fit(self, train, ctx: FitContext | None = None) -> Preconditioner:
        if ctx is None or ctx.model is None or ctx.train_loader is None:
            raise ConfigError("ExactHessian needs the model and the train loader: call Attributor.featurize(loader), "
                              "or Attributor.from_store(..., train_loader=loader).")
        require_kind("ExactHessian", ctx.compressor, {"identity", "dropout"})
        names = [pn for l in ctx.layers for pn in l.param_names]
        d = sum(l.dim for l in ctx.layers)
        if d > self.max_dim:
            raise ConfigError(f"ExactHessian on {d} tracked parameters would build a {d}×{d} matrix; "
                              f"it is meant for small models (max_dim={self.max_dim}). Use GaussNewton.")
        if self.damping < 0:
            raise ConfigError(f"damping must be ≥ 0, got {self.damping}")
        h, n = full_hessian(ctx, names)
        h = h.cpu() / n
        idx_t, fac_t, _ = kept_coordinates(ctx)
        hs = h[idx_t][:, idx_t] * fac_t[:, None] * fac_t[None, :]
        hs = hs + self.damping * torch.eye(hs.shape[0], dtype=torch.float64)
        L, info = torch.linalg.cholesky_ex(hs)
        if int(info) == 0:
            m = torch.cholesky_inverse(L)
        else:
            warnings.warn("the exact Hessian (+ damping) is not positive definite. If the model was trained "
                          "with weight decay α by the optimizer (not inside loss_fn), the loss_fn Hessian lacks it: "
                          "pass ExactHessian(damping=α). Otherwise the loss is not convex at these parameters (or "
                          "the model is under-trained). Solving with LU anyway; influence-function assumptions do "
                          "not hold here.", stacklevel=2)
            m = torch.linalg.inv(hs)
        layers = tuple(l.name for l in ctx.layers)
        return Preconditioner(estimator_signature(self), train.n,
                              [Block(layers, m, damping={l: self.damping for l in layers})])
