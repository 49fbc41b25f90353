"""One registry of method names, used by the command line, the signatures and the cache keys: one
spelling per method (``Estimator.name`` / ``Compressor.kind`` equal the key here)."""

from __future__ import annotations

from .compress import Dropout, Gaussian, Identity, LoGra
from .estimators import DataInf, ExactHessian, GaussNewton, GradDot, LiSSA

#: paper eq. 3 (default), eq. 9-10, eq. 7-8, plain gradient dot product, the true Hessian
ESTIMATORS = {"gauss-newton": GaussNewton, "datainf": DataInf, "lissa": LiSSA, "hessian-free": GradDot,
              "exact": ExactHessian}
#: the paper's method (default), TRAK-style projection, LoGra's Kronecker projection, Orig
COMPRESSORS = {"dropout": Dropout, "gaussian": Gaussian, "logra": LoGra, "identity": Identity}
