"""Chunked products against float32 feature matrices, so no float64 copy of the whole train
feature matrix (n × r, possibly many GB for Orig) is ever made.

Small matrices (≤ 2^24 entries) are multiplied in float64. Larger ones are multiplied in their
own float32 by BLAS, chunk by chunk, with results returned (and accumulated) in float64:
converting GBs of features to float64 on every product would dominate the run time.
"""

from __future__ import annotations

import torch

_ELEMS = 1 << 22   # elements per temporary chunk
_EXACT = 1 << 24   # matrices up to this many entries are multiplied in float64


def _work_dtype(g: torch.Tensor) -> torch.dtype:
    return torch.float64 if g.numel() <= _EXACT else g.dtype


def _row_chunks(g: torch.Tensor):
    dt = _work_dtype(g)
    if dt == g.dtype:  # no conversion needed: one BLAS call on the whole matrix
        yield 0, g
        return
    step = max(1, _ELEMS // max(1, g.shape[1]))
    for s in range(0, g.shape[0], step):
        yield s, g[s:s + step].to(dt)


def _chunks64(g: torch.Tensor):
    step = max(1, _ELEMS // max(1, g.shape[1]))
    for s in range(0, g.shape[0], step):
        yield g[s:s + step].double()


def sumsq(g: torch.Tensor) -> float:
    return sum(float((c * c).sum()) for c in _chunks64(g))


def row_norms_sq(g: torch.Tensor) -> torch.Tensor:
    if not g.shape[0]:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat([(c * c).sum(1) for c in _chunks64(g)])


def times_gt(v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """v @ gᵀ  (m × n) for v (m × r) float64 and g (n × r)."""
    return torch.cat([(v.to(c.dtype) @ c.T).double() for _, c in _row_chunks(g)], 1)


def times_g(c: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """c @ g  (m × r) for c (m × n) float64 and g (n × r)."""
    out = torch.zeros(c.shape[0], g.shape[1], dtype=torch.float64)
    for s, chunk in _row_chunks(g):
        out += (c[:, s:s + chunk.shape[0]].to(chunk.dtype) @ chunk).double()
    return out


def gram_rows(g: torch.Tensor) -> torch.Tensor:
    """gᵀg (r × r) in float64."""
    out = torch.zeros(g.shape[1], g.shape[1], dtype=torch.float64)
    for _, c in _row_chunks(g):
        out += (c.T @ c).double()
    return out


def gram_cols(g: torch.Tensor) -> torch.Tensor:
    """g gᵀ (n × n) in float64, accumulated over column chunks."""
    out = torch.zeros(g.shape[0], g.shape[0], dtype=torch.float64)
    step = max(1, _ELEMS // max(1, g.shape[0]))
    dt = _work_dtype(g)
    for s in range(0, g.shape[1], step):
        c = g[:, s:s + step].to(dt)
        out += (c @ c.T).double()
    return out


def rows_times(g: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """g @ m as float32, for g (n × r) and m (r × k) float64."""
    return torch.cat([(c @ m).float() for c in _chunks64(g)], 0)
