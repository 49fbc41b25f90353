"""capture.kernels: the column copy gives x[:, idx] whichever kernel the timing picks, into
contiguous and strided memory; the whole-product rule admits the product for small weights only,
and either way a timed choice keeps gives every example's own row."""

import time

import pytest
import torch

from dropinf import Dropout
from dropinf.capture import kernels
from tests.capture.test_layouts import assert_rows


@pytest.mark.parametrize("way", ["gather", "index_select", None])
def test_columns_copy_the_same_numbers_either_way(monkeypatch, way):
    monkeypatch.setattr(kernels, "_FASTEST", {} if way is None else {("columns", torch.get_num_threads()): way})
    g = torch.Generator().manual_seed(0)
    x, idx = torch.randn(7, 30, generator=g), torch.randint(0, 30, (50,), generator=g)
    want = x[:, idx]
    assert torch.equal(kernels.columns(x, idx, torch.empty(7, 50)), want)
    block = torch.full((7, 120), float("nan"))
    got = kernels.columns(x, idx, block[:, 40:90])          # a column block of a row buffer: strided
    assert torch.equal(got, want) and got.data_ptr() == block[:, 40:90].data_ptr()
    assert block[:, :40].isnan().all() and block[:, 90:].isnan().all()
    assert way is not None or kernels._FASTEST[("columns", torch.get_num_threads())] in ("gather", "index_select")


def test_whole_product_only_for_small_weights():
    plan = lambda uo, uk: {"uo": torch.arange(uo), "uk": torch.arange(uk)}
    assert kernels.whole_cheaper(8, 384, plan(8, 57))          # a LoRA A matrix: 57 columns of a to pick
    assert not kernels.whole_cheaper(64, 1024, plan(43, 64))   # 65,536 entries against 107 picked
    assert not kernels.whole_cheaper(768, 768, plan(768, 768))  # nothing to pick: the picking path is the product


def test_fastest_times_each_way_once_per_key_and_keeps_the_faster(monkeypatch):
    monkeypatch.setattr(kernels, "_FASTEST", {})
    calls = []

    def way(name, secs):
        def run():
            calls.append(name)
            time.sleep(secs)
            return torch.tensor([1.0])
        return run

    ways = {"slow": way("slow", 0.004), "quick": way("quick", 0.0)}
    assert torch.equal(kernels.fastest(("k",), ways), torch.tensor([1.0]))
    assert calls.count("slow") == 3 and kernels._FASTEST[("k",)] == "quick"
    calls.clear()
    kernels.fastest(("k",), ways)
    assert calls == ["quick"]                      # decided: the other way is not run again
    kernels.fastest(("other",), {"slow": ways["slow"]})
    assert calls == ["quick", "slow"] and ("other",) not in kernels._FASTEST   # one way: no timing


class _Lora(torch.nn.Module):
    """A frozen (24, 24) Linear plus a rank-4 adapter B(A(x)): B is (24, 4), A (4, 24)."""

    def __init__(self):
        super().__init__()
        self.base = torch.nn.Linear(24, 24).requires_grad_(False)
        self.A, self.B = torch.nn.Linear(24, 4, bias=False), torch.nn.Linear(4, 24, bias=False)
        self.head = torch.nn.Linear(24, 3)

    def forward(self, x):
        return self.head((self.base(x) + self.B(self.A(x))).mean(1))


@pytest.mark.parametrize("way", ["whole", "pick"])
def test_a_lora_product_gives_every_examples_row_either_way(monkeypatch, way):
    """Small weights' kept entries by the whole per-example product or by picking columns first
    (whichever the timing picks on a machine), row by row against a loop of single-example passes."""
    chosen = []

    class Forced(dict):
        def get(self, key, default=None):          # the product's choice forced; the others timed
            if key[0] != "product":
                return dict.get(self, key, default)
            chosen.append(key)
            return way
    monkeypatch.setattr(kernels, "_FASTEST", Forced())
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    batch = (torch.randn(6, 40, 24, generator=g), torch.randint(0, 3, (6,), generator=g))
    attr, said = assert_rows(_Lora(), batch, compressor=Dropout(r=16, seed=0))
    assert {l.name for l in attr.layers} >= {"A", "B"} and chosen      # the timed choice was consulted
    # and its rows passed the self-check as they are (a block that failed it is moved to torch.func)
    assert not [m for m in said if "torch.func" in m], said


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
