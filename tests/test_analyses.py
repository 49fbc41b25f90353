"""Attributor.mislabeled: the influence on a clean set's mean loss under the mislabel estimator,
fitted on the same train rows as the attribution (in memory and from a store, fitted once)."""

import numpy as np
import torch

import dropinf
from dropinf import Attributor, Dropout, GaussNewton, StoreOptions
from dropinf.score import Scorer
from tests.store import fixture


def test_mislabeled_scores_with_the_mislabel_estimator_on_the_same_rows(tmp_path):
    t = fixture.build()
    dl = lambda ds: torch.utils.data.DataLoader(ds, batch_size=16)
    attr = Attributor(t["model"], t["loss_fn"], compressor=Dropout(r=40, seed=2), progress=False)
    tr = attr.featurize(dl(t["train"]))
    qu = attr.compute_features(dl(t["query"]))
    assert dropinf.mislabel_estimator(attr.compressor) == GaussNewton(member_size=8)
    want = Scorer(GaussNewton(member_size=8).fit(tr), tr, progress=False).dense(qu.mean())[0]
    got = attr.mislabeled(dl(t["query"]))
    assert got.shape == (230,)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    # the attribution's own fit is untouched; the mislabel fit is kept for the next call
    assert attr.preconditioner.estimator["members"] == 4
    assert len(attr.state.others) == 1 and attr.fitted_with(GaussNewton(member_size=8)) is attr.fitted_with(
        GaussNewton(member_size=8))
    np.testing.assert_allclose(attr.mislabeled(qu, estimator=attr.estimator), attr.score(qu, reduce="mean")[0],
                               rtol=1e-6)
    # the flipped-label ranking differs from the attribution estimator's (a different preconditioner)
    assert not np.allclose(got, attr.score(qu, reduce="mean")[0])

    # from a store: fitted once, saved beside it, and loaded by the next Attributor without reading a row
    disk = Attributor(t["model"], t["loss_fn"], compressor=Dropout(r=40, seed=2), progress=False)
    disk.featurize(dl(t["train"]), store=StoreOptions(tmp_path / "s", chunk_size=50))
    np.testing.assert_allclose(disk.mislabeled(qu), got, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    again = Attributor.from_store(tmp_path / "s", t["model"], t["loss_fn"], progress=False)
    before = again.store.rows_read
    pre = again.fitted_with(GaussNewton(member_size=8))
    assert again.store.rows_read == before and pre.blocks[0].form == "members"
    np.testing.assert_allclose(again.mislabeled(qu), got, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_in_memory_fit_is_made_on_first_use_and_equals_an_eager_fit():
    """featurize(loader) without a store checks the estimator at once and fits it on first use:
    mislabeled alone never fits the attribution estimator, and the scores are those of fit()."""
    import pytest
    from dropinf.errors import ConfigError
    t = fixture.build()
    dl = lambda ds: torch.utils.data.DataLoader(ds, batch_size=16)
    lazy = Attributor(t["model"], t["loss_fn"], compressor=Dropout(r=40, seed=2), progress=False)
    lazy.featurize(dl(t["train"]))
    assert lazy.fit_status == "pending"
    lazy.mislabeled(dl(t["query"]))
    assert lazy.fit_status == "pending" and len(lazy.state.others) == 1
    got = lazy.score(dl(t["query"]))
    assert lazy.fit_status == "fitted"
    eager = Attributor(t["model"], t["loss_fn"], compressor=Dropout(r=40, seed=2), progress=False)
    eager.featurize(dl(t["train"]))
    eager.fit()
    assert eager.fit_status == "fitted"
    np.testing.assert_array_equal(got, eager.score(dl(t["query"])))
    # option errors still come from featurize, before any fit
    bad = Attributor(t["model"], t["loss_fn"], compressor=Dropout(r=40), estimator=GaussNewton(head_damping=0.0),
                     progress=False)
    with pytest.raises(ConfigError, match="head_damping"):
        bad.featurize(dl(t["train"]))
