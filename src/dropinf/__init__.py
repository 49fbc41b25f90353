"""dropinf: training-data attribution with dropout-compressed influence functions.

Scores are arrays of shape (n_query, n_train); scores[q, i] = −g̃_qᵀ H̃⁻¹ g̃_i, positive when
up-weighting train example i raises query q's loss (harmful), negative when it helps.
"""

from ._version import __version__
from .attribute import Attributor, CaptureOptions
from .compress import Dropout, Gaussian, Identity, LoGra
from .errors import (CaptureCheckError, CaptureError, ConfigError, DropinfError, EmptyDataError, FeatureMismatchError,
                     IncompatibleMethodError, LossShapeError, MissingDataError, NonFiniteGradientError,
                     NoTrackableLayersError, StoreError)
from .estimators import DataInf, ExactHessian, GaussNewton, GradDot, LiSSA, Preconditioner
from .methods import default_setting, mislabel_estimator, mislabel_setting, paper_setting
from .score import ScoreOptions, TopK
from .store import Features
from .report.options import ReportOptions
from .store.budget import BudgetOptions, split_budget
from .store.featurizer import Featurizer
from .store.writer import StoreOptions


__all__ = ["Attributor", "Featurizer", "default_setting", "mislabel_estimator", "mislabel_setting", "paper_setting", "split_budget", "BudgetOptions", "CaptureOptions", "ScoreOptions", "StoreOptions",
           "ReportOptions", "TopK", "Preconditioner", "Dropout", "Gaussian", "Identity", "LoGra", "DataInf",
           "ExactHessian", "GaussNewton", "GradDot", "LiSSA", "Features", "DropinfError", "CaptureCheckError", "CaptureError", "ConfigError", "EmptyDataError",
           "FeatureMismatchError", "IncompatibleMethodError", "LossShapeError", "MissingDataError",
           "NonFiniteGradientError", "NoTrackableLayersError", "StoreError"]
