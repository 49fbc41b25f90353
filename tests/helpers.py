"""Independent references for tests: per-example gradients by a loop of single-example backward
passes (no hooks, no torch.func), and tiny models/data."""

from __future__ import annotations

import torch
from torch import nn


def loop_grads(model: nn.Module, loss_fn, batch, param_names) -> torch.Tensor:
    """(B, d) per-example gradients of the named parameters, concatenated in order, computed by
    B separate forward+backward passes on batches of size one."""
    pm = dict(model.named_parameters(remove_duplicate=False))
    params = [pm[n] for n in param_names]
    B = (batch[0] if isinstance(batch, (tuple, list)) else next(iter(batch.values()))).shape[0]
    rows = []
    for i in range(B):
        if isinstance(batch, dict):
            one = {k: v[i:i + 1] for k, v in batch.items()}
        else:
            one = type(batch)(t[i:i + 1] for t in batch)
        loss = loss_fn(model, one).sum()
        # .backward() (not autograd.grad): works under re-entrant checkpointing too; .grad restored
        every = list(model.parameters())
        old = [p.grad for p in every]
        for p in every:
            p.grad = None
        loss.backward()
        gs = [p.grad for p in params]
        for p, g in zip(every, old):
            p.grad = g
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g.to_dense() if g.is_sparse else g).reshape(-1)
                               for p, g in zip(params, gs)]))
    return torch.stack(rows)


def ce_loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y, reduction="none")


def tiny_data(n=48, d_in=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    return torch.utils.data.TensorDataset(x, y)


def loader(ds, bs=16):
    return torch.utils.data.DataLoader(ds, batch_size=bs, shuffle=False)


def tiny_mlp(d_in=6, hidden=10, classes=3, seed=0, bias=True):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden, bias=bias), nn.Tanh(), nn.Linear(hidden, classes, bias=bias))


def fit_score(estimator, train, query, fitted=None):
    """(n_query, n_train) float64 scores through the library's one scorer."""
    from dropinf.score import ScoreOptions, Scorer
    fitted = fitted if fitted is not None else estimator.fit(train)
    return Scorer(fitted, train, ScoreOptions(dtype="float64"), progress=False).dense(query)


def fit_self(estimator, train, fitted=None):
    from dropinf.score import ScoreOptions, Scorer
    fitted = fitted if fitted is not None else estimator.fit(train)
    return Scorer(fitted, train, ScoreOptions(dtype="float64"), progress=False).self_influence()
