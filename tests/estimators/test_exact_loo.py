"""Exact-Hessian influence vs actual leave-one-out retraining on a convex model (real data).

L2-regularised logistic regression on sklearn's breast-cancer data, trained to convergence in
float64. Removing train point i changes the test loss by ≈ −I(q, i)/n (first-order influence),
so the predicted change −I/n is compared with the actual change after retraining without i.
"""

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr
from torch import nn

from dropinf import Attributor, CaptureOptions, ExactHessian, GaussNewton, Identity

ALPHA = 1e-2


def loss_fn(model, batch):
    x, y = batch
    ce = nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(-1), y, reduction="none")
    return ce + 0.5 * ALPHA * (model.weight ** 2).sum()


def fit(model, x, y, steps=200):
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=steps, tolerance_grad=1e-12,
                            tolerance_change=1e-15, history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn(model, (x, y)).mean()
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    return model


@pytest.fixture(scope="module")
def problem():
    from sklearn.datasets import load_breast_cancer
    from sklearn.preprocessing import StandardScaler
    x, y = load_breast_cancer(return_X_y=True)
    x = StandardScaler().fit_transform(x)
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(x))
    tr, te = perm[:300], perm[300:]
    xt = torch.tensor(x[tr]); yt = torch.tensor(y[tr], dtype=torch.float64)
    xq = torch.tensor(x[te]); yq = torch.tensor(y[te], dtype=torch.float64)
    torch.manual_seed(0)
    model = fit(nn.Linear(30, 1).double(), xt, yt)
    # the test point with the highest loss: its LOO effects are the largest
    with torch.no_grad():
        q = int(loss_fn(model, (xq, yq)).argmax())
    return model, xt, yt, xq[q:q + 1], yq[q:q + 1]


def loo_changes(problem, removed):
    model, xt, yt, xq, yq = problem
    base = float(loss_fn(model, (xq, yq))[0])
    out = []
    for i in removed:
        keep = torch.ones(len(xt), dtype=torch.bool)
        keep[i] = False
        m = nn.Linear(30, 1).double()
        m.load_state_dict(model.state_dict())  # warm start at θ*
        fit(m, xt[keep], yt[keep])
        out.append(float(loss_fn(m, (xq, yq))[0]) - base)
    return np.array(out)


def influence(problem, estimator, fused=True):
    model, xt, yt, xq, yq = problem
    dl = lambda x, y: torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=100)
    attr = Attributor(model, loss_fn, compressor=Identity(), estimator=estimator, progress=False,
                      options=None if fused else CaptureOptions(fused=False))    # ExactHessian: torch.func
    attr.featurize(dl(xt, yt))
    return attr.score(dl(xq, yq))[0]


def test_exact_hessian_matches_leave_one_out(problem):
    n = len(problem[1])
    scores = influence(problem, ExactHessian())
    order = np.argsort(-np.abs(scores))
    removed = np.concatenate([order[:40], np.random.default_rng(1).choice(order[40:], 20, replace=False)])
    actual = loo_changes(problem, removed)
    predicted = -scores[removed] / n
    r_exact = pearsonr(predicted, actual)[0]
    # the weight decay inside loss_fn never reaches the fused hooks: the self-check sends the
    # layer to torch.func (which sees the whole loss) and says why
    with pytest.warns(UserWarning, match="weight decay"):
        routed = influence(problem, GaussNewton())
    gn = influence(problem, GaussNewton(), fused=False)      # torch.func sees the whole loss
    np.testing.assert_allclose(routed, gn, rtol=1e-4, atol=1e-6 * np.abs(gn).max())
    r_gn = pearsonr(-gn[removed] / n, actual)[0]
    # the scale: removing i changes q's loss by ≈ −I(q, i)/n — a slope of 1 for the exact Hessian;
    # the damped Gauss-Newton approximation keeps the ranking but not the magnitude (README)
    slope = lambda pred: float(pred @ actual / (pred @ pred))
    s_exact, s_gn = slope(predicted), slope(-gn[removed] / n)
    print(f"\nLOO on breast cancer ({len(removed)} removed): Pearson exact-Hessian={r_exact:.4f}, "
          f"Orig Gauss-Newton={r_gn:.4f}; slope actual/predicted exact={s_exact:.3f}, GN={s_gn:.3f}")
    assert r_exact >= 0.95
    assert 0.8 < s_exact < 1.35        # measured 1.20: first order under-predicts the largest effects a little
    assert np.sign(predicted).tolist().count(0) == 0
    assert r_gn > 0.5  # reported; GN (with the paper's damping) is an approximation
