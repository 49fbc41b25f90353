"""What a fitted Attributor reads out besides scores and top-k: each ensemble member's scores,
self-influence, the mislabel ranking and token-level influence. ``Analyses`` is a mixin of
``Attributor`` (attribute.py): it uses the attributor's fitted state, its query featurizing
(``_query``), its fits (``fitted_with``) and its one scorer (``_scorer``)."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from .ensemble import EnsembleScores
from .errors import ConfigError
from .methods import mislabel_estimator
from .score.scorer import ScoreOptions
from .store.features import Features


class Analyses:
    def ensemble(self, query, reduce: Literal["none", "mean"] = "none", options: ScoreOptions | None = None,
                 measure=None) -> EnsembleScores:
        """Each member's own scores of a mask-ensemble fit (``GaussNewton(members=K)``):
        ``.members`` (K, n_query, n_train), ``.mean`` (= ``score``), ``.std`` (the spread of each
        score across members), ``.topk_stability(k)``."""
        pre = self.fitted("ensemble(query)").preconditioner
        if pre.members < 2:
            raise ConfigError("ensemble() needs a mask-ensemble fit: estimator=GaussNewton(members=K) with K ≥ 2")
        q = self._query(query, reduce, measure)
        return EnsembleScores(np.stack([self._scorer(options, pre.member(k)).dense(q) for k in range(pre.members)]))

    def self_influence(self, options: ScoreOptions | None = None) -> np.ndarray:
        """I(i, i) for every train example, shape (n_train,). Always ≤ 0 for PSD M; large −I(i,i)
        marks unusual (often mislabeled) examples. O(n·R²) for every estimator."""
        self.fitted("self_influence()")
        return self._scorer(options).self_influence()

    def mislabeled(self, val, estimator=None, options: ScoreOptions | None = None, measure=None) -> np.ndarray:
        """How much each training example looks mislabeled: float32 (n_train,), in ``train_ids``
        order — its influence I(val, i) on the mean loss of ``val``, clean validation data (a
        loader, or Features / a FeatureStore of its rows). I > 0: up-weighting i raises the clean
        loss. Sort descending: ``attr.train_ids[np.argsort(-v)]``, most suspicious first.

        Scored with the estimator measured best for this job (``dropinf.mislabel_estimator``: for
        Dropout rows GaussNewton(member_size=8), groups of 8 coordinates — a nearly diagonal H̃;
        README "The default and how it was chosen"), fitted on the same train rows as the
        attribution (no second capture; saved beside a store). Attribution (``score``) and
        mislabel detection want opposite preconditioners: the default estimator ranks flipped
        labels worse, this one attributes worse. ``estimator``: use another one instead."""
        self.fitted("mislabeled(val)")
        pre = self.fitted_with(estimator if estimator is not None else mislabel_estimator(self.compressor))
        return self._scorer(options, pre).dense(self._query(val, "mean", measure))[0]

    def token_scores(self, query, measure, options: ScoreOptions | None = None) -> np.ndarray:
        """Token-level influence, float32 (n_query, T, n_train): scores[q, t, i] is the influence of
        train example i on token t of query q, for a measure returning (B, T) values (e.g.
        ``dropinf.measures.token_nll``: which training examples drove each generated token).
        Summed over t it equals ``score(query, measure=<the summed measure>)`` (influence is linear
        in the measure). One backward pass per token column; batches of different T are padded
        with zero scores. Only layers with fused hooks (Linear, Conv1D, Conv2d, Embedding, LoRA)."""
        self.fitted("token_scores(query, measure)")
        data, n_q, T = self.featurizer.token_rows(query, measure)
        rows = Features(data, self.signature(), torch.zeros(n_q * T), self.featurizer.damping_dims(),
                        torch.arange(n_q * T))
        return self.score(rows, options=options).reshape(n_q, T, -1)
