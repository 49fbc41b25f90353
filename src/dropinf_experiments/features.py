"""Capture once, compress many ways: full (Identity) LoRA/Linear features of a model, then any
compressor applied to them through the public ``Featurizer.derive`` — bit-for-bit what
the fused capture gives (see tests/capture), but one backward pass serves every method of a
comparison."""

from __future__ import annotations

import time

import torch

from dropinf.store.featurizer import Featurizer
from dropinf.compress import Identity
from dropinf.score import influence
from dropinf.store.features import Features


def capture_full(model, loss_fn, loaders: dict, track, progress: bool) -> tuple[Featurizer, dict[str, Features], float]:
    feat = Featurizer(model, loss_fn, compressor=Identity(), track=track, progress=progress)
    t0 = time.perf_counter()
    feats = {k: feat.features(dl, desc=f"gradients ({k})") for k, dl in loaders.items()}
    return feat, feats, time.perf_counter() - t0


def compress(feat: Featurizer, feats: Features, compressor) -> Features:
    """Features of `compressor` computed from full features (same numbers as a fused capture)."""
    if compressor is None:
        return feats
    other = Featurizer(feat.model, feat.loss_fn, compressor=compressor, track=[l.name for l in feat.layers],
                       progress=False)
    return other.derive(feats)


def influence_on_mean(estimator, train: Features, query: Features, ctx=None) -> tuple[torch.Tensor, float]:
    """(n_train,) influence of each train example on the mean query loss, and the seconds of the
    iHVP step (estimator fit + solve against the query)."""
    t0 = time.perf_counter()
    s = influence(estimator, train, query.mean(), ctx)[0]
    return torch.from_numpy(s), time.perf_counter() - t0
