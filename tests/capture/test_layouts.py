"""Capture on layouts and module kinds a new user brings, row by row against a loop of single-example
backward passes (tests.helpers.loop_grads), with the default ``track`` and ``track="all"``.

Each case must either give every example's own row (relative error < 1e-3 per row; 3e-2 under
bfloat16 autocast) or raise a DropinfError naming the module and the cause. Rows are compared, not
sums: a sum cannot see rows given to the wrong example.
"""

import warnings

import pytest
import torch
from torch import nn

from dropinf import Attributor, DropinfError, Dropout, GradDot, Identity
from tests.helpers import loop_grads

TRACKS = [None, "all"]


def ce(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y, reduction="none")


def rows_of(model, batch, track=None, loss=ce, compressor=None):
    """Captured rows {layer: (B, r)} through the front door (compute_features), and the Attributor."""
    attr = Attributor(model, loss, compressor=compressor or Identity(), estimator=GradDot(), track=track,
                      progress=False)
    feats = attr.compute_features([batch])
    return feats.data, attr


def assert_rows(model, batch, track=None, loss=ce, rtol=1e-3, reference=None, compressor=None):
    """Every layer's captured rows equal the compression of the loop reference, row by row."""
    model.eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data, attr = rows_of(model, batch, track, loss, compressor)
    for layer in attr.layers:
        want = (reference or loop_grads)(model, loss, batch, layer.param_names)
        want = attr.compressors[layer.name].from_flat(want.to(data[layer.name].dtype)).double()
        got = data[layer.name].double()
        err = (got - want).norm(dim=1) / want.norm(dim=1).clamp_min(1e-12 * float(want.norm()) + 1e-30)
        assert float(err.max()) < rtol, f"layer {layer.name}: row errors {err.tolist()}"
    return attr, [str(w.message) for w in caught]


def tokens(B, T, V=13, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, classes, (B,), generator=g)


def feats(B, T, D, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, D, generator=g, dtype=torch.float64), torch.randint(0, classes, (B,), generator=g)


# ------------------------------------------------------------------ sequence-first layouts
class SeqFirstEncoder(nn.Module):
    """PyTorch's default nn.TransformerEncoderLayer(batch_first=False): its Linears see (T, B, D)."""

    def __init__(self, V=13, D=8):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.enc = nn.TransformerEncoderLayer(D, 2, 16, dropout=0.0)
        self.head = nn.Linear(D, 3)

    def forward(self, ids):
        h = self.enc(self.emb(ids).transpose(0, 1))       # (T, B, D)
        return self.head(h.mean(0))


@pytest.mark.parametrize("track", TRACKS)
@pytest.mark.parametrize("T", [4, 6], ids=["T==B", "T!=B"])
def test_transformer_encoder_layer_sequence_first(track, T):
    torch.manual_seed(0)
    model = SeqFirstEncoder().double()
    attr, msgs = assert_rows(model, tokens(4, T), track)
    # the Linears are read with the batch in dim 1 by the fused hooks, not sent to torch.func
    assert not any("enc.linear1" in m and "torch.func" in m for m in msgs), msgs


class SeqFirstRNN(nn.Module):
    """A per-step head on the (T, B, H) output of a sequence-first LSTM / GRU."""

    def __init__(self, cell, D=5, H=6):
        super().__init__()
        self.rnn = cell(D, H)
        self.step = nn.Linear(H, 3)

    def forward(self, x):
        out, _ = self.rnn(x.transpose(0, 1))              # (T, B, H)
        return self.step(out).mean(0)


@pytest.mark.parametrize("track", TRACKS)
@pytest.mark.parametrize("T", [3, 5], ids=["T==B", "T!=B"])
@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU], ids=["lstm", "gru"])
def test_rnn_sequence_first_with_per_step_head(cell, T, track):
    torch.manual_seed(0)
    assert_rows(SeqFirstRNN(cell).double(), feats(3, T, 5), track)


