"""Estimators: what stands for H̃⁻¹ in I(q, i) = − g̃_qᵀ H̃⁻¹ g̃_i.

GaussNewton (paper eq. 3), ExactHessian (reference), LiSSA (eq. 7–8), DataInf (eq. 9–10),
GradDot (Hessian-free).
"""

from .base import Estimator, FitContext, Fitted
from .datainf import DataInf
from .exact import ExactHessian
from .gauss_newton import GaussNewton
from .graddot import GradDot
from .lissa import LiSSA

__all__ = ["Estimator", "FitContext", "Fitted", "DataInf", "ExactHessian", "GaussNewton", "GradDot", "LiSSA"]
