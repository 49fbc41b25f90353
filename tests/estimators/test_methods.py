"""Every method of the paper, each against its formula (issue 3)."""

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr
from torch import nn

from dropinf import (Attributor, DataInf, Dropout, ExactHessian, Gaussian, GaussNewton, GradDot, Identity,
                     LiSSA, LoGra)
from dropinf.errors import IncompatibleMethodError
from dropinf.store.features import Features
from tests.helpers import ce_loss, fit_score, loader, tiny_data, tiny_mlp


def rand_features(seed=0, n=50, dims=(6, 11)):
    g = torch.Generator().manual_seed(seed)
    train = {f"l{i}": torch.randn(n, d, generator=g) * (i + 1) for i, d in enumerate(dims)}
    query = {k: torch.randn(4, v.shape[1], generator=g) for k, v in train.items()}
    return Features(train, {}), Features(query, {})


def test_lissa_converges_to_damped_gauss_newton_solve():
    train, query = rand_features()
    exact = fit_score(GaussNewton(damping_rn=0), train, query)        # LiSSA damps by the paper's rule
    got = fit_score(LiSSA(iterations=3000), train, query)
    assert np.linalg.norm(got - exact) / np.linalg.norm(exact) < 1e-3


def test_lissa_ten_iterations_match_the_recursion_step_by_step():
    train, query = rand_features(1)
    est = LiSSA(iterations=10)
    fitted = est.fit(train)
    scale = fitted.info["scale"]
    out = 0
    for k, g in train.data.items():
        g = g.double().numpy()
        n, r = g.shape
        lam = 0.1 * np.mean(g ** 2)
        a = g.T @ g / n + lam * np.eye(r)
        assert np.linalg.eigvalsh(a).max() <= scale  # convergence guaranteed
        v = query.data[k].double().numpy().T
        s = v.copy()
        for _ in range(10):           # eq. 7: s_{j+1} = v + (I − A/scale) s_j
            s = v + s - a @ s / scale
        out = out - (s / scale).T @ g.T   # eq. 8
    np.testing.assert_allclose(fit_score(est, train, query, fitted), out, rtol=1e-5, atol=1e-8)
    # scale=1 is the paper's unscaled recursion
    assert LiSSA(iterations=10, scale=1.0).fit(train).info["scale"] == 1.0


