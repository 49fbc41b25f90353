"""The copy and product kernels of the fused math (capture.modules), each chosen by cost where
torch has more than one way: reused scratch tensors (a fresh CPU megabyte page-faults on first
touch), a column copy by gather or index_select, a whole per-example product against strided
gathers, and chunked dot products over positions."""

from __future__ import annotations

import math
import threading
import time

import torch

_POOL_ELEMS = 1 << 22   # scratch tensors reused up to this many elements per slot (16 MB fp32)
_WHOLE_BMM = 256        # whole per-example products when ≤ this × the distinct columns they would gather

_pool = threading.local()


def scratch(slot: int, shape: tuple, like: torch.Tensor) -> torch.Tensor:
    """A reused contiguous CPU tensor of ``shape`` for a gather's transient copy (two slots per
    thread; the hooks run one at a time). A fresh CPU allocation of a megabyte or more is mapped
    anew and page-faults on first touch, which costs more than the gather that fills it; on other
    devices (a caching allocator), and above _POOL_ELEMS, a fresh tensor."""
    n = math.prod(shape)
    if like.device.type != "cpu" or n > _POOL_ELEMS:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    pool = _pool.__dict__.setdefault("bufs", {})
    buf = pool.get((slot, like.dtype))
    if buf is None or buf.numel() < n:
        buf = pool[(slot, like.dtype)] = torch.empty(n, dtype=like.dtype)
    return buf[:n].view(shape)


_FASTEST: dict = {}      # key -> the name of the way its first call timed fastest


def fastest(key: tuple, ways: dict) -> torch.Tensor:
    """``ways[name]()`` for the way that the first call with ``key`` timed fastest, or the only one.

    For kernels whose speed order depends on the machine, not on the shapes alone (a batched matmul
    of a strided operand was 4.6x slower than picking columns first on one 2-core CPU, 3-5x faster
    on another; gather against index_select, ``columns``): the first call runs each way three times, interleaved, and keeps the
    fastest for every later call with that key (callers put the thread count and the shapes in it,
    and pass several ways on the CPU only: elsewhere the kernels run asynchronously, so a host
    clock would not time them). The ways compute the same numbers up to the order of their sums."""
    if len(ways) == 1:
        return next(iter(ways.values()))()
    way = _FASTEST.get(key)
    if way is not None:
        return ways[way]()
    secs: dict[str, float] = {}
    for name in list(ways) * 3:
        t0 = time.perf_counter()
        result = ways[name]()
        secs[name] = min(secs.get(name, math.inf), time.perf_counter() - t0)
    _FASTEST[key] = way = min(secs, key=secs.get)
    return result if way == name else ways[way]()


def columns(x: torch.Tensor, idx: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` = x[:, idx] for a 2-D x. Two kernels copy the same numbers (so the rows are the same
    either way): torch.gather with the index broadcast over the rows, which runs on every thread,
    and index_select along dim 1, which runs on one but 2-2.5× faster per thread. Which wins
    depends on the machine and the thread count (on two threads gather was 1.5-2× faster on one
    2-core CPU, index_select 1.2× faster on another), so on the CPU the first call per thread
    count times both (``fastest``) and keeps the faster. Into a strided ``out`` (a column block of
    the caller's row buffer) index_select is 5× slower: gather, as on other devices."""
    if x.device.type != "cpu" or not out.is_contiguous():
        return _column_copy(x, idx, out, "gather")
    return fastest(("columns", torch.get_num_threads()),
                   {w: (lambda w=w: _column_copy(x, idx, out, w)) for w in ("gather", "index_select")})


def _column_copy(x: torch.Tensor, idx: torch.Tensor, out: torch.Tensor, way: str) -> torch.Tensor:
    if way == "gather":
        return torch.gather(x, 1, idx.expand(x.shape[0], -1), out=out)
    return torch.index_select(x, 1, idx, out=out)


def whole_cheaper(n_out: int, n_in: int, plan: dict) -> bool:
    """Whether the per-example product of all n_out × n_in entries may cost less than gathering the
    distinct kept columns of δ and a along their last dim (one strided copy per number): one
    gathered number costs about _WHOLE_BMM multiply-adds (measured on LoRA and small Linear shapes,
    2-core AVX-512: (8, 384) 42 vs 217 µs, (64, 1024) 580 vs 428 µs at 32 × 40 positions). On the
    CPU the two are then timed (``fastest``): on a 2-core EPYC the whole product of a (384, 8)
    LoRA B matrix took 601 µs against 138 µs picking first."""
    picked = sum(u.numel() for u, n in ((plan["uo"], n_out), (plan["uk"], n_in)) if u.numel() < n)
    return n_out * n_in <= _WHOLE_BMM * picked


def into_(value: torch.Tensor, into: torch.Tensor | None) -> torch.Tensor:
    """``value`` in ``into`` (copied unless a path already wrote it there), or value itself."""
    if into is None or value is into:
        return value
    return into.copy_(value)


def chunked_dot(d_cf: torch.Tensor, o: torch.Tensor, a_rows, a_like: torch.Tensor, chunk: int,
                 out: torch.Tensor) -> torch.Tensor:
    """out[:, s] = Σ_t δ[:, o_s, t] · a_s[:, t] for channel-first δ (B, C_out, T), in chunks of
    entries of about ``chunk`` numbers a side: ``a_rows(s0, s1, buf)`` writes the input side of
    entries s0..s1-1, (B, s1 - s0, T), into the reused scratch ``buf`` (``a_like``'s dtype and
    device) and returns it."""
    B, T = d_cf.shape[0], d_cf.shape[2]
    step = max(1, chunk // max(1, B * T))
    for s0 in range(0, o.numel(), step):
        s1 = min(o.numel(), s0 + step)
        dd = torch.index_select(d_cf, 1, o[s0:s1], out=scratch(0, (B, s1 - s0, T), d_cf))
        out[:, s0:s1] = dd.mul_(a_rows(s0, s1, scratch(1, dd.shape, a_like))).sum(-1)
    return out


def last_dim(x: torch.Tensor, idx: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x[..., idx] of a (B, T, C) tensor (into ``out`` when given, of the result's shape): torch's
    index_select along dim 2 of a 3-D tensor takes a generic path 5× slower than along dim 1 of
    the same numbers viewed as (B·T, C) (80 vs 15 µs for 4 × 128 × 576 → 64 on 2 threads), so a
    contiguous x is read as that 2-D view; the same numbers either way."""
    if not x.is_contiguous() or (out is not None and not out.is_contiguous()):
        return torch.index_select(x, 2, idx, out=out) if out is not None else torch.index_select(x, 2, idx)
    shape = (*x.shape[:-1], idx.numel())
    flat = torch.index_select(x.view(-1, x.shape[-1]), 1, idx,
                              out=out.view(-1, idx.numel()) if out is not None else None)
    return flat.view(shape)
