"""One registry of method names, used by the command line, the signatures and the cache keys: one
spelling per method (``Estimator.name`` / ``Compressor.kind`` equal the key here)."""

from __future__ import annotations

from .compress import Dropout, Gaussian, Identity, LoGra
from .compress.dropout import DEFAULT_HEAD_FACTOR
from .estimators import DataInf, ExactHessian, GaussNewton, GradDot, LiSSA

#: paper eq. 3 (the default), eq. 9-10, eq. 7-8, plain gradient dot product, the true Hessian
ESTIMATORS = {"gauss-newton": GaussNewton, "datainf": DataInf, "lissa": LiSSA, "hessian-free": GradDot,
              "exact": ExactHessian}
#: the paper's method (default), TRAK-style projection, LoGra's Kronecker projection, Orig
COMPRESSORS = {"dropout": Dropout, "gaussian": Gaussian, "logra": LoGra, "identity": Identity}


#: members of the default estimator: Dropout's DEFAULT_R coordinates in masks of 512
DEFAULT_MEMBERS = 4
#: the default estimator's damping of the model's output layer, relative to the rule (GaussNewton.head_damping)
DEFAULT_HEAD_DAMPING = 0.03


def default_setting(seed: int = 0):
    """(compressor, estimator) that ``Attributor(model, loss_fn)`` uses: ``Dropout(r=2048, seed,
    head_factor=4)`` — 2048 coordinates per layer and 4 × 2048 on the model's output layer when it is
    tracked (each capped at the layer's size) — its kept coordinates split into four members
    (``GaussNewton(members=4, head_damping=0.03)``: four disjoint masks per layer, each its own H̃
    and λ, scores averaged) with the measured damping (damping_rn=40, and 0.03 × the rule's λ on the
    output layer) — chosen by the sweep in benchmarks/defaults.py over
    three LDS tasks and two mislabel tasks (README, "The default and how it was chosen"). The
    estimator is the same for every seed (the mask seed already draws new coordinates), so a store
    scored from Python and from the command line gets the same fit."""
    return Dropout(seed=seed, head_factor=DEFAULT_HEAD_FACTOR), default_estimator(None)


def default_estimator(compressor):
    """The estimator used when none is given: the default setting's for a Dropout compressor (or
    none), else ``GaussNewton()`` with one member (an Identity/Gaussian/LoGra fit is not split)."""
    if compressor is None or isinstance(compressor, Dropout):
        return GaussNewton(members=DEFAULT_MEMBERS, head_damping=DEFAULT_HEAD_DAMPING)
    return GaussNewton()


#: the mislabel estimator's group size: coordinates per member (GaussNewton(member_size=...))
MISLABEL_MEMBER_SIZE = 8


def mislabel_estimator(compressor=None):
    """The estimator ``Attributor.mislabeled`` fits on the train rows when none is given: for Dropout
    rows (or none given), ``GaussNewton(member_size=8)`` — every layer's kept coordinates split into
    groups of 8, each its own H̃ and λ: a nearly diagonal preconditioner, measured best for finding
    flipped labels (README, "The default and how it was chosen"); for other compressors, their
    default estimator (the split is measured on coordinate masks only)."""
    if compressor is None or isinstance(compressor, Dropout):
        return GaussNewton(member_size=MISLABEL_MEMBER_SIZE)
    return default_estimator(compressor)


def mislabel_setting(seed: int = 0):
    """(compressor, estimator) measured best for finding mislabeled training examples by their
    influence on a clean validation loss: the default's ``Dropout(r=2048, seed, head_factor=4)`` with
    ``mislabel_estimator`` (groups of 8 coordinates) — what ``Attributor.mislabeled`` uses on the
    default's rows, so one capture serves both jobs. It ranks pairs badly for attribution (LDS):
    use it for mislabel detection only."""
    return Dropout(seed=seed, head_factor=DEFAULT_HEAD_FACTOR), mislabel_estimator(None)


def paper_setting(seed: int = 0):
    """The paper's setting: ``Dropout(r=16)`` and GaussNewton at the paper's damping rule
    (λ_l = 0.1 × the mean squared compressed entry, App. D.1; damping_rn=0), one mask."""
    return Dropout(r=16, seed=seed), GaussNewton(damping_rn=0.0)
