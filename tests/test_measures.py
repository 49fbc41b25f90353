"""Measurement functions on the query side (dropinf.measures) and token-level scores, each against
a reference built from a loop of single-example (single-token) backward passes."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from dropinf import Attributor, Dropout, GaussNewton, Identity, LossShapeError
from dropinf.measures import causal_lm, completion_nll, margin, token_nll

from .helpers import ce_loss, loader, loop_grads, tiny_data, tiny_mlp

LAM = 0.1


def reference(model, loss_fn, measure, train_batch, query_batch, layers):
    """−Σ_l ∇f(q)_l (G_lᵀG_l/n + λI)⁻¹ ∇L(i)_l with every gradient from a single-example loop."""
    total = 0
    for name in layers:
        names = [f"{name}.weight", f"{name}.bias"]
        gt = loop_grads(model, loss_fn, train_batch, names).double()
        gq = loop_grads(model, measure, query_batch, names).double()
        h = gt.T @ gt / gt.shape[0] + LAM * torch.eye(gt.shape[1], dtype=torch.float64)
        total = total - gq @ torch.linalg.solve(h, gt.T)
    return total.numpy()


def whole(ds):
    return tuple(t for t in ds.tensors)


def test_margin_matches_loop_reference():
    model = tiny_mlp().double()
    train, query = tiny_data(40), tiny_data(9, seed=1)
    measure = margin(lambda m, b: (m(b[0]), b[1]))
    attr = Attributor(model, ce_loss, compressor=Identity(), estimator=GaussNewton(damping=LAM), progress=False)
    attr.featurize(loader(train))
    got = attr.score(loader(query), measure=measure)
    want = reference(model, ce_loss, measure, whole(train), whole(query), ["0", "2"])
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5 * np.abs(want).max())
    # the margin measure is not the loss: the scores differ from the loss's
    assert not np.allclose(got, attr.score(loader(query)), rtol=1e-2)
    # value check: f = −(z_y − logsumexp_{c≠y} z_c)
    x, y = whole(query)
    z = model(x)
    other = torch.stack([torch.cat([z[b, :y[b]], z[b, y[b] + 1:]]).logsumexp(0) for b in range(len(y))])
    torch.testing.assert_close(measure(model, (x, y)), other - z[torch.arange(len(y)), y])


class TinyLM(nn.Module):
    """A causal toy LM: embedding, running mean over positions, a Linear, a head."""

    def __init__(self, vocab=11, dim=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        h = h.cumsum(1) / torch.arange(1, h.shape[1] + 1, dtype=h.dtype)[None, :, None]
        return SimpleNamespace(logits=self.head(torch.tanh(self.mix(h))))


def lm_data(n, T=7, vocab=11, seed=0, prompt=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, T), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :prompt] = -100            # prompt tokens do not count
    return ids, mask, labels


class DictDS(torch.utils.data.Dataset):
    def __init__(self, ids, mask, labels):
        self.t = (ids, mask, labels)

    def __len__(self):
        return len(self.t[0])

    def __getitem__(self, i):
        return {"input_ids": self.t[0][i], "attention_mask": self.t[1][i], "labels": self.t[2][i]}


def lm_setup():
    torch.manual_seed(0)
    model = TinyLM().double()
    loss = completion_nll(causal_lm)
    train = DictDS(*lm_data(24))
    query = DictDS(*lm_data(5, seed=3, prompt=3))      # a 3-token prompt, the rest is the completion
    as_batch = lambda ds: {k: v for k, v in zip(("input_ids", "attention_mask", "labels"), ds.t)}
    return model, loss, train, query, as_batch


def test_completion_nll_matches_loop_reference():
    model, loss, train, query, as_batch = lm_setup()
    attr = Attributor(model, loss, compressor=Identity(), estimator=GaussNewton(damping=LAM), progress=False)
    attr.featurize(loader(train, 8))
    got = attr.score(loader(query, 2), measure=completion_nll(causal_lm))
    want = reference(model, loss, completion_nll(causal_lm), as_batch(train), as_batch(query), ["mix", "head"])
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-6 * np.abs(want).max())
    # −log p(completion): the prompt's tokens do not count
    b = as_batch(query)
    logp = torch.log_softmax(model(b["input_ids"]).logits[:, :-1], -1)
    tok = logp.gather(2, b["input_ids"][:, 1:, None]).squeeze(2)[:, 2:]
    torch.testing.assert_close(completion_nll(causal_lm)(model, b), -tok.sum(1))


def test_token_scores_match_per_token_loop_and_sum_to_completion():
    model, loss, train, query, as_batch = lm_setup()
    attr = Attributor(model, loss, compressor=Identity(), estimator=GaussNewton(damping=LAM), progress=False)
    attr.featurize(loader(train, 8))
    tok = attr.token_scores(loader(query, 2), token_nll(causal_lm))
    q, T = len(query), query.t[0].shape[1] - 1
    assert tok.shape == (q, T, len(train))
    qb = as_batch(query)
    for t in (0, 2, 3, T - 1):       # prompt tokens (0 and 1 are not counted) and completion tokens
        one = lambda m, b, t=t: token_nll(causal_lm)(m, b)[:, t]
        want = reference(model, loss, one, as_batch(train), qb, ["mix", "head"])
        np.testing.assert_allclose(tok[:, t], want, rtol=1e-3, atol=1e-6 * max(np.abs(want).max(), 1e-12))
    assert np.abs(tok[:, :2]).max() == 0         # not-counted tokens have no influence
    whole_seq = attr.score(loader(query, 2), measure=completion_nll(causal_lm))
    np.testing.assert_allclose(tok.sum(1), whole_seq, rtol=1e-4, atol=1e-6 * np.abs(whole_seq).max())


def test_token_scores_with_dropout_add_up():
    model, loss, train, query, _ = lm_setup()
    attr = Attributor(model, loss, compressor=Dropout(r=9, seed=2), progress=False)
    attr.featurize(loader(train, 8))
    tok = attr.token_scores(loader(query, 3), token_nll(causal_lm))
    whole_seq = attr.score(loader(query, 3), measure=completion_nll(causal_lm))
    np.testing.assert_allclose(tok.sum(1), whole_seq, rtol=1e-4, atol=1e-6 * np.abs(whole_seq).max())


def test_token_scores_refuse_a_per_example_measure():
    model, loss, train, query, _ = lm_setup()
    attr = Attributor(model, loss, compressor=Identity(), progress=False)
    attr.featurize(loader(train, 8))
    with pytest.raises(LossShapeError, match=r"\(B, T\)"):
        attr.token_scores(loader(query, 2), completion_nll(causal_lm))
