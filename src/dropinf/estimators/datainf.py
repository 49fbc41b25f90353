"""DataInf (Kwon et al. 2023; paper App. B, eq. 9–10), per layer.

Swapping inversion and averaging, (1/n Σ_k g_k g_kᵀ + λI)⁻¹ ≈ 1/n Σ_k (g_k g_kᵀ + λI)⁻¹
= 1/(nλ) Σ_k (I − g_k g_kᵀ / (λ + g_kᵀ g_k))   (Sherman–Morrison), i.e. the matrix

    M_l = (1/λ) (I − (1/n) G_lᵀ diag(w) G_l),   w_k = 1/(λ + ‖g_k‖²)         (eq. 10)

fitted in two streamed passes (Σ‖g‖² for λ, then the weighted Gram; one pass with a fixed
damping). For r_l > n the same M in kernel form: a = 1/λ, C = −diag(w)/(nλ).
Damping: DataInf's rule λ_l = damping_factor · mean squared entry of layer l (0.1 in its code).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..options import option
from ..errors import ConfigError
from .base import FitContext, ctx_or_default, dead_layer, kernel_layers, layer_damping
from .preconditioner import Block, Preconditioner, estimator_signature
from .stats import gram_pass


@dataclass(frozen=True)
class DataInf:
    damping_factor: float = option(0.1, "lambda_l = factor x mean squared compressed entry of layer l (paper App. D.1)")
    damping: float | None = option(None, "a fixed lambda for every layer instead of the rule (0 = undamped; exact: its damping, default 0)")
    name: str = "datainf"

    def fit(self, train, ctx: FitContext | None = None) -> Preconditioner:
        ctx = ctx_or_default(ctx)
        n, names = train.n, train.layer_names()
        kern = kernel_layers(train)
        kw = dict(device=ctx.device, shard=ctx.shard, progress=ctx.progress)
        if self.damping is None:
            first = gram_pass(train, gram=False, kernel_layers=kern, **kw)
            sums = first.sumsq
        else:
            first, sums = None, None
        lams: dict[str, float] = {}

        def weights(name, g):
            return 1.0 / (lams[name] + (g.double() * g.double()).sum(1))

        if sums is not None:
            lams.update({l: layer_damping(sums[l], n, train.damping_dim(l), self.damping_factor, None)
                         for l in names})
            dense = [l for l in names if l not in kern]
            st = gram_pass(train, weights=weights, kernel_layers=kern, **kw) if dense else first
        else:
            lams.update({l: layer_damping(0.0, n, 1, 0.0, self.damping) for l in names})
            st = gram_pass(train, weights=weights, kernel_layers=kern, **kw)
        blocks, dropped = [], []
        for name in names:
            if dead_layer(name, st.sumsq[name]):
                dropped.append(name)
                continue
            lam = lams[name]
            if lam <= 0:
                raise ConfigError(f"DataInf needs damping > 0 (its M has 1/λ); layer {name!r} got λ={lam}.")
            if name in kern:
                w = 1.0 / (lam + st.row_sumsq[name])
                k = st.kernel_gram(name)
                c = torch.diag(-w / (n * lam))
                self_k = -(k * k * w[None, :]).sum(1) / (n * lam)
                blocks.append(Block((name,), None, 1.0 / lam, c.cpu(), self_k.cpu(), {name: lam}))
            else:
                gram = st.gram[name]
                eye = torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)
                blocks.append(Block((name,), ((eye - gram / n) / lam).cpu(), damping={name: lam}))
        return Preconditioner(estimator_signature(self), n, blocks, dropped)
