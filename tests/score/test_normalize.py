"""Unit-normalised scores (ScoreOptions(normalize=...)): the cosine of the preconditioned
gradients computed by hand, in memory and from a store, through score, top-k and per-layer."""

import numpy as np
import pytest
import torch

from dropinf import Attributor, ConfigError, Dropout, GaussNewton, GradDot, ScoreOptions, StoreOptions
from tests.store import fixture


def _by_hand(attr, qf, mode):
    """I / (‖q‖_M ‖g‖_M) from the fitted dense blocks: M^½ via the eigendecomposition of each block."""
    pre, tr = attr.preconditioner, attr.train_features
    qs, gs = [], []
    for b in pre.blocks:
        (name,) = b.layers
        m = b.dense(tr.data[name].shape[1])
        w, v = torch.linalg.eigh(m)
        half = v @ torch.diag(w.clamp_min(0).sqrt()) @ v.T
        qs.append(qf.data[name].double() @ half)
        gs.append(tr.data[name].double() @ half)
    q, g = torch.cat(qs, 1), torch.cat(gs, 1)
    s = -(q @ g.T)
    s = s / g.norm(dim=1)[None, :]
    if mode == "both":
        s = s / q.norm(dim=1)[:, None]
    return s.numpy()


@pytest.mark.parametrize("est", [GaussNewton(), GradDot()], ids=["gauss-newton", "graddot"])
@pytest.mark.parametrize("mode", ["both", "train"])
def test_normalised_scores_equal_the_cosine_by_hand(est, mode, tmp_path):
    t = fixture.build()
    dl = lambda ds: torch.utils.data.DataLoader(ds, batch_size=16)
    attr = Attributor(t["model"], t["loss_fn"], compressor=Dropout(r=12, seed=1), estimator=est, progress=False,
                      score_options=ScoreOptions(normalize=mode, dtype="float64"))
    attr.featurize(dl(t["train"]))
    qf = attr.compute_features(dl(t["query"]))
    want = _by_hand(attr, qf, mode)
    got = attr.score(qf)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    if mode == "both":
        assert np.abs(got).max() <= 1 + 1e-5
        if isinstance(est, GradDot):     # the plain cosine of the gradients
            q, g = (torch.cat([f.data[l].double() for l in sorted(f.data)], 1) for f in (qf, attr.train_features))
            cos = -(q / q.norm(dim=1, keepdim=True)) @ (g / g.norm(dim=1, keepdim=True)).T
            np.testing.assert_allclose(got, cos.numpy(), rtol=1e-5, atol=1e-7)
    parts = attr.score(qf, per_layer=True)
    np.testing.assert_allclose(sum(parts.values()), got, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    top = attr.topk(qf, k=3)
    np.testing.assert_array_equal(top.harmful_idx[:, 0], attr.train_ids.numpy()[want.argmax(1)])
    assert attr.self_influence().max() <= 0                       # never normalised
    disk = Attributor(t["model"], t["loss_fn"], compressor=Dropout(r=12, seed=1), estimator=est, progress=False,
                      score_options=ScoreOptions(normalize=mode, dtype="float64"))
    disk.featurize(dl(t["train"]), store=StoreOptions(tmp_path / "s", chunk_size=50))
    np.testing.assert_allclose(disk.score(qf), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_normalize_is_checked():
    with pytest.raises(ConfigError, match="normalize"):
        ScoreOptions(normalize="cosine")