def test_sequence_first_batch_itself_fused_and_refused_for_torch_func():
    """The batch's own tensor is (T, B, D): the fused hooks read it from the loss's batch size; a
    torch.func block (which slices the batch along dim 0) is refused with the cause, not wrong."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.LayerNorm(6), nn.Linear(6, 3)).double()

    def loss(m, batch):
        x, y = batch                                       # x: (T, B, D), y: (B,)
        return nn.functional.cross_entropy(m(x).mean(0), y, reduction="none")

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 3, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (3,), generator=g)

    def reference(m, lf, batch, names):
        return loop_grads(m, lambda mm, b: lf(mm, (b[0].transpose(0, 1), b[1])), (x.transpose(0, 1), y), names)

    assert_rows(model, (x, y), None, loss, reference=reference)
    assert_rows(model, (x, y), None, loss, reference=reference, compressor=Dropout(r=7, seed=3))
    with pytest.raises(DropinfError, match=r"(?s)'2'.*batch-first"):
        rows_of(model, (x, y), "all", loss)


class Flattened(nn.Module):
    """A Linear on batch and positions flattened batch-major: (B·T, D)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        B, T, D = x.shape
        h = torch.tanh(self.a(x.reshape(B * T, D))).reshape(B, T, -1)
        return self.b(h.sum(1))


@pytest.mark.parametrize("track", TRACKS)
def test_batch_and_positions_flattened(track):
    torch.manual_seed(0)
    assert_rows(Flattened().double(), feats(3, 4, 4), track)


# ------------------------------------------------------------------ inputs shared by the batch
class Prompt(nn.Module):
    """A learned prompt (1, P, D) through a Linear, then repeated over the batch."""

    def __init__(self):
        super().__init__()
        self.prompt = nn.Parameter(torch.randn(1, 2, 4))
        self.proj = nn.Linear(4, 4)
        self.inp = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        p = self.proj(self.prompt).repeat(x.shape[0], 1, 1)          # .repeat(B) on the output
        return self.head(torch.tanh(torch.cat([p, self.inp(x)], 1)).mean(1))


class BiasTable(nn.Module):
    """A buffer turned into a bias table by a small MLP, indexed with out[0] and broadcast (Swin-v2)."""

    def __init__(self, T=3):
        super().__init__()
        self.register_buffer("coords", torch.linspace(-1, 1, T * T).reshape(1, T * T, 1))
        self.mlp = nn.Sequential(nn.Linear(1, 6), nn.ReLU(inplace=True), nn.Linear(6, 1))
        self.inp = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        B, T, _ = x.shape
        bias = self.mlp(self.coords)[0].view(T, T)                   # out[0], .view
        att = torch.softmax(x @ x.transpose(1, 2) + bias, -1)
        return self.head((att @ self.inp(x)).mean(1))


