"""Per-layer damped Gauss-Newton influence in the compressed space (paper eq. 3).

For each tracked layer l with train features G_l ∈ R^{n×r_l}:

    H̃_l = (1/n) G_lᵀ G_l + λ_l I,   λ_l = damping_factor · mean(G_l²)   (paper App. D.1)
    I(q, i) = − Σ_l g̃_qlᵀ H̃_l⁻¹ g̃_il

Solved by Cholesky in r_l dims when r_l ≤ n, and otherwise in n dims by the Woodbury identity:
G (GᵀG/n + λI)⁻¹ = n (GGᵀ + nλI)⁻¹ G. A layer whose sampled coordinates are all zero for
every train example (λ_l = 0; e.g. border pixels of sklearn digits) contributes exactly zero and
is dropped with a warning rather than producing NaN.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..store.features import Features
from .base import FitContext, RowScores, cholesky_jitter, paper_damping


@dataclass(frozen=True)
class GaussNewton:
    """damping_factor: λ_l = damping_factor · mean squared compressed entry of layer l.
    damping: if set, a fixed λ for every layer instead of the rule."""

    damping_factor: float = 0.1
    damping: float | None = None
    name: str = "gauss-newton"

    def fit(self, train: Features, ctx: FitContext | None = None) -> RowScores:
        pre, kernel = {}, {}
        n = train.n
        for name, g in tqdm(train.data.items(), desc="precondition", disable=not getattr(ctx, "progress", False),
                            leave=False):
            lam = self.damping if self.damping is not None else paper_damping(g, self.damping_factor)
            if lam <= 0.0 or not bool((g != 0).any()):
                warnings.warn(f"layer {name!r}: every compressed gradient entry is zero on the train set "
                              f"(λ = 0); it contributes nothing and is dropped from the scores.", stacklevel=2)
                continue
            r = g.shape[1]
            if r <= n:
                h = gram(g, transpose=True) / n + lam * torch.eye(r, dtype=torch.float64)
                L = cholesky_jitter(h, f"H̃ of layer {name!r}")
                hinv = torch.cholesky_inverse(L)
                pre[name] = row_matmul(g, hinv)
            else:  # Woodbury: G H̃⁻¹ = n (GGᵀ + nλI)⁻¹ G, kept as the n×n factor only
                k = gram(g, transpose=False) + n * lam * torch.eye(n, dtype=torch.float64)
                L = cholesky_jitter(k, f"Woodbury kernel of layer {name!r}")
                kernel[name] = (n * torch.cholesky_inverse(L)).float()
        return RowScores(pre, train, kernel)


def gram(g: torch.Tensor, transpose: bool, chunk: int = 4096) -> torch.Tensor:
    """GᵀG (transpose=True, r×r) or GGᵀ (n×n) accumulated in float64 without a float64 copy of G."""
    if transpose:
        out = torch.zeros(g.shape[1], g.shape[1], dtype=torch.float64)
        for s in range(0, g.shape[0], chunk):
            c = g[s:s + chunk].double()
            out += c.T @ c
        return out
    out = torch.zeros(g.shape[0], g.shape[0], dtype=torch.float64)
    for s in range(0, g.shape[1], chunk):
        c = g[:, s:s + chunk].double()
        out += c @ c.T
    return out


def row_matmul(g: torch.Tensor, m: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """G @ M computed in float64 chunk by chunk, returned as float32."""
    return torch.cat([(g[s:s + chunk].double() @ m).float() for s in range(0, g.shape[0], chunk)], 0)
