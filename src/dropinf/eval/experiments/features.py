"""Capture once, compress many ways: full (Identity) LoRA/Linear features of a model, then any
compressor applied to them with ``from_flat`` — bit-for-bit what the fused capture gives (see
tests/capture), but one backward pass serves every method of a comparison."""

from __future__ import annotations

import time

import torch

from ...attribute import Attributor
from ...compress import Identity
from ...store.features import Features


def capture_full(model, loss_fn, loaders: dict, track, progress: bool) -> tuple[Attributor, dict[str, Features], float]:
    attr = Attributor(model, loss_fn, compressor=Identity(), track=track, progress=progress)
    t0 = time.perf_counter()
    feats = {k: attr.compute_features(dl, desc=f"gradients ({k})") for k, dl in loaders.items()}
    return attr, feats, time.perf_counter() - t0


def compress(attr: Attributor, feats: Features, compressor) -> Features:
    """Features of `compressor` computed from full features (same numbers as a fused capture)."""
    if compressor is None:
        return feats
    data, dims = {}, {}
    for layer in attr.layers:
        c = compressor.build(layer)
        data[layer.name] = c.from_flat(feats.data[layer.name]).float()
        dims[layer.name] = int(getattr(c, "damping_dim", c.r))
    sig = {**feats.signature, "compressor": compressor.signature()}
    return Features(data, sig, feats.losses, dims)


def influence_on_mean(estimator, train: Features, query: Features, ctx=None) -> tuple[torch.Tensor, float]:
    """(n_train,) influence of each train example on the mean query loss, and the seconds of the
    iHVP step (estimator fit + solve against the query)."""
    t0 = time.perf_counter()
    fitted = estimator.fit(train, ctx)
    s = fitted.score(query.mean())[0]
    return s, time.perf_counter() - t0
