"""Rotated dropout (compress.rotated): the randomized Hadamard rotation is orthogonal, so with every
rotated coordinate kept the features have Orig's inner products (and GaussNewton with a fixed λ
gives Orig's scores); the fused hook's entries equal the rotated entries of the per-example
gradient from a loop of single-example backward passes, on every fused module type."""

import numpy as np
import pytest
import torch
from torch import nn

from dropinf import Attributor, Dropout, GaussNewton, GradDot, Identity
from dropinf.capture.engine import BatchCapture
from dropinf.capture.layers import select_layers
from dropinf.compress.rotated import hadamard, hadamard_channels, next_pow2
from tests.helpers import ce_loss, loader, loop_grads, tiny_data, tiny_mlp


@pytest.mark.parametrize("p", [1, 2, 8, 64, 128, 4096])
def test_hadamard_is_orthogonal_and_its_own_inverse(p):
    x = torch.randn(5, p, dtype=torch.float64)
    y = hadamard(x)
    torch.testing.assert_close(y.norm(dim=1), x.norm(dim=1))
    torch.testing.assert_close(hadamard(y), x)
    if p <= 128:      # the matrix itself: entries ±1/√p, orthonormal rows
        h = hadamard(torch.eye(p, dtype=torch.float64))
        torch.testing.assert_close(h @ h.T, torch.eye(p, dtype=torch.float64))
        assert torch.allclose(h.abs(), torch.full_like(h, p ** -0.5))
    xc = torch.randn(3, p, 5, dtype=torch.float64)       # the channel-first form used for convolutions
    torch.testing.assert_close(hadamard_channels(xc), hadamard(xc.transpose(1, 2)).transpose(1, 2))


class Mixed(nn.Module):
    """Every fused kind: Embedding (padding_idx), Conv2d (groups 1 and 2, the latter rotated flat),
    Linear with and without bias, HF-style Conv1D; plus a LayerNorm on the torch.func path."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D
        self.emb = nn.Embedding(11, 6, padding_idx=0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.gconv = nn.Conv2d(4, 4, 3, groups=2, bias=False)
        self.c1d = Conv1D(5, 6)
        self.ln = nn.LayerNorm(5)
        self.fc = nn.Linear(5 + 16, 3)
        self.fc_nb = nn.Linear(3, 3, bias=False)

    def forward(self, batch):
        ids, img = batch
        t = torch.relu_(self.c1d(self.emb(ids))).mean(1)                # (B, 5)
        c = self.gconv(torch.relu(self.conv(img))).flatten(1)           # (B, 16)
        return self.fc_nb(torch.tanh(self.fc(torch.cat([self.ln(t), c], 1))))


def mixed_batch(b=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 11, (b, 7), generator=g)
    ids[:, -2:] = 0                                   # padding tokens
    return ids, torch.randn(b, 1, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (b,), generator=g)


def mixed_loss(model, batch):
    ids, img, y = batch
    return nn.functional.cross_entropy(model((ids, img)), y, reduction="none")


@pytest.fixture(params=["rotate", "full", "auto"])
def rotated_path(request, monkeypatch):
    """Both ways the hook computes rotated entries (rotate the inputs/output-grads, or form the
    per-example weight gradient and rotate it), and the automatic choice between them."""
    from dropinf.compress.rotated import RotatedDropoutLayer
    monkeypatch.setattr(RotatedDropoutLayer, "path", request.param)
    return request.param


@pytest.mark.parametrize("r", [7, 40, 100_000])
def test_fused_entries_equal_rotated_loop_gradient_entries(r, rotated_path):
    torch.manual_seed(0)
    model = Mixed().double().eval()
    batch = mixed_batch()
    layers = select_layers(model, "all")
    comp = Dropout(r=r, seed=3, rotate=True)
    with pytest.warns(UserWarning) if r == 100_000 else _nothing():
        comps = {l.name: comp.build(l) for l in layers}
    feats, _ = BatchCapture(model, mixed_loss, layers, comps, check="always")(batch)
    kinds = {l.name: (l.kind, getattr(comps[l.name], "kron", None)) for l in layers}
    assert kinds["gconv"] == ("fused", False) and kinds["fc"] == ("fused", True) and kinds["ln"][0] == "func"
    for l in layers:
        g = loop_grads(model, mixed_loss, batch, l.param_names)
        want = comps[l.name].from_flat(g)
        got = feats[l.name].double()        # features are float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()),
                                   msg=lambda m: f"layer {l.name}: {m}")
        if r == 100_000:       # every rotated coordinate: inner products are the full gradient's
            torch.testing.assert_close(got @ got.T, g @ g.T, rtol=1e-5, atol=1e-6 * float((g @ g.T).abs().max()),
                                       msg=lambda m: f"layer {l.name}: {m}")


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_all_rotated_coordinates_give_orig_scores_with_a_fixed_damping():
    ds = tiny_data(n=40)
    out = {}
    for name, comp in (("orig", Identity()), ("rot", Dropout(r=10_000, seed=4, rotate=True))):
        model = tiny_mlp(seed=1).double()
        with pytest.warns(UserWarning) if name == "rot" else _nothing():     # r > rotated coordinates
            attr = Attributor(model, ce_loss, compressor=comp, estimator=GaussNewton(damping=0.05), progress=False)
        attr.featurize(loader(ds))
        out[name] = attr.score(loader(ds, bs=9))
    np.testing.assert_allclose(out["rot"], out["orig"], rtol=1e-5, atol=1e-6 * np.abs(out["orig"]).max())


def test_rotation_spreads_a_coherent_gradient_where_plain_sampling_misses_it():
    """A gradient concentrated in one row of a Linear weight: plain Dropout keeps ≈ r/d of the
    rows it needs and often misses the row entirely; after rotation the kept energy is ≈ r/p of
    the total for every example (the property the rotation is for)."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 64, bias=False).double()
    from dropinf.capture.layers import select_layers as sel
    (layer,) = sel(nn.Sequential(lin), None)
    g = torch.zeros(50, 64, 64, dtype=torch.float64)
    g[:, 5, :] = torch.randn(50, 64, dtype=torch.float64)          # all energy in output row 5
    g = g.reshape(50, -1)
    r = 256
    rot = Dropout(r=r, seed=0, rotate=True).build(layer)
    kept = (rot.from_flat(g) ** 2).sum(1) / (g ** 2).sum(1)
    expect = r / (next_pow2(64) ** 2)
    assert 0.5 * expect < float(kept.min()) and float(kept.max()) < 2.0 * expect
    plain = Dropout(r=r, seed=0).build(layer).from_flat(g)
    plain_kept = (plain ** 2).sum(1) / (g ** 2).sum(1)
    assert float(plain_kept.std()) > 3 * float(kept.std())