class PerExampleLoop(nn.Module):
    """A model that loops over examples and calls its layers on x[i:i+1]."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return torch.cat([self.b(torch.tanh(self.a(x[i:i + 1])).mean(1)).squeeze(0)[None] for i in range(x.shape[0])])


class InPlaceOnOutput(nn.Module):
    """Shared (1, T, D) output modified in place and squeezed."""

    def __init__(self):
        super().__init__()
        self.pos = nn.Linear(1, 4)
        self.head = nn.Linear(4, 3)
        self.register_buffer("t", torch.arange(3.0).reshape(1, 3, 1))

    def forward(self, x):
        p = self.pos(self.t)
        p.mul_(0.5)
        return self.head(torch.tanh(x + p.squeeze(0)).mean(1))


@pytest.mark.parametrize("track", TRACKS)
@pytest.mark.parametrize("model_cls", [Prompt, BiasTable, PerExampleLoop, InPlaceOnOutput],
                         ids=["prompt", "bias-table", "per-example-loop", "inplace-squeeze"])
def test_inputs_shared_by_the_batch(model_cls, track):
    torch.manual_seed(0)
    model = model_cls().double()
    attr, msgs = assert_rows(model, feats(3, 3, 4) if model_cls is not PerExampleLoop else feats(3, 2, 4), track)
    assert any("torch.func" in m and "shared by the whole batch" in m for m in msgs), msgs
    assert not any("mixed the examples" in m and "shared" not in m for m in msgs), msgs


# ------------------------------------------------------------------ parametrized weights
P = torch.nn.utils.parametrizations


def _param_models():
    old = torch.nn.utils

    def mk(wrap):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
        wrap(m[0])
        return m
    return {
        "weight_norm": lambda: mk(P.weight_norm),
        "spectral_norm": lambda: mk(P.spectral_norm),
        "orthogonal": lambda: mk(lambda l: P.orthogonal(l)),
        "old_weight_norm": lambda: mk(old.weight_norm),
        "old_spectral_norm": lambda: mk(old.spectral_norm),
    }


@pytest.mark.parametrize("track", TRACKS)
@pytest.mark.parametrize("kind", list(_param_models()))
def test_parametrized_weights(kind, track):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")           # the old-style APIs are deprecated
        model = _param_models()[kind]()
    x, y = feats(4, 1, 4)
    attr, _ = assert_rows(model, (x[:, 0], y), track)
    names = [n for l in attr.layers for n in l.param_names]
    assert any("original" in n or "weight_g" in n or "weight_orig" in n for n in names), names
    assert "0.bias" in names


# ------------------------------------------------------------------ module calls and embeddings
class Keyword(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj, self.head = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.head(input=torch.tanh(self.proj(input=x)))


@pytest.mark.parametrize("track", TRACKS)
def test_module_called_with_keyword_arguments(track):
    torch.manual_seed(0)
    x, y = feats(3, 1, 4)
    attr, msgs = assert_rows(Keyword().double(), (x[:, 0], y), track)
    assert not any("torch.func" in m for m in msgs), msgs


class Emb(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.emb = nn.Embedding(13, 4, **kw)
        self.head = nn.Linear(4, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)).mean(1))


@pytest.mark.parametrize("track", TRACKS + [[nn.Embedding]])
def test_sparse_embedding(track):
    torch.manual_seed(0)
    assert_rows(Emb(sparse=True).double(), tokens(4, 5), track)


@pytest.mark.parametrize("track", TRACKS)
def test_embedding_sequence_first_ids(track):
    class SeqIds(Emb):
        def forward(self, ids):
            return self.head(torch.tanh(self.emb(ids.t())).mean(0))  # (T, B) ids
    torch.manual_seed(0)
    assert_rows(SeqIds().double(), tokens(4, 4), track)


def test_max_norm_embedding_rows_and_unseen_query_tokens():
    """max_norm renormalises looked-up rows in place: rows stay exact, and queries with tokens unseen in
    training neither change the fingerprint nor get refused."""
    torch.manual_seed(0)
    model = Emb(max_norm=0.5).double()
    with torch.no_grad():
        model.emb.weight.mul_(3.0)                         # every row above max_norm
    train = (torch.randint(0, 6, (6, 4)), torch.randint(0, 3, (6,)))
    assert_rows(model, train, "all")
    attr = Attributor(model, ce, compressor=Dropout(r=16), track="all", progress=False)
    attr.featurize([train])
    query = (torch.randint(6, 13, (3, 4)), torch.randint(0, 3, (3,)))   # tokens never seen in training
    assert attr.score([query]).shape == (3, 6)


# ------------------------------------------------------------------ reduced precision
def autocast_ce(m, batch):
    """Cross-entropy per example with the forward under CPU bfloat16 autocast."""
    x, y = batch
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    return nn.functional.cross_entropy(out.float(), y, reduction="none")


@pytest.mark.parametrize("track", TRACKS)
def test_autocast_bfloat16_loss(track):
    """Correct features under CPU bf16 autocast are not refused; rows equal the loop under the same
    autocast to bf16 precision (3e-2)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).float()

    x, y = feats(6, 1, 8)
    attr, msgs = assert_rows(model, (x[:, 0].float(), y), track, autocast_ce, rtol=3e-2)
    assert not any("torch.func" in m for m in msgs), msgs


