"""BatchCapture's ``out=``: the rows written straight into the caller's buffers (the store's batch
buffer, an in-memory array) are bit for bit the rows a capture without buffers returns — on the
architectures and layouts of test_lean_backward, with every compressor, on the self-checked first
batch and on the capture-only ones — the returned rows are views of the buffers, and no row past
the batch is touched."""

import warnings

import pytest
import torch
from torch import nn

from dropinf import ConfigError, Dropout, Gaussian, Identity, LoGra
from dropinf.capture.engine import BatchCapture
from dropinf.capture.layers import select_layers
from tests.capture.test_lean_backward import CASES
from tests.capture.test_layouts import ce, feats


def _single(batch):
    """The batch with every floating tensor in float32 (the buffers' dtype; the direct path)."""
    if isinstance(batch, torch.Tensor):
        return batch.float() if batch.is_floating_point() else batch
    if isinstance(batch, (list, tuple)):
        return type(batch)(_single(b) for b in batch)
    return batch


def assert_buffers_equal_plain(model, loss, batches, track=None, compressor=None, spare=3):
    compressor = compressor or Dropout(r=24, seed=2)
    layers = select_layers(model, track)
    comps = {l.name: compressor.build(l) for l in layers}
    width = sum(c.r for c in comps.values())
    device = next(model.parameters()).device
    buf = torch.full((max(_single(b)[1].shape[0] for b in batches) + spare, width), float("nan"), device=device)
    views, off = {}, 0
    for l in layers:
        views[l.name] = buf[:, off:off + comps[l.name].r]
        off += comps[l.name].r
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain, direct = BatchCapture(model, loss, layers, comps), BatchCapture(model, loss, layers, comps)
        for i, b in enumerate(batches):
            want, want_loss = plain(b)
            buf.fill_(float("nan"))
            got, got_loss = direct(b, out=views)
            B = want_loss.shape[0]
            assert torch.equal(got_loss, want_loss)
            for name, rows in want.items():
                assert torch.equal(got[name], rows), f"batch {i}, layer {name}: rows differ"
                assert got[name].data_ptr() == views[name].data_ptr() and got[name].shape == rows.shape
                assert torch.equal(views[name][:B], rows)
            assert bool(buf[B:].isnan().all()), f"batch {i}: a row past the batch was written"
    return direct


@pytest.mark.parametrize("case", list(CASES))
def test_rows_written_into_the_callers_buffers_are_bit_identical(case):
    torch.manual_seed(0)
    model, loss, make, track = CASES[case]()
    model = model.float().eval()
    assert_buffers_equal_plain(model, loss, [_single(make(s)) for s in range(3)], track)


@pytest.mark.parametrize("compressor", [Identity(), Gaussian(r=16, seed=1), LoGra(3, 2, seed=1),
                                        Dropout(r=20, seed=1, rotate=True), Dropout(r=40, seed=3, scale=True),
                                        Dropout(r=200, seed=1)],
                         ids=["identity", "gaussian", "logra", "rotated", "scaled", "whole-layers"])
def test_every_compressor(compressor):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).eval()
    batches = [(feats(5, 1, 6, seed=s)[0][:, 0].float(), torch.randint(0, 3, (5,))) for s in range(3)]
    assert_buffers_equal_plain(model, ce, batches, compressor=compressor)


def test_a_weight_used_twice_and_a_smaller_last_batch():
    """Two calls of one module add up in the buffer; a last batch smaller than the buffer leaves
    the rest of it alone."""
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.head = nn.Linear(5, 5), nn.Linear(5, 3)

        def forward(self, x):
            return self.head(torch.tanh(self.a(torch.tanh(self.a(x)))))

    torch.manual_seed(0)
    batches = [(torch.randn(b, 5), torch.randint(0, 3, (b,))) for b in (4, 4, 2)]
    assert_buffers_equal_plain(Twice().eval(), ce, batches, compressor=Dropout(r=12, seed=4), spare=0)


def test_a_buffer_of_the_wrong_width_is_refused():
    model = nn.Sequential(nn.Linear(4, 3))
    layers = select_layers(model, None)
    comps = {l.name: Dropout(r=5).build(l) for l in layers}
    cap = BatchCapture(model, ce, layers, comps)
    with pytest.raises(ConfigError, match=r"out\['0'\] must be a float32 \(rows, 5\)"):
        cap((torch.randn(2, 4), torch.randint(0, 3, (2,))), out={"0": torch.zeros(2, 6)})
