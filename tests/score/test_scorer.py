"""The one scorer: for every estimator the streamed store path, the in-memory path, query-batched
scoring and an independent dense numpy formula agree; self-influence is the diagonal of the full
score matrix; per-layer scores sum to the total; kernel (r > n) blocks equal the dense formula."""

import numpy as np
import pytest
import torch

from dropinf import (Attributor, DataInf, Dropout, ExactHessian, GaussNewton, GradDot, Identity, LiSSA,
                     ScoreOptions)
from tests.store import fixture
from dropinf.store.writer import StoreOptions


def task(n=230):
    import os
    old = os.environ.get("DROPINF_FIXTURE_N")
    os.environ["DROPINF_FIXTURE_N"] = str(n)
    try:
        t = fixture.build()
    finally:
        if old is None:
            os.environ.pop("DROPINF_FIXTURE_N")
        else:
            os.environ["DROPINF_FIXTURE_N"] = old
    t["model"] = t["model"].double()
    t["train"] = torch.utils.data.TensorDataset(t["train"].tensors[0].double(), t["train"].tensors[1])
    t["query"] = torch.utils.data.TensorDataset(t["query"].tensors[0].double(), t["query"].tensors[1])
    dl = lambda ds: torch.utils.data.DataLoader(ds, batch_size=16, shuffle=False)
    return t, dl(t["train"]), dl(t["query"])


# ---------------------------------------------------------------- independent dense formulas
def _lam(g):
    return 0.1 * np.mean(g ** 2)


def dense_matrices(name, train: dict, model=None, loss_fn=None, loader=None, attr=None):
    """{layer: M_l} (or {"*joint*": M}) by textbook numpy, from the in-memory train features."""
    gs = {k: v.double().numpy() for k, v in train.items()}
    out = {}
    if name == "gn":
        for k, g in gs.items():
            n, r = g.shape
            out[k] = np.linalg.inv(g.T @ g / n + _lam(g) * np.eye(r))
    elif name == "datainf":
        for k, g in gs.items():
            n, r = g.shape
            lam = _lam(g)
            out[k] = sum(np.linalg.inv(np.outer(x, x) + lam * np.eye(r)) for x in g) / n   # eq. 9
    elif name == "graddot":
        out = {k: np.eye(g.shape[1]) for k, g in gs.items()}
    elif name == "lissa":
        a = {k: g.T @ g / g.shape[0] + _lam(g) * np.eye(g.shape[1]) for k, g in gs.items()}
        scale = 1.1 * max(np.linalg.eigvalsh(m).max() for m in a.values())
        for k, m in a.items():
            s = np.eye(m.shape[0])
            for _ in range(10):              # eq. 7 applied to every basis vector
                s = np.eye(m.shape[0]) + s - m @ s / scale
            out[k] = s / scale
    elif name == "exact":
        names = [pn for l in attr.layers for pn in l.param_names]
        pm = dict(model.named_parameters())
        flat0 = torch.cat([pm[p].detach().reshape(-1) for p in names])
        sizes = [pm[p].numel() for p in names]

        def total(flat):
            chunks = torch.split(flat, sizes)
            params = {p: c.reshape(pm[p].shape) for p, c in zip(names, chunks)}
            return sum(loss_fn(lambda x: torch.func.functional_call(model, params, (x,)), b).sum() for b in loader)
        h = torch.autograd.functional.hessian(total, flat0).numpy() / len(loader.dataset)
        idx = np.concatenate([attr.compressors[l.name].indices.numpy() + off for l, off in
                              zip(attr.layers, np.cumsum([0] + [l.dim for l in attr.layers[:-1]]))])
        hs = h[np.ix_(idx, idx)] + 0.01 * np.eye(len(idx))
        out["*joint*"] = np.linalg.inv(hs)
    return out


def dense_scores(mats, train: dict, query: dict) -> np.ndarray:
    if "*joint*" in mats:
        g = np.concatenate([v.double().numpy() for v in train.values()], 1)
        q = np.concatenate([v.double().numpy() for v in query.values()], 1)
        return -q @ mats["*joint*"] @ g.T
    return -sum(query[k].double().numpy() @ m @ train[k].double().numpy().T for k, m in mats.items())


