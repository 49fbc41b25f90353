"""Featurize into an on-disk store: chunk by chunk, resumable, optionally over torch.distributed.

Rows are processed in fixed chunks of ``chunk_size`` examples (chunk k = dataset rows
[kC, (k+1)C); by default as many rows as fill ``chunk_mb``). Each chunk runs through its own
loader over those rows, with the user's batch size and collate function, and is streamed batch by
batch into its shard file (store.chunk.ChunkWriter: memory bounded by one batch; a run that stops
inside a chunk is resumed from its last recorded batch). Examples the
collate function drops are left out and the chunk records the dataset ids it holds, so a chunk's
bytes do not depend on which process computed it or whether the run was interrupted before.
Under ``torchrun --nproc-per-node N`` rank i computes chunks k ≡ i (mod N); rank 0 finalizes the
manifest after a barrier.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import SequentialSampler
from tqdm.auto import tqdm

from ..capture.check import raise_nonfinite
from ..dist import barrier as _barrier, dist_info
from ..errors import ConfigError, EmptyDataError, StoreError
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
    chunk_size: int | None = option(None, "rows per shard: the unit split across torchrun processes (an "
                                          "interrupted run resumes inside a shard) (default: as many rows as fill "
                                          "--chunk-mb, or the size a store being resumed was started with)")
    chunk_mb: float = option(64.0, "shard size in MiB when --chunk-size is not given (rows between 16 and 16384)")
    dtype: Literal["float32", "float16", "bfloat16"] = option(
        "float32", "precision of the stored rows (half precision halves the disk)")

    def rows_per_chunk(self, width: int) -> int:
        """chunk_size, or the rows that fill chunk_mb (a store being resumed keeps its own)."""
        if self.chunk_size is not None:
            return self.chunk_size
        if (Path(self.path) / "manifest.json").exists():
            try:
                return FeatureStore.open(self.path, require_complete=False).chunk_size
            except StoreError:
                pass            # a damaged manifest: FeatureStore.create says so
        row_bytes = width * (4 if self.dtype == "float32" else 2)
        return int(min(16384, max(16, self.chunk_mb * 2**20 // max(row_bytes, 1))))

    @classmethod
    def of(cls, store: "str | Path | StoreOptions") -> "StoreOptions":
        return store if isinstance(store, StoreOptions) else cls(store)


def featurize_to_store(featurizer, loader, store: "str | Path | StoreOptions") -> FeatureStore:
    """Every row of ``loader`` from ``featurizer`` (store.featurizer.Featurizer) into the store
    ``store`` (a folder, or StoreOptions)."""
    f, opts = featurizer, StoreOptions.of(store)
    path, dtype = opts.path, opts.dtype
    check_loader(loader)
    ds = loader.dataset
    n = len(ds)
    if n == 0:
        raise EmptyDataError("the train loader's dataset is empty; nothing to featurize.")
    rank, world = dist_info()
    layers = store_layers(f)
    chunk_size = opts.rows_per_chunk(sum(l.r for l in layers))
    if chunk_size < 1:
        raise ConfigError("chunk_size must be ≥ 1")
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
    stage = BatchRows(layers, loader.batch_size, f.device)
    total = sum(store.rows(k)[1] - store.rows(k)[0] for k in pending)
    desc = "featurize → store" + (f" [rank {rank}/{world}]" if world > 1 else "")
    with f.mode(), tqdm(total=total, desc=desc, unit="ex", disable=not f.progress) as bar:
        while pending:
            progressed = False
            for k in list(pending):
                start, stop = store.rows(k)
                shown = 0             # rows of this chunk the bar already counts
                if not store.chunk_done(k) and store.claim(k):
                    try:
                        if not store.chunk_done(k, verify=True):
                            shown = _compute_chunk(f, capture, store, layers, loader, k, bar, stage)
                    finally:
                        store.release(k)
                if store.chunk_done(k):
                    pending.remove(k)
                    bar.update(stop - start - shown)
                    progressed = True
            if pending and not progressed:
                time.sleep(0.2)          # another live process holds these chunks: wait for it
    _barrier(world)
    if rank == 0:
        store.finalize()
    _barrier(world)
    return FeatureStore.open(path)


def store_layers(featurizer) -> list[LayerCols]:
    """The store's column layout of a Featurizer's rows: each tracked layer's r_l columns, in
    layer order, with its damping dimension."""
    layers, off, dims = [], 0, featurizer.damping_dims()
    for l in featurizer.layers:
        r = featurizer.compressors[l.name].r
        layers.append(LayerCols(l.name, r, off, dims[l.name]))
        off += r
    return layers


class BatchRows:
    """One batch's rows as the store lays them out, (batch_size, width) float32 on the capture's
    device, reused for every batch: the capture writes each layer's rows straight into its columns
    (BatchCapture's ``out``), so a batch's rows are neither allocated anew (fresh memory faults
    on first touch) nor concatenated."""

    def __init__(self, layers: list[LayerCols], batch_size: int, device: torch.device):
        width = sum(l.r for l in layers)
        self.layers, self.buf = layers, torch.empty(batch_size, width, device=device)
        self.views = {l.name: self.buf[:, l.offset:l.offset + l.r] for l in layers}

    def block(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, width) rows on the CPU: the buffer's first B rows when the capture wrote every layer
        there, else the layers concatenated."""
        b = next(iter(feats.values())).shape[0] if feats else 0
        if feats and all(feats[l.name].data_ptr() == self.views[l.name][:b].data_ptr() for l in self.layers):
            return self.buf[:b].cpu()
        return torch.cat([feats[l.name].cpu() for l in self.layers], 1)


def _compute_chunk(f, capture, store: FeatureStore, layers: list[LayerCols], loader, k: int, bar,
                   stage: BatchRows) -> int:
    """Chunk k, batch by batch into its file (memory: one batch), from where a previous run stopped
    inside it (store.chunk); returns the dataset positions it showed on the bar."""
    start, stop = store.rows(k)
    with store.chunk_writer(k) as out:
        shown = out.resumed
        bar.update(shown)
        position = out.next
        for ids, batch in chunk_loader(loader, out.next, stop):
            position = min(position + loader.batch_size, stop)    # batches cover consecutive positions
            if batch is None:          # the collate function dropped every example of this batch
                out.advance(position)
            else:
                ids, feats, loss, bad, lays = f.rows(capture, batch, ids, out=stage.views)
                raise_nonfinite(bad, lays)
                # rows a collate function dropped are absent; the chunk records which ids it holds
                out.append(stage.block(feats), ids, position)
            bar.update(position - start - shown)
            shown = position - start
        out.finish()
    return shown
