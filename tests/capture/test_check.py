"""capture.check.nonfinite: every row holding NaN or inf is named, whatever the others hold, and
finite rows whose sum overflows are not."""

import torch

from dropinf.capture.check import nonfinite


def test_rows_with_nan_or_inf_are_named_with_their_layers():
    a, b = torch.randn(6, 4), torch.randn(6, 3)
    assert nonfinite({"a": a, "b": b}, 10) == ([], [])
    a[1, 2], b[4, 0], b[5, 1], b[5, 2] = float("nan"), float("inf"), float("inf"), float("-inf")
    assert nonfinite({"a": a, "b": b}, 10) == ([11, 14, 15], ["a", "b"])


def test_finite_rows_whose_sum_overflows_are_not_flagged():
    big = torch.full((3, 5), 3e38)
    assert not torch.isfinite(big.sum())
    assert nonfinite({"x": big, "y": torch.zeros(3, 2)}, 0) == ([], [])
    big[2, 4] = float("nan")
    assert nonfinite({"x": big}, 0) == ([2], ["x"])


def test_column_views_of_a_row_buffer():
    buf = torch.zeros(4, 9)
    buf[3, 7] = float("inf")
    assert nonfinite({"a": buf[:, :5], "b": buf[:, 5:]}, 0) == ([3], ["b"])


def test_blocks_that_tile_a_row_buffer_are_summed_as_one_region():
    from dropinf.capture.check import _tiled
    buf = torch.randn(8, 9)
    views = [buf[:6, 5:], buf[:6, :2], buf[:6, 2:5]]           # any order, first rows of the buffer
    whole = _tiled(views)
    assert whole is not None and whole.shape == (6, 9) and torch.equal(whole, buf[:6])
    buf[7, 0] = float("nan")                                    # past the batch: not its rows
    assert nonfinite({"a": views[0], "b": views[1], "c": views[2]}, 0) == ([], [])
    buf[5, 3] = float("-inf")
    assert nonfinite({"a": views[0], "b": views[1], "c": views[2]}, 0) == ([5], ["c"])
    # blocks that leave a gap, overlap, or come from different tensors are not one region
    assert _tiled([buf[:6, :2], buf[:6, 3:]]) is None
    assert _tiled([buf[:6, :5], buf[:6, 4:]]) is None
    assert _tiled([buf[:6, :5], torch.randn(6, 4)]) is None
    assert _tiled([buf[:6, :5].double(), buf[:6, 5:].double()]) is None
