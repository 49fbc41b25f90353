"""GaussNewton against an independent dense numpy implementation of eq. 3 with the paper's damping
(scaled by max(1, c·r/n): c = 40 by default, 0 = the paper's rule)."""


import numpy as np
import pytest
import torch

from dropinf import Attributor, Dropout, Identity
from dropinf.estimators.gauss_newton import GaussNewton as GN
from dropinf.store.features import Features
from tests.helpers import ce_loss, fit_score, fit_self, loader, tiny_data, tiny_mlp


def dense_reference(train: dict, query: dict, c: float = 40.0) -> np.ndarray:
    out = 0
    for name, g in train.items():
        g = g.double().numpy()
        n, r = g.shape
        lam = 0.1 * np.mean(g ** 2) * max(1.0, c * r / n)
        h = g.T @ g / n + lam * np.eye(r)
        out = out - query[name].double().numpy() @ np.linalg.solve(h, g.T)
    return out


@pytest.mark.parametrize("c", [0.0, 40.0])          # the paper's rule; the default
@pytest.mark.parametrize("r", [1, 4, 30, 500])  # 500 > n exercises the Woodbury path
def test_gauss_newton_matches_dense_formula(r, c):
    gen = torch.Generator().manual_seed(r)
    train = {"a": torch.randn(60, min(r, 200), generator=gen), "b": torch.randn(60, r, generator=gen) * 3}
    query = {k: torch.randn(9, v.shape[1], generator=gen) for k, v in train.items()}
    tr = Features(train, {})
    fitted = (GN() if c == 40.0 else GN(damping_rn=c)).fit(tr, None)
    got = fit_score(None, tr, Features(query, {}), fitted)
    want = dense_reference(train, query, c)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    self_want = np.diag(dense_reference(train, train, c))
    np.testing.assert_allclose(fit_self(None, tr, fitted), self_want, rtol=1e-4, atol=1e-6)


def test_dead_layer_is_dropped_with_warning_not_nan():
    gen = torch.Generator().manual_seed(0)
    train = {"dead": torch.zeros(20, 5), "live": torch.randn(20, 5, generator=gen)}
    query = {"dead": torch.randn(3, 5, generator=gen), "live": torch.randn(3, 5, generator=gen)}
    with pytest.warns(UserWarning, match="'dead'.*dropped"):
        fitted = GN().fit(Features(train, {}), None)
    got = fit_score(None, Features(train, {}), Features(query, {}), fitted)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, dense_reference({"live": train["live"]}, {"live": query["live"]}), rtol=1e-4)


def test_dead_coordinates_on_digits_border_pixels_give_finite_scores():
    """sklearn digits: border pixels are always 0, so a small r may sample only dead weights."""
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x[:200] / 16.0, dtype=torch.float32)
    y = torch.tensor(y[:200])
    ds = torch.utils.data.TensorDataset(x, y)
    model = torch.nn.Linear(64, 10)
    # pick a seed whose 1-coordinate index set lands on a dead pixel weight
    dead_cols = set(np.where(x.numpy().std(0) == 0)[0].tolist())
    for seed in range(200):
        attr = Attributor(model, ce_loss, compressor=Dropout(r=1, seed=seed), progress=False)
        idx = int(attr.compressors[""].indices[0])
        if idx < 640 and idx % 64 in dead_cols:
            break
    else:
        pytest.skip("no dead coordinate sampled")  # pragma: no cover
    attr.featurize(loader(ds, 64))
    with pytest.warns(UserWarning, match="dropped"):    # in-memory rows are fitted on first use
        attr.fit()
    # the only layer is dead: scoring refuses instead of returning a matrix of zeros
    from dropinf.errors import ConfigError
    with pytest.raises(ConfigError, match="every tracked layer was dropped"):
        attr.score(loader(ds, 64))


def test_end_to_end_scores_equal_dense_formula_on_captured_features():
    model = tiny_mlp().double()
    ds = tiny_data()
    attr = Attributor(model, ce_loss, compressor=Dropout(r=9, seed=2), estimator=GN(), progress=False)
    train = attr.featurize(loader(ds))
    q = attr.compute_features(loader(ds, 5))
    np.testing.assert_allclose(attr.score(q), dense_reference(train.data, q.data), rtol=1e-4, atol=1e-5)
    # reduce="mean" is the mean query gradient (paper eq. 1)
    mean = attr.score(q, reduce="mean")
    assert mean.shape == (1, 48)
    np.testing.assert_allclose(mean[0], attr.score(q).mean(0), rtol=1e-4, atol=1e-5)


def test_sign_duplicated_training_point_helps_its_copy():
    """A query identical to a train example: that example lowers the query's loss (I < 0),
    and it is the most helpful train example for it."""
    model = tiny_mlp().double()
    ds = tiny_data()
    attr = Attributor(model, ce_loss, compressor=Identity(), progress=False)
    attr.featurize(loader(ds))
    s = attr.score(loader(torch.utils.data.Subset(ds, [3, 17])))
    assert s[0, 3] < 0 and s[1, 17] < 0
    assert s[0].argmin() == 3 and s[1].argmin() == 17
    assert (attr.self_influence() < 0).all()


