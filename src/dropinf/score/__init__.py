"""Scoring: one blockwise scorer for score, top-k, per-layer and self-influence."""

from __future__ import annotations

import numpy as np

from .topk import TopK, topk_merge
from .scorer import ScoreOptions, Scorer


def open_scores_memmap(path, shape: tuple[int, int]) -> np.ndarray:
    """A float32 ``.npy`` memmap of ``shape`` to pass as ``score(out=...)``, for matrices larger
    than memory. The space is reserved up front: a disk too small is a StoreError naming the bytes
    needed before any scoring starts (never a half-written file or a bus error later)."""
    import os
    import shutil
    from pathlib import Path

    from ..errors import ConfigError
    from ..store.files import StoreError, disk_full
    path = Path(path)
    if not path.parent.is_dir():
        raise ConfigError(f"{path}: the folder {path.parent} does not exist; create it first.")
    need = int(shape[0]) * int(shape[1]) * 4 + 4096
    free = shutil.disk_usage(path.parent).free
    if need > free:
        raise StoreError(f"{path} needs {need:,} bytes for a float32 {tuple(shape)} score matrix; only {free:,} "
                         f"are free on that device. Free space, pick another folder, or use topk().")
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=tuple(shape))
    try:
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, os.path.getsize(path))    # reserve the blocks now
        finally:
            os.close(fd)
    except OSError as exc:
        del out
        path.unlink(missing_ok=True)
        err = disk_full(exc, path, need)
        if err is None:
            raise
        raise err from exc
    except AttributeError:          # no posix_fallocate on this platform: the pre-check stands
        pass
    return out


def open_scores_for_ranks(path, shape: tuple[int, int], shard=(0, 1)) -> np.ndarray:
    """``open_scores_memmap`` under torchrun: rank 0 creates the file (space reserved up front), the
    other ranks open it after a barrier, and every rank fills its own columns."""
    from pathlib import Path

    from ..dist import barrier
    from ..errors import ConfigError
    folder = Path(path).resolve().parent
    if not folder.is_dir():
        raise ConfigError(f"out={path}: the folder {folder} does not exist; create it first.")
    rank, world = shard
    out = open_scores_memmap(path, shape) if rank == 0 else None
    barrier(world)
    return out if out is not None else np.lib.format.open_memmap(path, mode="r+")


def influence(estimator, train, query, ctx=None, options: ScoreOptions | None = None) -> np.ndarray:
    """(n_query, n_train) scores of query rows against train rows (both Features or stores):
    fit ``estimator`` on ``train`` and score — the whole pipeline after capture in one call."""
    return Scorer(estimator.fit(train, ctx), train, options, progress=False).dense(query)


__all__ = ["TopK", "topk_merge", "ScoreOptions", "Scorer", "influence", "open_scores_memmap", "open_scores_for_ranks"]