ESTIMATORS = {"gn": GaussNewton(damping_rn=0), "datainf": DataInf(), "graddot": GradDot(), "lissa": LiSSA(),
              "exact": ExactHessian(damping=0.01)}


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_store_memory_query_batched_and_dense_formula_agree(tmp_path, name):
    est = ESTIMATORS[name]
    t, train, query = task()
    comp = Dropout(r=20, seed=3)
    mem = Attributor(t["model"], t["loss_fn"], compressor=comp, estimator=est, progress=False)
    feats = mem.featurize(train)
    qf = mem.compute_features(query)
    want = dense_scores(dense_matrices(name, feats.data, t["model"], t["loss_fn"], train, mem), feats.data, qf.data)
    tol = dict(rtol=2e-4, atol=2e-5 * np.abs(want).max())
    np.testing.assert_allclose(mem.score(qf), want, **tol)
    # query batches of 3 against train blocks of 50 rows (in memory)
    small = ScoreOptions(query_batch=3, train_batch=50)
    np.testing.assert_allclose(mem.score(qf, options=small), want, **tol)
    # streamed from a store (shards of 40 rows), float64 products
    disk = Attributor(t["model"], t["loss_fn"], compressor=comp, estimator=est, progress=False)
    disk.featurize(train, store=StoreOptions(tmp_path / "s", chunk_size=40))
    np.testing.assert_allclose(disk.score(qf, options=ScoreOptions(dtype="float64", query_batch=7)), want, **tol)
    # self-influence is the diagonal of the train × train score matrix, on both paths
    full = dense_scores(dense_matrices(name, feats.data, t["model"], t["loss_fn"], train, mem), feats.data, feats.data)
    diag_tol = dict(rtol=2e-4, atol=2e-5 * np.abs(np.diag(full)).max())
    np.testing.assert_allclose(mem.self_influence(), np.diag(full), **diag_tol)
    np.testing.assert_allclose(disk.self_influence(), np.diag(full), **diag_tol)
    np.testing.assert_allclose(np.diag(mem.score(feats)), mem.self_influence(), **diag_tol)


@pytest.mark.parametrize("name", ["gn", "datainf", "graddot", "lissa"])
def test_kernel_form_when_r_exceeds_n_equals_dense_formula(tmp_path, name):
    """Identity features of 40 train rows: both layers have r_l > n (208 and 68 > 40), so M is kept
    as a·I + Gᵀ C G (Woodbury / spectral form). Store and memory paths both match the dense M."""
    est = ESTIMATORS[name]
    t, train, query = task(n=40)
    mem = Attributor(t["model"], t["loss_fn"], compressor=Identity(), estimator=est, progress=False)
    feats = mem.featurize(train)
    assert all(b.form == ("identity" if name == "graddot" else "kernel") for b in mem.preconditioner.blocks)
    qf = mem.compute_features(query)
    want = dense_scores(dense_matrices(name, feats.data), feats.data, qf.data)
    tol = dict(rtol=1e-3, atol=1e-4 * np.abs(want).max())
    np.testing.assert_allclose(mem.score(qf, options=ScoreOptions(dtype="float64")), want, **tol)
    disk = Attributor(t["model"], t["loss_fn"], compressor=Identity(), estimator=est, progress=False)
    disk.featurize(train, store=StoreOptions(tmp_path / "s", chunk_size=16))
    np.testing.assert_allclose(disk.score(qf, options=ScoreOptions(dtype="float64", query_batch=4)), want, **tol)
    full = dense_scores(dense_matrices(name, feats.data), feats.data, feats.data)
    np.testing.assert_allclose(disk.self_influence(ScoreOptions(dtype="float64")), np.diag(full), rtol=1e-3,
                               atol=1e-4 * np.abs(np.diag(full)).max())


@pytest.mark.parametrize("name", ["gn", "exact"])
def test_per_layer_scores_sum_to_the_total(tmp_path, name):
    t, train, query = task()
    attr = Attributor(t["model"], t["loss_fn"], compressor=Dropout(r=20), estimator=ESTIMATORS[name], progress=False)
    attr.featurize(train, store=StoreOptions(tmp_path / "s", chunk_size=64))
    total = attr.score(query)
    parts = attr.score(query, per_layer=True)
    assert sorted(parts) == ["0", "2"] and all(p.shape == total.shape for p in parts.values())
    np.testing.assert_allclose(sum(parts.values()), total, rtol=1e-4, atol=1e-6 * np.abs(total).max())
    assert all(np.abs(p).max() > 0 for p in parts.values())


def test_topk_and_mean_query_through_the_same_scorer(tmp_path):
    t, train, query = task()
    attr = Attributor(t["model"], t["loss_fn"], compressor=Dropout(r=20), progress=False)
    attr.featurize(train, store=StoreOptions(tmp_path / "s", chunk_size=33))
    dense = attr.score(query)
    top = attr.topk(query, k=5, options=ScoreOptions(query_batch=4))
    np.testing.assert_array_equal(top.harmful_idx, np.argsort(-dense, 1, kind="stable")[:, :5])
    np.testing.assert_array_equal(top.helpful_idx, np.argsort(dense, 1, kind="stable")[:, :5])
    mean = attr.score(query, reduce="mean")
    np.testing.assert_allclose(mean[0], dense.mean(0), rtol=1e-4, atol=1e-6 * np.abs(dense).max())
    # a store of query features is a query source too (for more queries than fit in memory)
    qattr = Attributor(t["model"], t["loss_fn"], compressor=Dropout(r=20), progress=False)
    qstore = qattr.featurize(query, store=StoreOptions(tmp_path / "q", chunk_size=6))
    np.testing.assert_allclose(attr.score(qstore), dense, rtol=1e-4, atol=1e-6 * np.abs(dense).max())


def test_score_out_of_the_wrong_shape_is_refused(tmp_path):
    from dropinf.errors import ConfigError
    t, train, query = task()
    attr = Attributor(t["model"], t["loss_fn"], compressor=Dropout(r=20), progress=False)
    attr.featurize(train)
    with pytest.raises(ConfigError, match=r"out has shape \(3, 3\).*\(20, 230\)"):
        attr.score(query, out=np.zeros((3, 3), dtype=np.float32))
