"""DataInf (Kwon et al. 2023; paper App. B, eq. 9–10), per layer, linear in r_l.

Swapping inversion and averaging, (1/n Σ_k g_k g_kᵀ + λI)⁻¹ ≈ 1/n Σ_k (g_k g_kᵀ + λI)⁻¹
= 1/(nλ) Σ_k (I − g_k g_kᵀ / (λ + g_kᵀ g_k))   (Sherman–Morrison),
so for query rows V (m × r):  H̃⁻¹v = 1/(nλ) (n·V − (C ∘ w) G),  C = V Gᵀ, w_k = 1/(λ + ‖g_k‖²).
Damping: DataInf's rule λ_l = damping_factor · mean squared entry of layer l (0.1 in its code).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..store.features import Features
from .base import FitContext, SolveScores, layer_dampings, store_damping, stream_stats
from .linalg import row_norms_sq, times_g, times_gt


@dataclass(frozen=True)
class DataInf:
    damping_factor: float = 0.1
    damping: float | None = None
    name: str = "datainf"

    def fit(self, train: Features, ctx: FitContext | None = None) -> SolveScores:
        lams = layer_dampings(train, self.damping_factor, self.damping)
        n = train.n
        weights = {}
        for k, g in train.data.items():
            weights[k] = 1.0 / (lams[k] + row_norms_sq(g)) if lams[k] > 0 else None

        def solve(q: dict) -> dict:
            out = {}
            for k, v in q.items():
                if weights[k] is None:  # dead layer: all train gradients zero, contributes nothing
                    out[k] = torch.zeros_like(v)
                    continue
                g = train.data[k]
                c = times_gt(v, g)
                out[k] = (n * v - times_g(c * weights[k], g)) / (n * lams[k])
            return out

        return SolveScores(solve, train)

    def fit_stream(self, store) -> dict[str, torch.Tensor]:
        """M_l = (1/λ)(I − (1/n) Σ_k w_k g_k g_kᵀ) from two streamed passes (eq. 10 as a matrix)."""
        sums, _, n = stream_stats(store, gram=False)
        lams = store_damping(store, sums, n, self.damping_factor, self.damping)
        _, grams, _ = stream_stats(store, weights_fn=lambda name, g: 1.0 / (lams[name] + (g * g).sum(1)))
        out = {}
        for name, gram in grams.items():
            if lams[name] <= 0.0:
                continue
            eye = torch.eye(gram.shape[0], dtype=torch.float64)
            out[name] = (eye - gram / n) / lams[name]
        return out
