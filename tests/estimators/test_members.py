"""GaussNewton(members=K): a mask ensemble as one block-diagonal preconditioner, equal to the mean of
K independent member fits, in memory and from a store, through every path."""

import numpy as np
import pytest
import torch

from dropinf import Attributor, ConfigError, Dropout, GaussNewton, StoreOptions
from dropinf.ensemble import member_features
from dropinf.score import Scorer
from tests.helpers import fit_score, fit_self
from tests.store import fixture


def _task():
    t = fixture.build()
    dl = lambda ds: torch.utils.data.DataLoader(ds, batch_size=16)
    return t, dl(t["train"]), dl(t["query"])


@pytest.mark.parametrize("compressor", [Dropout(r=24, seed=1), Dropout(r=24, seed=1, rotate=True)],
                         ids=["dropout", "rotated"])
def test_block_diagonal_fit_equals_the_mean_of_member_fits(compressor, tmp_path):
    t, train, query = _task()
    attr = Attributor(t["model"], t["loss_fn"], compressor=compressor, estimator=GaussNewton(members=3, member_seed=5),
                      progress=False)
    tr = attr.featurize(train)
    qu = attr.compute_features(query)
    want = np.mean([fit_score(GaussNewton(), a, b) for a, b in zip(member_features(tr, 3, 5),
                                                                      member_features(qu, 3, 5))], 0)
    got = fit_score(GaussNewton(members=3, member_seed=5), tr, qu)          # float64 scoring
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7 * np.abs(want).max())
    np.testing.assert_allclose(attr.score(qu), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    ens = attr.ensemble(qu)
    assert ens.members.shape == (3, 20, 230)
    np.testing.assert_allclose(ens.mean, attr.score(qu), rtol=1e-4, atol=1e-5 * np.abs(want).max())
    assert (ens.std > 0).any() and 0 < ens.topk_stability(5) <= 1
    self_inf = attr.self_influence()
    members = [fit_self(GaussNewton(), m) for m in member_features(tr, 3, 5)]
    np.testing.assert_allclose(self_inf, np.mean(members, 0), rtol=1e-4, atol=1e-6 * np.abs(self_inf).max())
    per_layer = attr.score(qu, per_layer=True)
    np.testing.assert_allclose(sum(per_layer.values()), attr.score(qu), rtol=1e-4, atol=1e-5 * np.abs(want).max())

    # from a store: the same scores; reopened, the saved fit serves without reading a row
    disk = Attributor(t["model"], t["loss_fn"], compressor=compressor, estimator=GaussNewton(members=3, member_seed=5),
                      progress=False)
    disk.featurize(train, store=StoreOptions(tmp_path / "s", chunk_size=50))
    np.testing.assert_allclose(disk.score(query), attr.score(qu), rtol=1e-4, atol=1e-5 * np.abs(want).max())
    again = Attributor.from_store(tmp_path / "s", t["model"], t["loss_fn"],
                                  estimator=GaussNewton(members=3, member_seed=5), progress=False)
    assert again.fit_status.startswith("loaded") and again.store.rows_read == 0
    assert again.preconditioner.members == 3
    np.testing.assert_array_equal(again.ensemble(qu).members, disk.ensemble(qu).members)
    top = again.topk(qu, k=3)
    np.testing.assert_array_equal(top.harmful_idx[:, 0], again.train_ids.numpy()[disk.score(qu).argmax(1)])


def test_one_member_is_plain_gauss_newton_and_misuse_is_refused():
    t, train, query = _task()
    attr = Attributor(t["model"], t["loss_fn"], compressor=Dropout(r=12, seed=1), estimator=GaussNewton(),
                      progress=False)
    attr.featurize(train)
    tr, qu = attr.train_features, attr.compute_features(query)
    np.testing.assert_array_equal(fit_score(GaussNewton(members=1), tr, qu), fit_score(GaussNewton(), tr, qu))
    with pytest.raises(ConfigError, match="mask-ensemble fit"):
        attr.ensemble(qu)
    # a layer narrower than K stays one plain block: here every layer keeps 12 < 13 coordinates
    np.testing.assert_array_equal(fit_score(GaussNewton(members=13), tr, qu), fit_score(GaussNewton(), tr, qu))
    with pytest.raises(ConfigError, match="members must be"):
        GaussNewton(members=0).fit(tr)


def test_default_estimator_is_the_four_member_ensemble_and_narrow_layers_stay_whole():
    """Attributor(model, loss_fn) fits dropinf.default_setting(): Dropout(r=2048, head_factor=4) split into
    four members;
    a layer with fewer kept coordinates than members is one block that every member shares, so the
    members' mean is still the ensemble's score."""
    import dropinf
    from dropinf.store.features import Features
    comp, est = dropinf.default_setting()
    assert comp == Dropout(head_factor=4) and comp.r == 2048 and est.members == 4 and est.damping_rn == 40
    # one default estimator whatever the mask seed: the Python front door (which sees the compressor)
    # and the command line (which does not) fit a store the same way
    assert dropinf.default_setting(3) == (Dropout(seed=3, head_factor=4), est)
    assert Attributor(torch.nn.Linear(2, 2), lambda m, b: m(b).sum(1), compressor=Dropout(seed=3),
                      progress=False).estimator == est
    paper = dropinf.paper_setting()
    assert paper[0].r == 16 and paper[1].damping_rn == 0 and paper[1].members == 1
    mis = dropinf.mislabel_setting(2)
    assert mis == (Dropout(seed=2, head_factor=4), GaussNewton(member_size=8)) and mis[0].r == comp.r
    t, train, query = _task()
    attr = Attributor(t["model"], t["loss_fn"], progress=False)
    assert attr.estimator == est
    attr.featurize(train)
    ens = attr.ensemble(query)
    np.testing.assert_allclose(ens.mean, attr.score(query), rtol=1e-4, atol=1e-5 * np.abs(ens.mean).max())
    gen = torch.Generator().manual_seed(0)
    tr = Features({"wide": torch.randn(40, 6, generator=gen), "one": torch.randn(40, 1, generator=gen)}, {})
    qu = Features({"wide": torch.randn(3, 6, generator=gen), "one": torch.randn(3, 1, generator=gen)}, {})
    pre = GaussNewton(members=2).fit(tr)
    assert pre.members == 2 and [b.owner is None for b in pre.blocks] == [False, True]
    both = [Scorer(pre.member(k), tr, progress=False).dense(qu) for k in range(2)]
    np.testing.assert_allclose(np.mean(both, 0), Scorer(pre, tr, progress=False).dense(qu), rtol=1e-5)


def test_members_keep_only_their_blocks_and_the_grouped_gram_is_the_full_grams_blocks(tmp_path):
    """The fit accumulates each group's block of GᵀG and keeps M as (K, m, m): the same as the
    blocks of the full Gram matrix; a format-/1 file (members as a dense r × r M) still loads."""
    from dropinf.estimators.preconditioner import Block, Preconditioner, member_index
    from dropinf.estimators.members import member_owner
    from dropinf.estimators.stats import gram_pass
    from dropinf.store.features import Features
    gen = torch.Generator().manual_seed(0)
    tr = Features({"a": torch.randn(50, 23, generator=gen), "b": torch.randn(50, 9, generator=gen)}, {})
    qu = Features({"a": torch.randn(4, 23, generator=gen), "b": torch.randn(4, 9, generator=gen)}, {})
    owner = member_owner(23, 4, seed=2)
    idx, inv = member_index(owner)
    assert idx.shape == (4, 6) and (idx[3, 5] == 23) and torch.equal(idx.reshape(-1)[inv], torch.arange(23))
    full = gram_pass(tr, device="cpu").gram["a"]
    grouped = gram_pass(tr, device="cpu", grouped={"a": idx}, layers=["a"]).gram["a"]
    assert grouped.shape == (4, 6, 6)
    padded = torch.nn.functional.pad(full, (0, 1, 0, 1))
    torch.testing.assert_close(grouped, padded[idx[:, :, None], idx[:, None, :]], rtol=1e-5, atol=1e-5)

    pre = GaussNewton(members=4).fit(tr)
    blk = pre.blocks[0]
    assert blk.form == "members" and blk.matrix is None and blk.parts.shape == (4, 6, 6)
    m = blk.dense()
    o = blk.owner
    assert (m[o[:, None] != o[None, :]] == 0).all() and (m[o[:, None] == o[None, :]] != 0).any()   # block-diagonal
    want = Scorer(pre, tr, progress=False).dense(qu)
    legacy = Preconditioner(pre.estimator, pre.n, [Block(b.layers, b.dense().float(), b.scale, damping=b.damping,
                                                         owner=b.owner, member_damping=b.member_damping)
                                                   for b in pre.blocks], pre.dropped, pre.info)
    legacy.save(tmp_path / "p.npz")
    back = Preconditioner.load(tmp_path / "p.npz")
    assert [b.form for b in back.blocks] == ["members", "members"]
    np.testing.assert_allclose(Scorer(back, tr, progress=False).dense(qu), want, rtol=1e-5)
    pre.save(tmp_path / "q.npz")
    again = Preconditioner.load(tmp_path / "q.npz")
    np.testing.assert_array_equal(Scorer(again, tr, progress=False).dense(qu), want)
    np.testing.assert_array_equal(Scorer(again.member(1), tr, progress=False).dense(qu),
                                  Scorer(pre.member(1), tr, progress=False).dense(qu))


def test_member_size_gives_every_layer_groups_of_m_equal_to_their_blocks_inverted_by_hand():
    """GaussNewton(member_size=m): ⌈r_l/m⌉ groups per layer, each its own H̃ and λ; scores equal
    −q M gᵀ with M = blockdiag(H̃_k⁻¹)/K_l built by hand in float64. Per-member scores need one K."""
    from dropinf.estimators.base import layer_damping
    from dropinf.store.features import Features
    gen = torch.Generator().manual_seed(1)
    tr = Features({"a": torch.randn(60, 23, generator=gen).double(), "b": torch.randn(60, 9, generator=gen).double()}, {})
    qu = Features({"a": torch.randn(3, 23, generator=gen).double(), "b": torch.randn(3, 9, generator=gen).double()}, {})
    est = GaussNewton(member_size=4)
    pre = est.fit(tr)
    assert [b.parts.shape for b in pre.blocks] == [(6, 4, 4), (3, 3, 3)]
    want = torch.zeros(3, 60, dtype=torch.float64)
    for b in pre.blocks:
        (name,) = b.layers
        g, q, K = tr.data[name], qu.data[name], int(b.owner.max()) + 1
        m = torch.zeros(g.shape[1], g.shape[1], dtype=torch.float64)
        for k in range(K):
            c = torch.nonzero(b.owner == k).flatten()
            gk = g[:, c]
            lam = layer_damping(float((gk * gk).sum()), 60, c.numel(), est._factor(int((b.owner == 0).sum()), g.shape[1], 60), None)
            m[c[:, None], c[None, :]] = torch.linalg.inv(gk.T @ gk / 60 + lam * torch.eye(c.numel(), dtype=torch.float64)) / K
        want -= q @ m @ g.T
    got = Scorer(pre, tr, progress=False, options=__import__("dropinf").ScoreOptions(dtype="float64")).dense(qu)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6 * float(want.abs().max()))   # M kept in float32
    with pytest.raises(ConfigError, match="different numbers of members"):
        pre.member(0)
    with pytest.raises(ConfigError, match="not both"):
        GaussNewton(members=2, member_size=4).fit(tr)
