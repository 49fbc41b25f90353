"""LiSSA (Agarwal et al. 2017; paper App. B, eq. 7–8): the truncated iHVP series, as a matrix.

With A = H̃ + λI and v a query gradient, the recursion

    s_0 = v,   s_{j+1} = v + (I − A/scale) s_j,   iHVP ≈ s_J / scale

gives s_J/scale = p(A) v with the polynomial p(x) = (1/scale) Σ_{j=0}^{J} (1 − x/scale)^j, so the
fitted preconditioner is M = p(A) = V p(Λ) Vᵀ from the eigendecomposition A = V Λ Vᵀ: exactly
what J steps of the recursion give for every query, fitted once (and O(n·r²) self-influence).
It converges to A⁻¹ as J grows whenever scale ≥ λ_max(A). scale = 1 is the paper's recursion
verbatim; the default takes 1.1 × λ_max(A) (largest over layers, as one recursion over all
layers would), which guarantees convergence. The paper's setting is 10 iterations (the default):
far from converged on ill-conditioned problems, which is why LiSSA scores near chance in the
paper's Table 1.

hvp="gauss-newton": A_l = (1/n)G_lᵀG_l + λ_l I per layer (kernel form for r_l > n: p acts on the
                    eigenvalues λ + s/n of the row space of G, p(λ) elsewhere).
hvp="model":        A = the true Hessian of the mean train loss over the tracked parameters,
                    restricted to the kept coordinates (all layers jointly; Identity or Dropout
                    features only), built column by column from autograd HVPs, + λ_l I.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..options import option
from ..errors import ConfigError
from .base import FitContext, ctx_or_default, dead_layer, kernel_layers, layer_damping, require_kind
from .preconditioner import Block, Preconditioner, estimator_signature
from .model_hessian import restricted_hessian
from .stats import gram_pass


def series(x: torch.Tensor, scale: float, iterations: int) -> torch.Tensor:
    """p(x) = (1/scale) Σ_{j=0}^{J} (1 − x/scale)^j, elementwise (no division by x)."""
    t = 1.0 - x / scale
    out, power = torch.ones_like(x), torch.ones_like(x)
    for _ in range(iterations):
        power = power * t
        out = out + power
    return out / scale


@dataclass(frozen=True)
class LiSSA:
    """iterations: recursion steps (paper: 10).  scale: None → 1.1 × λ_max(A); a number uses that
    scale (1.0 = the paper's unscaled recursion).  hvp: "gauss-newton" or "model".
    damping_factor / damping: λ_l as in GaussNewton."""

    iterations: int = option(10, "recursion steps J")
    scale: float | None = option(None, "the scale of the recursion (default: 1.1 x the largest eigenvalue, "
                                       "convergent; 1 = the paper's literal recursion)", flag="--lissa-scale")
    hvp: Literal["gauss-newton", "model"] = option("gauss-newton", "Hessian-vector products of the compressed "
                                                   "Gauss-Newton matrix, or of the model's true Hessian",
                                                   flag="--lissa-hvp")
    damping_factor: float = option(0.1, "lambda_l = factor x mean squared compressed entry of layer l (paper App. D.1)")
    damping: float | None = option(None, "a fixed lambda for every layer instead of the rule (0 = undamped; exact: its damping, default 0)")
    name: str = "lissa"

    def fit(self, train, ctx: FitContext | None = None) -> Preconditioner:
        if self.iterations < 0:
            raise ConfigError("LiSSA iterations must be ≥ 0")
        if self.hvp not in ("gauss-newton", "model"):
            raise ConfigError(f"LiSSA hvp must be 'gauss-newton' or 'model', got {self.hvp!r}")
        ctx = ctx_or_default(ctx)
        n = train.n
        model_hvp = self.hvp == "model"
        kern = kernel_layers(train, enabled=not model_hvp)
        st = gram_pass(train, device=ctx.device, shard=ctx.shard, gram=not model_hvp, kernel_layers=kern,
                       progress=ctx.progress)
        lams = {l: layer_damping(st.sumsq[l], n, train.damping_dim(l), self.damping_factor, self.damping)
                for l in train.layer_names()}
        if model_hvp:
            return self._fit_model(train, ctx, lams)
        eig, dropped = {}, []
        for name in train.layer_names():
            if dead_layer(name, st.sumsq[name]):
                dropped.append(name)
            elif name in kern:
                s, u = torch.linalg.eigh(st.kernel_gram(name))
                eig[name] = (s.clamp_min(0), u)
            else:
                r = st.gram[name].shape[0]
                a = st.gram[name] / n + lams[name] * torch.eye(r, dtype=torch.float64, device=st.gram[name].device)
                eig[name] = torch.linalg.eigh(a)
        top = max([float(lams[l] + e[0].max() / n) if l in kern else float(e[0].max()) for l, e in eig.items()],
                  default=0.0)
        scale = self._scale(top)
        blocks = []
        for name, (e, v) in eig.items():
            lam = lams[name]
            if name in kern:   # p(A) = p(λ) I + Gᵀ U diag((p(λ + s/n) − p(λ))/s) Uᵀ G
                p_lam = float(series(torch.tensor(lam, dtype=torch.float64), scale, self.iterations))
                pos = e > e.max() * 1e-12
                d = torch.where(pos, (series(lam + e / n, scale, self.iterations) - p_lam) / e.clamp_min(1e-300),
                                torch.zeros_like(e))
                c = (v * d) @ v.T
                self_k = (v * v * (e * e * d)[None, :]).sum(1)
                blocks.append(Block((name,), None, p_lam, c.cpu(), self_k.cpu(), {name: lam}))
            else:
                blocks.append(Block((name,), ((v * series(e, scale, self.iterations)) @ v.T).cpu(),
                                    damping={name: lam}))
        return Preconditioner(estimator_signature(self), n, blocks, dropped, {"scale": scale})

    def _scale(self, top: float) -> float:
        scale = self.scale if self.scale is not None else 1.1 * top
        if not scale > 0:
            raise ConfigError(f"LiSSA scale must be > 0 (got {scale}); all train gradients are zero?")
        return float(scale)

    def _fit_model(self, train, ctx: FitContext, lams: dict) -> Preconditioner:
        require_kind("LiSSA(hvp='model')", ctx.compressor, {"identity", "dropout"})
        h, _ = restricted_hessian(ctx)
        names = [l.name for l in ctx.layers]
        diag = torch.cat([torch.full((train.layer_r(l),), lams[l], dtype=torch.float64) for l in names])
        e, v = torch.linalg.eigh(h + torch.diag(diag))
        scale = self._scale(float(e.abs().max()))
        m = (v * series(e, scale, self.iterations)) @ v.T
        return Preconditioner(estimator_signature(self), train.n, [Block(tuple(names), m, damping=lams)], [],
                              {"scale": scale})