def test_signature_keeps_old_stores_readable():
    assert "rotate" not in Dropout(r=4).signature()
    assert Dropout(r=4, rotate=True).signature()["rotate"] is True
    from dropinf.compress import from_signature
    assert from_signature(Dropout(r=4, rotate=True).signature()) == Dropout(r=4, rotate=True)
    with pytest.raises(Exception, match="rotate"):
        Dropout(r=4, rotate="yes")


def test_rotated_graddot_scores_are_unbiased_for_orig_with_scale():
    """scale=True makes E[⟨g̃, g̃'⟩] = ⟨g, g'⟩; averaged over seeds, rotated GradDot approaches Orig."""
    ds = tiny_data(n=30)
    model = tiny_mlp(seed=2).double()
    orig = Attributor(model, ce_loss, compressor=Identity(), estimator=GradDot(), progress=False)
    orig.featurize(loader(ds))
    want = orig.score(loader(ds))
    acc = np.zeros_like(want)
    for s in range(40):
        a = Attributor(model, ce_loss, compressor=Dropout(r=30, seed=s, rotate=True, scale=True),
                       estimator=GradDot(), progress=False)
        a.featurize(loader(ds))
        acc += a.score(loader(ds)) / 40
    assert np.corrcoef(acc.ravel(), want.ravel())[0, 1] > 0.95


def test_plain_dropout_on_a_view_output_modified_in_place():
    """HF Conv1D returns x.view(...); an in-place op on that view (relu_ in Mixed) used to give the
    output a new grad_fn, so the capture hook never fired and the self-check refused the layer."""
    torch.manual_seed(1)
    model = Mixed().double().eval()
    batch = mixed_batch(seed=2)
    layers = select_layers(model, "all")
    comps = {l.name: Dropout(r=9, seed=0).build(l) for l in layers}
    feats, _ = BatchCapture(model, mixed_loss, layers, comps, check="always")(batch)
    (c1d,) = [l for l in layers if l.name == "c1d"]
    want = comps["c1d"].from_flat(loop_grads(model, mixed_loss, batch, c1d.param_names))
    torch.testing.assert_close(feats["c1d"].double(), want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
