"""Estimators: what stands for M ≈ H̃⁻¹ in I(q, i) = − g̃_qᵀ M g̃_i. Every fit returns one
Preconditioner (estimators.preconditioner).

GaussNewton (paper eq. 3), ExactHessian (reference), LiSSA (eq. 7–8), DataInf (eq. 9–10),
GradDot (Hessian-free).
"""

from .base import Estimator, FitContext
from .damping import choose_damping
from .datainf import DataInf
from .exact import ExactHessian
from .gauss_newton import GaussNewton
from .graddot import GradDot
from .lissa import LiSSA
from .preconditioner import Block, Preconditioner

__all__ = ["choose_damping", "Estimator", "FitContext", "Block", "Preconditioner", "DataInf", "ExactHessian", "GaussNewton",
           "GradDot", "LiSSA"]