def test_lissa_model_hvp_matches_exact_hessian_on_convex_model():
    torch.manual_seed(0)
    x = torch.randn(60, 4, dtype=torch.float64)
    y = (x[:, 0] + 0.3 * torch.randn(60, dtype=torch.float64) > 0).long()
    model = nn.Linear(4, 2).double()
    opt = torch.optim.LBFGS(model.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        l = ce_loss(model, (x, y)).mean()
        l.backward()
        return l
    opt.step(closure)
    dl = loader(torch.utils.data.TensorDataset(x, y), 20)
    ref = Attributor(model, ce_loss, compressor=Identity(), estimator=ExactHessian(damping=0.05), progress=False)
    ref.featurize(dl)
    lissa = Attributor(model, ce_loss, compressor=Identity(),
                       estimator=LiSSA(iterations=400, hvp="model", damping=0.05), progress=False)
    lissa.featurize(dl)
    want, got = ref.score(dl), lissa.score(dl)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-3


def dense_datainf(train: dict, query: dict) -> np.ndarray:
    out = 0
    for k, g in train.items():
        g = g.double().numpy()
        n, r = g.shape
        lam = 0.1 * np.mean(g ** 2)
        hinv = sum(np.linalg.inv(np.outer(gk, gk) + lam * np.eye(r)) for gk in g) / n   # eq. 9
        out = out - query[k].double().numpy() @ hinv @ g.T
    return out


def test_datainf_equals_dense_eq9():
    train, query = rand_features(2)
    got = fit_score(DataInf(), train, query)
    want = dense_datainf(train.data, query.data)   # the Gram pass runs in float32 (summed in float64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_datainf_on_a_small_model_equals_dense_formula():
    model = tiny_mlp().double()
    attr = Attributor(model, ce_loss, compressor=Identity(), estimator=DataInf(), progress=False)
    train = attr.featurize(loader(tiny_data()))
    q = attr.compute_features(loader(tiny_data(6, seed=3)))
    np.testing.assert_allclose(attr.score(q), dense_datainf(train.data, q.data), rtol=1e-4, atol=1e-6)


def test_graddot_is_negative_dot_product():
    train, query = rand_features(3)
    want = -sum(query.data[k].double() @ train.data[k].double().T for k in train.data)
    np.testing.assert_allclose(fit_score(GradDot(), train, query), want.numpy(), rtol=1e-6)


def test_logra_hook_equals_kronecker_projection_of_dense_gradient():
    from dropinf.capture.engine import BatchCapture
    from dropinf.capture.layers import select_layers
    from tests.capture.test_fused_linear import SeqModel, seq_loss
    from tests.helpers import loop_grads

    torch.manual_seed(0)
    for bias in (True, False):
        model = SeqModel(bias).double()
        batch = (torch.randn(5, 3, 5, dtype=torch.float64), torch.randint(0, 3, (5,)))
        layers = select_layers(model)
        comps = {l.name: LoGra(r_in=3, r_out=2, seed=1).build(l) for l in layers}
        feats, _ = BatchCapture(model, seq_loss, layers, comps)(batch)
        for l in layers:
            c = comps[l.name]
            g = loop_grads(model, seq_loss, batch, l.param_names)
            d_out, d_in = l.param_shapes[0]
            w = g[:, :d_out * d_in].reshape(5, d_out, d_in)
            if bias:
                w = torch.cat([w, g[:, d_out * d_in:, None]], -1)
            kron = torch.kron(c.p_out.double(), c.p_in.double())
            want = w.reshape(5, -1) @ kron.T
            torch.testing.assert_close(feats[l.name].double(), want, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(c.from_flat(g).double(), want, rtol=1e-5, atol=1e-7)


def test_logra_refuses_non_linear_layers():
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    with pytest.raises(IncompatibleMethodError, match="LoGra"):
        Attributor(model, ce_loss, compressor=LoGra(), track="all")


def test_gaussian_with_large_r_approaches_orig():
    model = tiny_mlp().double()
    ds = tiny_data()

    def scores(comp):
        a = Attributor(model, ce_loss, compressor=comp, progress=False)
        a.featurize(loader(ds))
        return a.score(loader(ds)).ravel()
    orig = scores(Identity())
    gauss = scores(Gaussian(r=4000, seed=0))
    assert pearsonr(orig, gauss)[0] > 0.99


def test_exact_and_model_lissa_refuse_projection_features():
    with pytest.raises(IncompatibleMethodError):
        a = Attributor(tiny_mlp().double(), ce_loss, compressor=LoGra(), estimator=LiSSA(hvp="model"), progress=False)
        a.featurize(loader(tiny_data()))


ALL = [
    ("Orig", Identity(), GaussNewton()),
    ("LiSSA", Identity(), LiSSA()),
    ("DataInf", Identity(), DataInf()),
    ("Hessian-free", Identity(), GradDot()),
    ("Gaussian", Gaussian(r=16), GaussNewton()),
    ("LoGra", LoGra(r_in=4, r_out=3), GaussNewton()),
    ("Dropout", Dropout(r=16), GaussNewton()),
    ("Dropout+DataInf", Dropout(r=16), DataInf()),
    ("Dropout+LiSSA(model)", Dropout(r=16), LiSSA(hvp="model")),
    ("Exact", Dropout(r=16), ExactHessian(damping=0.01)),
]


@pytest.mark.parametrize("name,comp,est", ALL, ids=[a[0] for a in ALL])
def test_every_method_shape_and_sign(name, comp, est):
    """Same entry point, same shape, same sign: a training point duplicated as the query helps
    (lowers) that query's loss, I < 0."""
    model = tiny_mlp().double()
    ds = tiny_data()
    attr = Attributor(model, ce_loss, compressor=comp, estimator=est, progress=False)
    attr.featurize(loader(ds))
    q = [3, 17, 30]
    s = attr.score(loader(torch.utils.data.Subset(ds, q)))
    assert s.shape == (3, 48) and s.dtype == np.float32 and np.isfinite(s).all()
    assert all(s[j, i] < 0 for j, i in enumerate(q)), s[[0, 1, 2], q]
    assert attr.self_influence().shape == (48,)
