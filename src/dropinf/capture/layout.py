"""Which dimension of a tracked module's input holds the batch.

The fused hooks need every call's input and output-gradient with the batch first:
(B, positions..., features). Most modules get that as they are, but not all:

* sequence-first layouts — ``nn.TransformerEncoderLayer(batch_first=False)``, a Linear applied to
  the (T, B, H) output of a sequence-first LSTM/GRU — hold the batch in dim 1;
* a model may flatten batch and positions into one leading dimension (B·T, D), batch-major;
* a tensor shared by the whole batch — a position-bias table computed from a buffer (HF Swin-v2,
  T5's relative attention bias), a learned prompt before it is repeated over the batch, a
  per-example loop that calls the layer on ``x[i:i+1]`` — has no batch dimension at all. Its
  output-gradient is already summed over the examples, so no per-example row can be recovered
  from it: such a block goes to the torch.func path (``NoBatchDim``).

The batch size B is the loss's (``losses.shape[0]``), never the first dimension of the batch's
first tensor. Reading the layout from shapes is a guess whenever a dimension other than the batch
can have size B (sequence length == batch size, a (q, k) bucket table with q == B): every layout
is therefore *unverified* until the per-example self-check (capture.check) has compared that
module's rows with single examples' own gradients; a layout that fails is replaced by the next
candidate, and a block with no candidate left goes to torch.func.
"""

from __future__ import annotations

from typing import Union

import torch

ALL = "all"     # B == 1: every position belongs to the one example
FLAT = "flat"   # batch and positions flattened batch-major into dim 0: (B·T, ...)

Layout = Union[int, str]


class NoBatchDim(Exception):
    """The module's input has no dimension that holds the batch; ``reason`` says what it has."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def candidate_dims(kind: str, ndim: int) -> list[int]:
    """Dimensions of the saved input that may hold the batch (never the feature dimension)."""
    if kind == "conv2d":
        return [0] if ndim == 4 else []
    if kind == "embedding":               # token ids: every dimension is a position
        return list(range(ndim))
    return list(range(ndim - 1))          # linear / conv1d: features last


def resolve(kind: str, shape: tuple, B: int, known: Layout | None = None, tried=()) -> Layout:
    """The layout to read this call with: ``known`` (verified earlier) if it fits the shape, else the
    first candidate not in ``tried``. Raises NoBatchDim when nothing fits."""
    nd = len(shape)
    unbatched = (kind == "conv2d" and nd == 3) or (kind in ("linear", "conv1d") and nd == 1)
    if B == 1 and (unbatched or nd >= 1):
        return ALL
    cands = [] if unbatched else [d for d in candidate_dims(kind, nd) if shape[d] == B]
    flat_ok = (not unbatched and nd >= 1 and shape[0] > B and shape[0] % B == 0
               and (kind != "conv2d" or nd == 4))
    if known is not None and (known in cands or (known == FLAT and flat_ok)):
        return known
    for d in cands:
        if d not in tried:
            return d
    if flat_ok and not cands and FLAT not in tried:
        return FLAT
    if cands or (flat_ok and FLAT in tried):
        raise NoBatchDim(f"no reading of its input (shape {list(shape)}) with the batch of {B} in one dimension "
                         f"gives each example its own gradient: the input is not laid out per example")
    raise NoBatchDim(f"its input (shape {list(shape)}) has no dimension of the batch size {B}: it is shared by "
                     f"the whole batch (a table computed from a buffer or a parameter and broadcast later, a "
                     f"prompt repeated over the batch) or the module is called once per example, so one call's "
                     f"output-gradient mixes the examples")


def batch_first(layout: Layout, x: torch.Tensor, g: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, output-gradient) with the batch moved to dim 0; ``capture.modules.prepare`` then
    reshapes them to (B, positions, features)."""
    if layout == ALL:
        if kind == "conv2d" and x.dim() == 3:          # an unbatched (C, H, W) call
            return x.unsqueeze(0), g.unsqueeze(0)
        return x, g
    if layout == FLAT or layout == 0:
        return x, g
    return x.movedim(layout, 0), g.movedim(layout, 0)