# ------------------------------------------------------------------ what cannot be made correct
@pytest.mark.parametrize("track", TRACKS)
def test_examples_interacting_in_the_batch_are_refused_with_the_cause(track):
    """BatchNorm in training mode mixes the examples; with eval_mode=False nothing can separate them."""
    from dropinf import CaptureOptions
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).double()
    x, y = feats(6, 1, 4)
    attr = Attributor(model, ce, compressor=Identity(), track=track, progress=False,
                      options=CaptureOptions(eval_mode=False))
    with pytest.raises(DropinfError, match=r"(?s)'\d'.*interact within the batch"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            attr.compute_features([(x[:, 0], y)])


# ------------------------------------------------------------------ the check itself
def test_rows_given_to_the_wrong_example_are_caught(monkeypatch):
    """Sabotage the fused path so that every row goes to the wrong example (batch order reversed):
    the batch sum is unchanged, the per-example check sees it, and the layer goes to torch.func."""
    import dropinf.capture.hooks as hooks
    real = hooks.batch_first
    monkeypatch.setattr(hooks, "batch_first", lambda *a: tuple(t.flip(0) for t in real(*a)))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = feats(5, 1, 4)
    _, msgs = assert_rows(model, (x[:, 0], y), None, compressor=Dropout(r=9, seed=0))
    assert sum("mixed the examples" in m for m in msgs) == 2, msgs


def test_layout_learned_on_one_batch_serves_later_ambiguous_ones():
    """Sequence-first encoder over batches of varying T: T != B first (unambiguous), then T == B and a
    smaller last batch; every row of every batch is that example's own gradient."""
    torch.manual_seed(0)
    model = SeqFirstEncoder().double().eval()
    batches = [tokens(4, 6, seed=1), tokens(4, 4, seed=2), tokens(3, 3, seed=3), tokens(1, 5, seed=4)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        attr = Attributor(model, ce, compressor=Identity(), estimator=GradDot(), progress=False)
        data = attr.compute_features(batches).data
    assert not any("enc.linear" in str(w.message) for w in caught)
    start = 0
    for batch in batches:
        B = batch[0].shape[0]
        for layer in attr.layers:
            want = loop_grads(model, ce, batch, layer.param_names)
            torch.testing.assert_close(data[layer.name][start:start + B].double(), want, rtol=1e-4,
                                       atol=1e-6 * float(want.abs().max()))
        start += B


@pytest.mark.parametrize("track", TRACKS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights(dtype, track):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)

    def loss(m, batch):
        x, y = batch
        return nn.functional.cross_entropy(m(x).float(), y, reduction="none")

    x, y = feats(6, 1, 8)
    _, msgs = assert_rows(model, (x[:, 0].to(dtype), y), track, loss, rtol=3e-2)
    assert not any("torch.func" in m and "captured through" in m for m in msgs), msgs


def test_reduced_precision_is_named_when_a_layer_fails_under_autocast():
    """A real failure (weight decay written into the loss) under bf16 autocast: the layer goes to
    torch.func and the warning names both the cause and the reduced precision."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).float()

    def loss(m, batch):                     # weight decay written into the loss
        return autocast_ce(m, batch) + 0.5 * (m[2].weight ** 2).sum()

    x, y = feats(6, 1, 8)
    _, msgs = assert_rows(model, (x[:, 0].float(), y), None, loss, rtol=3e-2)
    assert any("layer '2'" in m and "weight decay" in m and "bfloat16" in m for m in msgs), msgs


def test_token_scores_on_a_sequence_first_model_with_T_equal_B():
    """Token-level capture verifies layouts too: a sequence-first tagger with T == B gives per-token
    scores that add up to the (self-checked) sequence-level scores of the summed measure."""
    import numpy as np
    from dropinf import GaussNewton

    class Tagger(SeqFirstEncoder):
        def forward(self, ids):
            return self.head(self.enc(self.emb(ids).transpose(0, 1))).transpose(0, 1)   # (B, T, 3)

    def token_loss(m, batch):
        ids, tags = batch
        return nn.functional.cross_entropy(m(ids).transpose(1, 2), tags, reduction="none")      # (B, T)

    torch.manual_seed(0)
    model = Tagger().double().eval()
    g = torch.Generator().manual_seed(5)
    train = [(torch.randint(0, 13, (4, 4), generator=g), torch.randint(0, 3, (4, 4), generator=g)) for _ in range(3)]
    query = [(torch.randint(0, 13, (4, 4), generator=g), torch.randint(0, 3, (4, 4), generator=g))]
    summed = lambda m, b: token_loss(m, b).sum(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attr = Attributor(model, summed, compressor=Dropout(r=24, seed=0), estimator=GaussNewton(), progress=False,
                          track=["enc.linear1", "enc.linear2", "head"])
        attr.featurize(train)
        tok = attr.token_scores(query, token_loss)
        seq = attr.score(query)
    # float32 scores of a small, ill-conditioned fit: agreement to ~1e-3 (wrong rows differ by O(1))
    np.testing.assert_allclose(tok.sum(1), seq, rtol=1e-2, atol=1e-3 * np.abs(seq).max())


# ------------------------------------------------------------------ more module kinds
class ConvPerExample(nn.Module):
    """Conv2d called on each unbatched (C, H, W) image in a loop."""

    def __init__(self):
        super().__init__()
        self.c, self.h = nn.Conv2d(2, 3, 3, padding=1), nn.Linear(3, 3)

    def forward(self, x):
        return torch.cat([self.h(torch.tanh(self.c(x[i])).mean((1, 2)))[None] for i in range(x.shape[0])])


class ReflectConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c, self.h = nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), nn.Linear(3, 3)

    def forward(self, x):
        return self.h(torch.tanh(self.c(x)).mean((2, 3)))


class SharedAndBatched(nn.Module):
    """One Linear called on the batch and on a (1, D) parameter in the same forward."""

    def __init__(self):
        super().__init__()
        self.l, self.h = nn.Linear(4, 4), nn.Linear(4, 3)
        self.p = nn.Parameter(torch.randn(1, 4))

    def forward(self, x):
        return self.h(torch.tanh(self.l(x) + self.l(self.p)))


@pytest.mark.parametrize("track", TRACKS)
@pytest.mark.parametrize("case", ["conv-per-example", "reflect-conv", "freq-embedding", "shared-and-batched"])
def test_more_module_kinds(case, track):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    images = (torch.randn(3, 2, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (3,), generator=g))
    x, y = feats(3, 1, 4)
    model, batch = {"conv-per-example": (ConvPerExample, images), "reflect-conv": (ReflectConv, images),
                    "freq-embedding": (lambda: Emb(scale_grad_by_freq=True), tokens(4, 5)),
                    "shared-and-batched": (SharedAndBatched, (x[:, 0], y))}[case]
    assert_rows(model().double(), batch, track)


def test_dict_batch_with_a_mask_shared_by_the_batch():
    """A (T, T) mask in the batch dict is not batch-first: slicing the batch cannot give an example,
    so the check takes the examples' gradients from the batch's graph; rows stay exact."""
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.l, self.h = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x, mask):
            return self.h((torch.softmax(x @ x.transpose(1, 2) + mask, -1) @ self.l(x)).mean(1))

    def loss(m, b):
        return nn.functional.cross_entropy(m(b["x"], b["mask"]), b["y"], reduction="none")

    torch.manual_seed(0)
    model = Masked().double().eval()
    g = torch.Generator().manual_seed(0)
    x, mask = torch.randn(3, 3, 4, generator=g, dtype=torch.float64), torch.randn(3, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (3,), generator=g)
    for track in TRACKS:
        data, attr = rows_of(model, {"x": x, "mask": mask, "y": y}, track, loss)
        for layer in attr.layers:
            want = torch.cat([loop_grads(model, loss, {"x": x[i:i + 1], "mask": mask[None], "y": y[i:i + 1]},
                                         layer.param_names) for i in range(3)])
            torch.testing.assert_close(data[layer.name].double(), want, rtol=1e-5, atol=1e-7)
