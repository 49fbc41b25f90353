"""Fused-hook entries == the same entries of per-example gradients from single-example backward passes."""

import pytest
import torch
from torch import nn

from dropinf import Dropout, Gaussian, Identity
from dropinf.capture.engine import BatchCapture
from dropinf.capture.layers import select_layers
from tests.helpers import loop_grads


class SeqModel(nn.Module):
    """Linear on (B, T, d_in) inputs, a second Linear used twice, pooled to (B, classes)."""

    def __init__(self, bias: bool):
        super().__init__()
        self.inp = nn.Linear(5, 7, bias=bias)
        self.mid = nn.Linear(7, 7, bias=bias)
        self.out = nn.Linear(7, 3, bias=bias)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.mid(h))
        h = torch.tanh(self.mid(h))          # shared module: both uses must add up
        return self.out(h).mean(1)


def seq_loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y, reduction="none")


def flat_loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y, reduction="none")


def capture_and_reference(model, loss_fn, batch, compressor):
    layers = select_layers(model)
    comps = {l.name: compressor.build(l) for l in layers}
    feats, _ = BatchCapture(model, loss_fn, layers, comps)(batch)
    out = []
    for l in layers:
        ref = loop_grads(model, loss_fn, batch, l.param_names)
        out.append((l, feats[l.name], comps[l.name], ref))
    return out


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("seed,r", [(0, 5), (1, 17), (7, 40), (3, 1000)])
def test_fused_dropout_3d_inputs_match_loop(bias, seed, r):
    torch.manual_seed(seed)
    model = SeqModel(bias).double()
    batch = (torch.randn(6, 4, 5, dtype=torch.float64), torch.randint(0, 3, (6,)))
    for layer, got, comp, ref in capture_and_reference(model, seq_loss, batch, Dropout(r=r, seed=seed)):
        want = ref[:, comp.indices]
        assert got.shape == (6, min(r, layer.dim))
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("seed,r", [(0, 3), (2, 25), (5, 200)])
def test_fused_dropout_2d_inputs_match_loop(bias, seed, r):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 9, bias=bias), nn.ReLU(), nn.Linear(9, 4, bias=bias)).double()
    batch = (torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 4, (8,)))
    for layer, got, comp, ref in capture_and_reference(model, flat_loss, batch, Dropout(r=r, seed=seed)):
        torch.testing.assert_close(got.double(), ref[:, comp.indices], rtol=1e-5, atol=1e-7)


def test_fused_identity_and_gaussian_match_loop():
    torch.manual_seed(0)
    model = SeqModel(True).double()
    batch = (torch.randn(5, 3, 5, dtype=torch.float64), torch.randint(0, 3, (5,)))
    for layer, got, comp, ref in capture_and_reference(model, seq_loss, batch, Identity()):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-7)
    for layer, got, comp, ref in capture_and_reference(model, seq_loss, batch, Gaussian(r=11, seed=3, block=16)):
        torch.testing.assert_close(got.double(), ref @ comp.dense().double().T, rtol=1e-4, atol=1e-6)


def test_func_fallback_matches_loop_for_non_linear_modules():
    """A LayerNorm (no fused hook) goes through torch.func with the same compressor."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3)).double()
    batch = (torch.randn(7, 6, dtype=torch.float64), torch.randint(0, 3, (7,)))
    layers = select_layers(model, track="all")
    assert [l.kind for l in layers] == ["fused", "func", "fused"]
    comps = {l.name: Dropout(r=6, seed=1).build(l) for l in layers}
    feats, _ = BatchCapture(model, flat_loss, layers, comps)(batch)
    for l in layers:
        ref = loop_grads(model, flat_loss, batch, l.param_names)
        torch.testing.assert_close(feats[l.name].double(), ref[:, comps[l.name].indices], rtol=1e-5, atol=1e-7)


def test_all_func_path_equals_fused_path():
    torch.manual_seed(0)
    model = SeqModel(True).double()
    batch = (torch.randn(4, 3, 5, dtype=torch.float64), torch.randint(0, 3, (4,)))
    fused_layers = select_layers(model)
    func_layers = select_layers(model, fused=False)
    assert all(l.kind == "func" for l in func_layers)
    comp = Dropout(r=9, seed=4)
    a, _ = BatchCapture(model, seq_loss, fused_layers, {l.name: comp.build(l) for l in fused_layers})(batch)
    b, _ = BatchCapture(model, seq_loss, func_layers, {l.name: comp.build(l) for l in func_layers})(batch)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)


def test_capture_leaves_grad_fields_untouched():
    torch.manual_seed(0)
    model = SeqModel(True)
    batch = (torch.randn(4, 3, 5), torch.randint(0, 3, (4,)))
    layers = select_layers(model)
    BatchCapture(model, seq_loss, layers, {l.name: Dropout(r=4).build(l) for l in layers})(batch)
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())
