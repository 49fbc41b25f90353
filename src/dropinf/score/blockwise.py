"""Blockwise scoring against stored train features.

For estimators whose scores are I(q, i) = − Σ_l (g̃_ql M_l) · g̃_il with a fixed r_l × r_l matrix
M_l (GaussNewton: H̃_l⁻¹; GradDot: I; DataInf: its Sherman–Morrison average), the query side is
preconditioned once (m × r) and the train features are streamed chunk by chunk: memory is
O(m·r + chunk·r) plus whatever the caller keeps — the full (m, n) matrix as a memmap on disk,
or only the top-k per query.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm


@dataclass
class TopK:
    """Per query: the k most helpful (most negative I) and most harmful (most positive I) train
    examples. Index arrays (n_query, k) int64, score arrays (n_query, k) float32, ordered from
    the most extreme."""

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
        vals = torch.cat([self.vals, block], 1)
        idx = torch.cat([self.idx, torch.arange(start, start + block.shape[1]).expand(block.shape[0], -1)], 1)
        kk = min(self.k, vals.shape[1])
        v, pos = torch.topk(vals, kk, dim=1, largest=self.largest, sorted=True)
        self.vals, self.idx = v, torch.gather(idx, 1, pos)


def topk_merge(blocks, m: int, k: int) -> TopK:
    """blocks: iterable of (start column, (m, b) score block). Running top-k on both ends."""
    hi, lo = _Running(m, k, True), _Running(m, k, False)
    for start, block in blocks:
        block = block.float()
        hi.update(block, start)
        lo.update(block, start)
    return TopK(lo.idx.numpy(), lo.vals.numpy(), hi.idx.numpy(), hi.vals.numpy())


def stream_scores(store, qpre: dict[str, torch.Tensor], out: np.ndarray | None = None, k: int | None = None,
                  progress: bool = True, verify: bool = True):
    """Score preconditioned queries qpre {layer: (m, r_l)} against every stored chunk.

    out: optional (m, n) float32 array (e.g. np.lib.format.open_memmap) filled in place.
    k:   if given, return TopK; otherwise return out (or a dense array if out is None).
    """
    m = next(iter(qpre.values())).shape[0]
    if out is None and k is None:
        out = np.empty((m, store.n), dtype=np.float32)
    q = {name: t.double() for name, t in qpre.items()}

    def blocks():
        with tqdm(total=store.n, desc="score", unit="ex", disable=not progress) as bar:
            for start, chunk in store.iter_chunks(verify=verify):
                rows = next(iter(chunk.values())).shape[0]
                s = torch.zeros(m, rows, dtype=torch.float64)
                for name, ql in q.items():
                    s -= ql @ chunk[name].double().T
                bar.update(rows)
                yield start, s.float()

    if k is None:
        for start, s in blocks():
            out[:, start:start + s.shape[1]] = s.numpy()
        return out
    if out is None:
        return topk_merge(blocks(), m, k)

    def tee():
        for start, s in blocks():
            out[:, start:start + s.shape[1]] = s.numpy()
            yield start, s
    return topk_merge(tee(), m, k)
