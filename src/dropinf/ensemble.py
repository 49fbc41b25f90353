"""Mask ensembles: K disjoint coordinate sets of one capture, each its own influence estimate.

Capture once with ``Dropout(r=K·m)`` (rotated or not); the K·m kept coordinates of every layer are
split into K disjoint random groups of m (``member_features``). Each group is a Dropout feature
set of its own — an independent-looking index set of m coordinates — fitted and scored on its
own (its own per-layer H̃ and damping); the ensemble score is the members' mean, and the spread
across members is a per-score uncertainty a single mask cannot give. Against one mask of K·m at
equal bytes, an ensemble trades the cross-group terms of H̃ (block-diagonal within a layer) for
that uncertainty; ``dropinf reproduce lds`` measures both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import ConfigError
from .store.features import Features


def member_columns(width: int, members: int, seed: int = 0) -> list[torch.Tensor]:
    """A seeded random partition of range(width) into ``members`` groups of near-equal size (sorted)."""
    if members < 1 or members > width:
        raise ConfigError(f"members must be between 1 and the layer's {width} kept coordinates, got {members}")
    perm = torch.randperm(width, generator=torch.Generator().manual_seed(seed))
    return [torch.sort(perm[k::members]).values for k in range(members)]


def member_features(feats: Features, members: int, seed: int = 0) -> list[Features]:
    """Split every layer's columns into ``members`` disjoint groups: K Features of ≈ r/K columns."""
    out = []
    cols = {name: member_columns(v.shape[1], members, seed + j) for j, (name, v) in enumerate(sorted(feats.data.items()))}
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


def score_ensemble(train: Features, query: Features, estimator, members: int, seed: int = 0,
                   options=None) -> EnsembleScores:
    """Fit ``estimator`` on each member's train features and score its query features."""
    from .score.scorer import ScoreOptions, Scorer
    tr, qu = member_features(train, members, seed), member_features(query, members, seed)
    out = []
    for t, q in zip(tr, qu):
        pre = estimator.fit(t)
        out.append(Scorer(pre, t, options or ScoreOptions(), progress=False).dense(q))
    return EnsembleScores(np.stack([np.asarray(s, dtype=np.float32) for s in out]))
