"""capture.kernels: the column copy gives x[:, idx] whichever kernel the timing picks, into
contiguous and strided memory; the whole-product rule picks the product for small weights only."""

import pytest
import torch

from dropinf.capture import kernels


@pytest.mark.parametrize("way", ["gather", "index_select", None])
def test_columns_copy_the_same_numbers_either_way(monkeypatch, way):
    monkeypatch.setattr(kernels, "_COLUMN_WAY", {} if way is None else {("cpu", torch.get_num_threads()): way})
    g = torch.Generator().manual_seed(0)
    x, idx = torch.randn(7, 30, generator=g), torch.randint(0, 30, (50,), generator=g)
    want = x[:, idx]
    assert torch.equal(kernels.columns(x, idx, torch.empty(7, 50)), want)
    block = torch.full((7, 120), float("nan"))
    got = kernels.columns(x, idx, block[:, 40:90])          # a column block of a row buffer: strided
    assert torch.equal(got, want) and got.data_ptr() == block[:, 40:90].data_ptr()
    assert block[:, :40].isnan().all() and block[:, 90:].isnan().all()
    assert way is not None or kernels._COLUMN_WAY[("cpu", torch.get_num_threads())] in ("gather", "index_select")


def test_whole_product_only_for_small_weights():
    plan = lambda uo, uk: {"uo": torch.arange(uo), "uk": torch.arange(uk)}
    assert kernels.whole_cheaper(8, 384, plan(8, 57))          # a LoRA A matrix: 57 columns of a to pick
    assert not kernels.whole_cheaper(64, 1024, plan(43, 64))   # 65,536 entries against 107 picked
    assert not kernels.whole_cheaper(768, 768, plan(768, 768))  # nothing to pick: the picking path is the product


def test_scratch_is_reused_per_slot():
    like = torch.empty(1)
    a, b = kernels.scratch(0, (4, 8), like), kernels.scratch(0, (2, 8), like)
    assert a.data_ptr() == b.data_ptr() and kernels.scratch(1, (4, 8), like).data_ptr() != a.data_ptr()


def test_last_dim_is_index_select_along_dim_2():
    g = torch.Generator().manual_seed(1)
    x, idx = torch.randn(3, 5, 9, generator=g), torch.tensor([8, 0, 3, 3])
    want = torch.index_select(x, 2, idx)
    assert torch.equal(kernels.last_dim(x, idx), want)
    out = torch.empty(3, 5, 4)
    assert torch.equal(kernels.last_dim(x, idx, out), want) and torch.equal(out, want)
    xt = x.transpose(0, 1)                                       # not contiguous: the 3-D path
    assert torch.equal(kernels.last_dim(xt, idx), torch.index_select(xt, 2, idx))
