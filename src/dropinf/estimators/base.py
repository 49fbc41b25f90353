"""The Estimator seam: train features in, a fitted preconditioner out, scores for any query.

Score convention (paper eq. 1/3), for every estimator:

    I(q, i) = − g̃_qᵀ H̃⁻¹ g̃_i        array shape (n_query, n_train)

I > 0: up-weighting training example i *raises* query q's loss (i is harmful to q);
I < 0: i helps q. Estimators differ only in what stands for H̃⁻¹.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, runtime_checkable

import torch
from torch import nn

from ..capture.layers import LayerSpec
from ..errors import IncompatibleMethodError
from ..store.features import Features
from .linalg import gram_cols, sumsq, times_gt


@dataclass
class FitContext:
    """What an estimator may need besides the train features (ExactHessian and model-HVP LiSSA
    re-run the model)."""

    model: nn.Module
    loss_fn: Callable
    layers: list[LayerSpec]
    compressors: dict
    compressor: Any
    train_loader: Optional[Any] = None
    progress: bool = True


@runtime_checkable
class Fitted(Protocol):
    def score(self, query: Features) -> torch.Tensor:
        """(n_query, n_train) float32 scores with the sign convention above."""
        ...

    def self_scores(self) -> torch.Tensor:
        """(n_train,) I(i, i)."""
        ...


@runtime_checkable
class Estimator(Protocol):
    name: str

    def fit(self, train: Features, ctx: FitContext) -> Fitted: ...


def require_kind(estimator: str, compressor: Any, allowed: set[str]) -> None:
    kind = getattr(compressor, "kind", type(compressor).__name__)
    if kind not in allowed:
        raise IncompatibleMethodError(
            f"{estimator} cannot run on {kind!r} features; it supports compressors {sorted(allowed)}.")


def cholesky_jitter(h: torch.Tensor, what: str) -> torch.Tensor:
    """Cholesky factor of symmetric h; on failure add growing jitter to the diagonal and warn."""
    L, info = torch.linalg.cholesky_ex(h)
    if int(info) == 0:
        return L
    scale = float(h.diagonal().abs().mean()) or 1.0
    for k in range(-10, 1):
        jitter = scale * 10.0**k
        L, info = torch.linalg.cholesky_ex(h + jitter * torch.eye(h.shape[0], dtype=h.dtype, device=h.device))
        if int(info) == 0:
            warnings.warn(f"Cholesky of {what} failed (matrix not positive definite); added jitter "
                          f"{jitter:.3g} to its diagonal. Scores are approximate; raise damping "
                          f"if this persists.", stacklevel=3)
            return L
    raise torch.linalg.LinAlgError(f"Cholesky of {what} failed even with jitter; the matrix has "
                                   f"non-finite entries or damping is far too small.")


def paper_damping(g: torch.Tensor, factor: float = 0.1, denom: int | None = None) -> float:
    """λ_l = factor · Σ_i ‖g̃_il‖² / (n · D_l) (paper App. D.1). D_l defaults to r_l, giving the
    mean squared compressed entry; see Features.damping_dims for projections."""
    if not g.numel():
        return 0.0
    return factor * sumsq(g) / (g.shape[0] * (denom if denom else g.shape[1]))


class RowScores:
    """Fitted estimator whose scores are −Σ_l Q_l T_lᵀ for preconditioned train features T_l,
    or, for kernel blocks (Woodbury, r_l > n), −Σ_l (Q_l G_lᵀ) M_l with an n×n matrix M_l (so
    the n×r_l preconditioned copy of G_l is never stored)."""

    def __init__(self, pre: dict[str, torch.Tensor], train: Features,
                 kernel: dict[str, torch.Tensor] | None = None):
        self.pre = pre  # layer -> (n, r_l) float32
        self.kernel = kernel or {}  # layer -> (n, n) float32, symmetric
        self.train = train

    def score(self, query: Features) -> torch.Tensor:
        out = torch.zeros(query.n, self.train.n)
        for name, t in self.pre.items():
            out += query.data[name].to(t.dtype) @ t.T
        for name, m in self.kernel.items():
            out += (query.data[name] @ self.train.data[name].T) @ m
        return -out

    def self_scores(self) -> torch.Tensor:
        out = torch.zeros(self.train.n, dtype=torch.float64)
        for name, t in self.pre.items():
            for s in range(0, self.train.n, 4096):
                out[s:s + 4096] += (self.train.data[name][s:s + 4096].double() * t[s:s + 4096].double()).sum(1)
        for name, m in self.kernel.items():
            out += (gram_cols(self.train.data[name]) * m.double()).sum(1)
        return (-out).float()


class SolveScores:
    """Fitted estimator defined by an approximate iHVP on query rows: S = solve(Q) (per layer),
    scores = −Σ_l S_l G_lᵀ. Used by LiSSA, DataInf and GradDot."""

    def __init__(self, solve: Callable[[dict], dict], train: Features, chunk: int = 1024):
        self.solve, self.train, self.chunk = solve, train, chunk

    def score(self, query: Features) -> torch.Tensor:
        s = self.solve({k: v.double() for k, v in query.data.items()})
        out = torch.zeros(query.n, self.train.n, dtype=torch.float64)
        for name, sl in s.items():
            out += times_gt(sl, self.train.data[name])
        return (-out).float()

    def self_scores(self) -> torch.Tensor:
        parts = []
        for start in range(0, self.train.n, self.chunk):
            rows = {k: v[start:start + self.chunk].double() for k, v in self.train.data.items()}
            s = self.solve(rows)
            parts.append(-sum((s[k] * rows[k]).sum(1) for k in s))
        return torch.cat(parts).float()


def layer_dampings(train: Features, factor: float, fixed: float | None = None) -> dict[str, float]:
    """λ_l per layer: fixed if given, else factor · mean squared entry (paper App. D.1)."""
    return {k: (fixed if fixed is not None else paper_damping(v, factor, train.damping_dim(k)))
            for k, v in train.data.items()}


def stream_stats(store, weights_fn=None, gram: bool = True, progress: bool = False) -> tuple[dict, dict, int]:
    """One pass over a FeatureStore: per layer Σ‖g‖² and (if gram) Gᵀ diag(w) G with
    w = weights_fn(layer, chunk) or 1, in float64. Returns (sumsq, gram, n). Memory: one chunk."""
    from tqdm.auto import tqdm

    sums, grams, n = {}, {}, 0
    for _, chunk in tqdm(store.iter_chunks(), total=store.n_chunks, desc="precondition", leave=False,
                         disable=not progress):
        for name, g in chunk.items():
            g64 = g.double()
            sums[name] = sums.get(name, 0.0) + float((g64 * g64).sum())
            if gram:
                gw = g64 if weights_fn is None else g64 * weights_fn(name, g64)[:, None]
                grams[name] = grams.get(name, 0) + gw.T @ g64
        n += next(iter(chunk.values())).shape[0]
    return sums, grams, n


def store_damping(store, sums: dict, n: int, factor: float, fixed: float | None) -> dict:
    dd = {l.name: l.damping_dim for l in store.layers}
    return {k: (fixed if fixed is not None else factor * s / (n * dd[k])) for k, s in sums.items()}
