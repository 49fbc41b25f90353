"""Featurize into an on-disk store: chunk by chunk, resumable, optionally over torch.distributed.

Rows are processed in fixed chunks of ``chunk_size`` examples (chunk k = dataset rows
[kC, (k+1)C)), each through its own loader over those rows with the user's batch size and
collate function (examples the collate function drops are left out and the chunk records the
dataset ids it holds), so a chunk's bytes do not depend on which process computed it or whether the
run was interrupted before. Under ``torchrun --nproc-per-node N`` (gloo on CPU, nccl on GPU)
rank i computes chunks k ≡ i (mod N); rank 0 finalizes the manifest after a barrier.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import SequentialSampler
from tqdm.auto import tqdm

from ..capture.engine import raise_nonfinite
from ..dist import barrier as _barrier, dist_info
from ..errors import ConfigError, EmptyDataError
from ..options import option
from .disk import FeatureStore, LayerCols
from .ids import chunk_loader


def check_loader(loader) -> None:
    ds = getattr(loader, "dataset", None)
    if ds is None or not hasattr(ds, "__len__") or not hasattr(ds, "__getitem__"):
        raise ConfigError("featurize(..., store=...) needs a DataLoader over a map-style dataset (len + indexing) "
                          "so that chunks can be resumed and split across processes.")
    if not isinstance(getattr(loader, "sampler", None), SequentialSampler) or loader.batch_size is None:
        raise ConfigError("featurize(..., store=...) needs a deterministic order: use DataLoader(dataset, "
                          "batch_size=B, shuffle=False) (no custom sampler / batch_sampler).")


@dataclass(frozen=True)
class StoreOptions:
    """The store phase's options: ``featurize(loader, store=StoreOptions(path, chunk_size=…))``
    (a plain path means these defaults)."""

    path: str | Path
    chunk_size: int = option(4096, "rows per shard: the unit that is written, resumed after an interruption "
                                   "and split across torchrun processes")
    dtype: Literal["float32", "float16", "bfloat16"] = option(
        "float32", "precision of the stored rows (half precision halves the disk)")

    @classmethod
    def of(cls, store: "str | Path | StoreOptions") -> "StoreOptions":
        return store if isinstance(store, StoreOptions) else cls(store)


def featurize_to_store(featurizer, loader, store: "str | Path | StoreOptions") -> FeatureStore:
    """Every row of ``loader`` from ``featurizer`` (store.featurizer.Featurizer) into the store
    ``store`` (a folder, or StoreOptions)."""
    f, opts = featurizer, StoreOptions.of(store)
    path, chunk_size, dtype = opts.path, opts.chunk_size, opts.dtype
    check_loader(loader)
    ds = loader.dataset
    n = len(ds)
    if n == 0:
        raise EmptyDataError("the train loader's dataset is empty; nothing to featurize.")
    if chunk_size < 1:
        raise ConfigError("chunk_size must be ≥ 1")
    rank, world = dist_info()
    layers, off, dims = [], 0, f.damping_dims()
    for l in f.layers:
        r = f.compressors[l.name].r
        layers.append(LayerCols(l.name, r, off, dims[l.name]))
        off += r
    sig = f.signature()
    if rank == 0:
        store = FeatureStore.create(path, sig, layers, n, chunk_size, dtype)
    _barrier(world)
    if rank != 0:
        store = FeatureStore.create(path, sig, layers, n, chunk_size, dtype)
    # this process's chunks (k ≡ rank mod world) that are not done yet; several processes on the
    # same store (a re-run, a second shell) share them: each chunk has one writer at a time (a
    # lock file claimed atomically), and a process waits for chunks another live one is writing
    pending = [k for k in range(rank, store.n_chunks, world) if not store.chunk_done(k, verify=True)]
    capture = f.capture()
    total = sum(store.rows(k)[1] - store.rows(k)[0] for k in pending)
    desc = "featurize → store" + (f" [rank {rank}/{world}]" if world > 1 else "")
    with f.mode(), tqdm(total=total, desc=desc, unit="ex", disable=not f.progress) as bar:
        while pending:
            progressed = False
            for k in list(pending):
                start, stop = store.rows(k)
                if not store.chunk_done(k) and store.claim(k):
                    try:
                        if not store.chunk_done(k, verify=True):
                            _compute_chunk(f, capture, store, layers, loader, k)
                    finally:
                        store.release(k)
                if store.chunk_done(k):
                    pending.remove(k)
                    bar.update(stop - start)
                    progressed = True
            if pending and not progressed:
                time.sleep(0.2)          # another live process holds these chunks: wait for it
    _barrier(world)
    if rank == 0:
        store.finalize()
    _barrier(world)
    return FeatureStore.open(path)


def _compute_chunk(f, capture, store: FeatureStore, layers: list[LayerCols], loader, k: int) -> None:
    start, stop = store.rows(k)
    block = torch.empty(stop - start, store.width)
    kept, pos = [], 0
    for ids, batch in chunk_loader(loader, start, stop):
        if batch is None:          # the collate function dropped every example of this batch
            continue
        ids, feats, loss, bad, lays = f.rows(capture, batch, ids)
        raise_nonfinite(bad, lays)
        b = loss.shape[0]
        for l in layers:
            block[pos:pos + b, l.offset:l.offset + l.r] = feats[l.name].cpu()
        kept.append(ids)
        pos += b
    ids = torch.cat(kept) if kept else torch.zeros(0, dtype=torch.long)
    # rows a collate function dropped are absent; the chunk records which ids it holds
    store.write_chunk(k, block[:pos], None if pos == stop - start else ids)
