"""Estimators: what stands for H̃⁻¹ in I(q, i) = − g̃_qᵀ H̃⁻¹ g̃_i."""

from .base import Estimator, FitContext, Fitted
from .exact import ExactHessian
from .gauss_newton import GaussNewton

__all__ = ["Estimator", "FitContext", "Fitted", "ExactHessian", "GaussNewton"]