def test_fit_memory_bound_fits_layer_runs_in_separate_passes_with_the_same_result():
    from dropinf.estimators import FitContext
    from dropinf.estimators.stats import gram_groups
    gen = torch.Generator().manual_seed(0)
    train = Features({n: torch.randn(300, 40, generator=gen) * (i + 1) for i, n in enumerate("abcd")}, {})
    query = Features({n: torch.randn(5, 40, generator=gen) for n in "abcd"}, {})
    one = GN().fit(train)
    budget = 2.5 * 40 * 40 * 8 / 2**20              # two layers' float64 Gram matrices per pass
    assert gram_groups(train, (), budget) == [["a", "b"], ["c", "d"]]
    runs = GN().fit(train, FitContext(fit_memory_mb=budget))
    assert [b.layers for b in runs.blocks] == [b.layers for b in one.blocks]
    for b1, b2 in zip(one.blocks, runs.blocks):
        assert torch.equal(b1.matrix, b2.matrix) and b1.damping == b2.damping
    np.testing.assert_array_equal(fit_score(GN(), train, query, runs), fit_score(GN(), train, query, one))


def test_float32_preconditioner_is_as_accurate_as_scoring_needs():
    """M is factorised in float64 and kept in float32: measured against the float64 M, scores agree
    to ~1e-6 relative even with small damping (condition number ~1e4)."""
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(400, 64, generator=gen) @ torch.diag(torch.logspace(0, -2, 64))     # ill-conditioned
    train, query = Features({"a": g}, {}), Features({"a": torch.randn(7, 64, generator=gen)}, {})
    pre = GN(damping_factor=0.01).fit(train)
    assert pre.blocks[0].matrix.dtype == torch.float32
    h = g.double().T @ g.double() / 400 + pre.blocks[0].damping["a"] * torch.eye(64, dtype=torch.float64)
    want = -(query.data["a"].double() @ torch.linalg.solve(h, g.double().T))
    got = fit_score(GN(damping_factor=0.01), train, query)
    err = np.abs(got - want.numpy()).max() / np.abs(want.numpy()).max()
    assert err < 1e-5, err


def test_damping_rn_scales_lambda_with_r_over_n():
    gen = torch.Generator().manual_seed(3)
    train = Features({"a": torch.randn(100, 40, generator=gen), "b": torch.randn(100, 5, generator=gen)}, {})
    plain, scaled = GN(damping_rn=0).fit(train), GN(damping_rn=10.0).fit(train)
    lam = {b.layers[0]: b.damping[b.layers[0]] for b in plain.blocks}
    got = {b.layers[0]: b.damping[b.layers[0]] for b in scaled.blocks}
    assert got["a"] == pytest.approx(lam["a"] * 10.0 * 40 / 100)         # r/n = 0.4: ×4
    assert got["b"] == pytest.approx(lam["b"])                             # 10 · 5/100 < 1: the paper's rule
    # a projection of a d=10 layer to r=40 spans 10 dims: damping_rn counts min(r, d) = 10, also per
    # member (two members of 20), so 10 · 10/100 = 1 is the paper's rule for both
    proj = Features({"a": train.data["a"]}, {}, damping_dims={"a": 10})
    want = GN(damping_rn=0).fit(proj).blocks[0].damping["a"]
    assert GN(damping_rn=10.0).fit(proj).blocks[0].damping["a"] == pytest.approx(want)
    members = GN(damping_rn=10.0, members=2).fit(proj).blocks[0].member_damping["a"]
    assert members == pytest.approx(GN(damping_rn=0, members=2).fit(proj).blocks[0].member_damping["a"])


def test_head_damping_scales_only_the_output_layer():
    """head_damping multiplies the rule's λ of the layer the signature names as the model's output
    layer — one block or every member — and leaves the others (and features naming none) alone."""
    gen = torch.Generator().manual_seed(4)
    data = {"a": torch.randn(100, 40, generator=gen), "head": torch.randn(100, 12, generator=gen) * 5}
    named, unnamed = Features(data, {"output_layer": "head"}), Features(data, {})
    lam = lambda pre: {b.layers[0]: b.damping[b.layers[0]] for b in pre.blocks}
    rule = lam(GN().fit(named))
    assert lam(GN(head_damping=0.1).fit(named)) == pytest.approx({"a": rule["a"], "head": 0.1 * rule["head"]})
    assert lam(GN(head_damping=0.1).fit(unnamed)) == pytest.approx(rule)
    members = GN(members=2).fit(named).blocks[1].member_damping["head"]
    got = GN(members=2, head_damping=0.1).fit(named).blocks[1].member_damping["head"]
    assert got == pytest.approx({k: 0.1 * v for k, v in members.items()})
    # a fixed damping is not the rule: head_damping leaves it as given
    assert lam(GN(damping=0.5, head_damping=0.1).fit(named)) == pytest.approx({"a": 0.5, "head": 0.5})
    with pytest.raises(Exception, match="head_damping"):
        GN(head_damping=0.0).fit(named)


def test_the_default_damps_the_tracked_head_less_than_the_rule(tmp_path):
    """Attributor(model, loss_fn): the model's last Linear is named output_layer in the features (memory
    and store alike) and gets DEFAULT_HEAD_DAMPING (0.03) × the rule's λ, every other layer the rule."""
    from dropinf.methods import DEFAULT_HEAD_DAMPING
    from dropinf.store.writer import StoreOptions
    model, train = tiny_mlp(d_in=6, hidden=40), loader(tiny_data(n=64))
    for store in (None, StoreOptions(tmp_path / "s", chunk_size=24)):
        attr = Attributor(model.double(), ce_loss, progress=False)
        src = attr.featurize(train, store=store)
        assert src.signature["output_layer"] == "2"
        got = {b.layers[0]: b.member_damping[b.layers[0]] for b in attr.fitted().preconditioner.blocks}
        rule = {b.layers[0]: b.member_damping[b.layers[0]] for b in GN(members=4).fit(src).blocks}
        assert got["0"] == pytest.approx(rule["0"])
        assert got["2"] == pytest.approx({k: DEFAULT_HEAD_DAMPING * v for k, v in rule["2"].items()})
