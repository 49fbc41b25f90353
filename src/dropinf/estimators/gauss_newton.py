"""Per-layer damped Gauss-Newton influence in the compressed space (paper eq. 3).

For each tracked layer l with train features G_l ∈ R^{n×r_l}:

    H̃_l = (1/n) G_lᵀ G_l + λ_l I,   λ_l = damping_factor · Σ_i ‖g̃_il‖² / (n·D_l)  (paper App. D.1)

D_l = r_l for Identity/Dropout (λ_l is 0.1 × the mean squared compressed entry) and D_l = d_l
for the norm-preserving projections Gaussian/LoGra (so λ_l estimates the paper's rule on full
gradients; with the plain mean over r_l entries, Gaussian with r ≫ d would be damped d/r times
less than Orig and would not approach it).
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
from .base import FitContext, RowScores, cholesky_jitter, store_damping, stream_stats
from .linalg import gram_cols, gram_rows, rows_times, sumsq


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
            ss = sumsq(g)
            lam = self.damping if self.damping is not None else self.damping_factor * ss / (n * train.damping_dim(name))
            if _dead(name, lam, ss):
                continue
            if g.shape[1] <= n:
                pre[name] = rows_times(g, _damped_inverse(gram_rows(g), n, lam, name))
            else:  # Woodbury: G H̃⁻¹ = n (GGᵀ + nλI)⁻¹ G, kept as the n×n factor only
                k = gram_cols(g) + n * lam * torch.eye(n, dtype=torch.float64)
                L = cholesky_jitter(k, f"Woodbury kernel of layer {name!r}")
                kernel[name] = (n * torch.cholesky_inverse(L)).float()
        return RowScores(pre, train, kernel)

    def fit_stream(self, store) -> dict[str, torch.Tensor]:
        """M_l = H̃_l⁻¹ (r_l × r_l, float64) from a FeatureStore in one streamed pass."""
        sums, grams, n = stream_stats(store)
        lams = store_damping(store, sums, n, self.damping_factor, self.damping)
        out = {}
        for name, gram in grams.items():
            if not _dead(name, lams[name], sums[name]):
                out[name] = _damped_inverse(gram, n, lams[name], name)
        return out


def _dead(name: str, lam: float, sumsq: float) -> bool:
    """True (with a warning) when a layer's compressed gradients are all zero on the train set."""
    if lam <= 0.0 or sumsq == 0.0:
        warnings.warn(f"layer {name!r}: every compressed gradient entry is zero on the train set "
                      f"(λ = 0); it contributes nothing and is dropped from the scores.", stacklevel=3)
        return True
    return False


def _damped_inverse(gram: torch.Tensor, n: int, lam: float, name: str) -> torch.Tensor:
    """H̃⁻¹ = (gram/n + λI)⁻¹ in float64, by Cholesky (jitter + warning if it fails)."""
    h = gram / n + lam * torch.eye(gram.shape[0], dtype=torch.float64)
    return torch.cholesky_inverse(cholesky_jitter(h, f"H̃ of layer {name!r}"))

