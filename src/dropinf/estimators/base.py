"""The Estimator seam: train rows in, one fitted Preconditioner out (see preconditioner.py).

Score convention (paper eq. 1/3), for every estimator:

    I(q, i) = − g̃_qᵀ M g̃_i        array shape (n_query, n_train)

I > 0: up-weighting training example i *raises* query q's loss (i is harmful to q);
I < 0: i helps q. Estimators differ only in what stands for M ≈ H̃⁻¹.

Every estimator fits from a RowSource (in-memory Features or an on-disk FeatureStore) by
streaming its rows (estimators.stats), on the device and process split given by FitContext.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, runtime_checkable

import torch
from torch import nn

from ..capture.layers import LayerSpec
from ..dist import Shard
from ..errors import ConfigError, IncompatibleMethodError
from .preconditioner import Preconditioner


@dataclass
class FitContext:
    """What an estimator may need besides the train rows.

    device:  where statistics and factorisations run (default CPU)
    fit_memory_mb: the statistics (Gram matrices, kernel rows) held at once; more layers than fit
             are fitted in several streamed passes
    shard:   (rank, world) under torchrun (dist.Shard): this process reads chunks k ≡ rank (mod world)
    model, loss_fn, layers, compressors, compressor, train_loader: for the estimators that re-run
             the model (ExactHessian, LiSSA(hvp="model")); to_device moves a batch to the model."""

    model: Optional[nn.Module] = None
    loss_fn: Optional[Callable] = None
    layers: list[LayerSpec] = field(default_factory=list)
    compressors: dict = field(default_factory=dict)
    compressor: Any = None
    train_loader: Optional[Any] = None
    progress: bool = False
    device: Any = "cpu"
    shard: Shard = Shard()
    to_device: Callable = lambda b: b
    fit_memory_mb: float = 2048.0     # statistics held at once (estimators.stats.gram_groups)


@runtime_checkable
class Estimator(Protocol):
    name: str

    def fit(self, train, ctx: FitContext | None = None) -> Preconditioner:
        """Fit on a RowSource; return the preconditioner M (one representation for all)."""
        ...

    # Optional: ``check(train, ctx)`` raises fit's option errors without reading a row. An
    # estimator that has it (GaussNewton) is fitted on first use when the rows are in memory
    # (Attributor.featurize / use_features); the others are fitted at once.


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


def spd_inverse(h: torch.Tensor, what: str) -> torch.Tensor:
    return torch.cholesky_inverse(cholesky_jitter(h, what))


def layer_damping(sumsq: float, n: int, damping_dim: int, factor: float, fixed: float | None) -> float:
    """λ_l: ``fixed`` if given (0 = undamped), else factor · Σ_i ‖g̃_il‖² / (n · D_l) (paper App. D.1;
    D_l = r_l for coordinate sampling, d_l for norm-preserving projections)."""
    if fixed is not None:
        if fixed < 0:
            raise ConfigError(f"damping must be ≥ 0, got {fixed}")
        return float(fixed)
    return factor * sumsq / (n * damping_dim)


def dead_layer(name: str, sumsq: float) -> bool:
    """True (with a warning) when a layer's compressed gradients are all zero on the train set."""
    if sumsq == 0.0:
        warnings.warn(f"layer {name!r}: every compressed gradient entry is zero on the train set; it "
                      f"contributes nothing and is dropped from the scores.", stacklevel=4)
        return True
    return False


def kernel_layers(train, enabled: bool = True) -> list[str]:
    """Layers with r_l > n: fitted in the n-dimensional kernel (Woodbury) form."""
    return [l for l in train.layer_names() if enabled and train.layer_r(l) > train.n]


def ctx_or_default(ctx: FitContext | None) -> FitContext:
    return ctx if ctx is not None else FitContext()
