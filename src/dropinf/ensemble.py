"""Mask ensembles: K disjoint coordinate sets of one capture, each its own influence estimate.

Capture once with ``Dropout(r=K·m)`` (rotated or not); ``GaussNewton(members=K)`` splits the K·m
kept coordinates of every layer into K disjoint random groups of m (estimators.members) and fits
each as its own H̃ and damping — one preconditioner, block-diagonal within each layer, so the
ensemble runs through every path of the library (stores, top-k, reports, torchrun, the CLI's
``--members``). The ensemble score is the members' mean; ``Attributor.ensemble`` returns each
member's scores (``EnsembleScores``: the spread across members is a per-score uncertainty a single
mask cannot give). Against one mask of K·m at equal bytes, an ensemble trades the cross-group terms
of H̃ for that uncertainty; ``dropinf reproduce lds`` measures both.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError
from .estimators.members import layer_member_seed, member_columns
from .store.features import Features


def member_features(feats: Features, members: int, seed: int = 0) -> list[Features]:
    """Every layer's columns split as ``GaussNewton(members=members, member_seed=seed)`` splits them:
    K Features of ≈ r/K columns (for fitting the members one by one, e.g. to check the ensemble)."""
    names = list(feats.data)
    cols = {n: member_columns(v.shape[1], members, layer_member_seed(seed, names, n)) for n, v in feats.data.items()}
    out = []
    for k in range(members):
        data = {name: v[:, cols[name][k]].contiguous() for name, v in feats.data.items()}
        sig = dict(feats.signature, member=f"{k}/{members}/{seed}")
        out.append(Features(data, sig, feats.losses, {n: d.shape[1] for n, d in data.items()}, feats.ids))
    return out


@dataclass
class EnsembleScores:
    """members: (K, q, n) scores of each member (dropinf's sign: positive = harmful)."""

    members: np.ndarray

    @property
    def mean(self) -> np.ndarray:
        return self.members.astype(np.float64).mean(0)

    @property
    def std(self) -> np.ndarray:
        """(q, n) standard deviation across members: the spread of one score over index sets."""
        return self.members.astype(np.float64).std(0, ddof=1) if self.members.shape[0] > 1 else np.zeros_like(self.members[0])

    def topk_stability(self, k: int = 10, harmful: bool = True) -> float:
        """Mean over queries and members of |top-k(member) ∩ top-k(ensemble)| / k (1 = every member
        names the same k training examples as the ensemble)."""
        sign = 1.0 if harmful else -1.0
        k = min(k, self.members.shape[2])
        ref = np.argpartition(-sign * self.mean, k - 1, axis=1)[:, :k]
        overlaps = []
        for m in self.members:
            top = np.argpartition(-sign * m, k - 1, axis=1)[:, :k]
            overlaps += [len(np.intersect1d(a, b)) / k for a, b in zip(top, ref)]
        return float(np.mean(overlaps))


def score_ensemble(train, query, estimator, members: int, seed: int = 0, options=None) -> EnsembleScores:
    """Each member's scores of ``estimator`` (GaussNewton) fitted as a K-member ensemble on ``train``
    rows (any RowSource) for ``query`` rows: one fit (``GaussNewton(members=K)``), K scorings."""
    from .score.scorer import ScoreOptions, Scorer
    if not any(f.name == "members" for f in dataclasses.fields(estimator)):
        raise ConfigError(f"{type(estimator).__name__} has no members option; mask ensembles are GaussNewton's")
    pre = dataclasses.replace(estimator, members=members, member_seed=seed).fit(train)
    return EnsembleScores(np.stack([Scorer(pre.member(k), train, options or ScoreOptions(), progress=False).dense(query)
                                    for k in range(members)]))
