"""Top-k bookkeeping for the blockwise scorer (score/scorer.py): a running top-k on both ends
of each query's scores, merged block by block so the (n_query, n_train) matrix is never held."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class TopK:
    """Per query: the k most helpful (most negative I) and most harmful (most positive I) train
    examples. Index arrays (n_query, k) int64 — dataset ids when returned by Attributor.topk —
    score arrays (n_query, k) float32, ordered from the most extreme."""

    helpful_idx: np.ndarray
    helpful_scores: np.ndarray
    harmful_idx: np.ndarray
    harmful_scores: np.ndarray

    def as_dict(self) -> dict:
        return {k: v.tolist() for k, v in vars(self).items()}


class _Running:
    def __init__(self, m: int, k: int, largest: bool):
        self.k, self.largest = k, largest
        self.vals = torch.empty(m, 0)
        self.idx = torch.empty(m, 0, dtype=torch.long)

    def update(self, block: torch.Tensor, start: int) -> None:
        """Merge the top-k of one (m, b) block whose columns are rows start.. start+b."""
        kk = min(self.k, block.shape[1])
        v, pos = torch.topk(block, kk, dim=1, largest=self.largest, sorted=False)
        vals, idx = torch.cat([self.vals, v], 1), torch.cat([self.idx, pos + start], 1)
        kk = min(self.k, vals.shape[1])
        v, pos = torch.topk(vals, kk, dim=1, largest=self.largest, sorted=True)
        self.vals, self.idx = v, torch.gather(idx, 1, pos)


class RunningTopK:
    """The k most helpful and most harmful columns seen so far, for m queries."""

    def __init__(self, m: int, k: int):
        self.hi, self.lo = _Running(m, k, True), _Running(m, k, False)

    def update(self, block: torch.Tensor, start: int) -> None:
        self.hi.update(block, start)
        self.lo.update(block, start)

    def result(self) -> TopK:
        return TopK(self.lo.idx.numpy(), self.lo.vals.numpy(), self.hi.idx.numpy(), self.hi.vals.numpy())


def topk_merge(blocks, m: int, k: int) -> TopK:
    """blocks: iterable of (start column, (m, b) score block). Running top-k on both ends."""
    run = RunningTopK(m, k)
    for start, block in blocks:
        run.update(block.float(), start)
    return run.result()
