"""Hessian-free influence (Pruthi et al. 2020; paper App. B): H̃ replaced by the identity.

I(q, i) = − g̃_qᵀ g̃_i — a plain gradient dot product, on full (Identity) or compressed features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..store.features import Features
from .base import FitContext, SolveScores


@dataclass(frozen=True)
class GradDot:
    name: str = "hessian-free"

    def fit(self, train: Features, ctx: FitContext | None = None) -> SolveScores:
        return SolveScores(lambda q: q, train)

    def fit_stream(self, store) -> dict:
        return {l.name: torch.eye(l.r, dtype=torch.float64) for l in store.layers}
