"""One chunk of a FeatureStore written batch by batch, resumable inside the chunk.

Rows go to ``chunks/NNNNNN.bin.partial`` and their dataset ids to ``NNNNNN.bin.partial.ids`` as
each batch arrives (memory: one batch). ``NNNNNN.bin.partial.json`` records how many rows are
whole and the chunk's next dataset position; it is rewritten (atomically, after the rows are
flushed) at most every ``STATE_EVERY_S`` seconds and after the last batch. A run that stops part
way — Ctrl-C, an exception, SIGKILL — leaves these files behind; the next run that claims the
chunk keeps the rows the record counts (cutting off a torn tail), recomputes their checksum and
continues from the recorded position, so a kill costs at most the batches of the last few
seconds, whatever the chunk size. Batches start at the same positions as in an uninterrupted run
(the chunk's start plus multiples of the batch size), so a resumed shard is byte-identical to one
written in one go.

``finish()`` fsyncs the data and renames it over the shard's name, writes the ids when the collate
function dropped examples, removes the partial files and writes the done-marker last. A full disk
discards the partial files (the space is freed) and is a StoreError.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import crc32c
import numpy as np
import torch

from ..errors import StoreError
from .files import _atomic_write, _crc, _dump, disk_full, write_bytes_atomic

STATE_EVERY_S = 1.0          # the resume record is rewritten at most this often (and after the last batch)


class ChunkWriter:
    """Chunk k of ``store``: ``append(rows, ids, next)`` per batch, then ``finish()``.
    ``next`` is the dataset position to continue from (the chunk's start, or where a previous run
    stopped) and ``rows`` the rows already written. ``resume=False`` starts the chunk afresh."""

    def __init__(self, store, k: int, resume: bool = True):
        self.store, self.k = store, k
        self.start, self.stop = store.rows(k)
        self.path = dp = store.data_path(k)
        for stale in dp.parent.glob(dp.name + ".*.tmp"):     # left by a killed writer (we hold the chunk's lock)
            stale.unlink(missing_ok=True)
        self.part, self.ids_part, self.state = (dp.with_name(dp.name + s) for s in (".partial", ".partial.ids",
                                                                                    ".partial.json"))
        self.row_bytes = store.width * np.dtype(store.np_dtype).itemsize
        self.rows, self.next, self._crc, self._saved = 0, self.start, 0, 0.0
        if not (resume and self._resume()):
            self.discard()
        self._f, self._ids = open(self.part, "ab"), open(self.ids_part, "ab")
        self.resumed = self.next - self.start            # dataset positions a previous run already did

    def _resume(self) -> bool:
        """Keep what a previous run recorded as whole; False when there is nothing (valid) to keep."""
        try:
            st = json.loads(self.state.read_text())
            rows, nxt = int(st["rows"]), int(st["next"])
            nb = rows * self.row_bytes
            if not (self.start <= nxt <= self.stop and 0 <= rows <= nxt - self.start
                    and self.part.stat().st_size >= nb and self.ids_part.stat().st_size >= 8 * rows):
                return False
            os.truncate(self.part, nb)
            os.truncate(self.ids_part, 8 * rows)
            ids = np.fromfile(self.ids_part, dtype=np.int64)
            if ids.size and (ids.min() < self.start or ids.max() >= nxt):
                return False
            crc = 0
            with open(self.part, "rb") as f:
                while block := f.read(1 << 24):
                    crc = crc32c.crc32c(block, value=crc)
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
            return False
        self.rows, self.next, self._crc = rows, nxt, crc
        return True

    def __enter__(self) -> "ChunkWriter":
        return self

    def __exit__(self, *exc) -> None:
        """Without finish(): the rows recorded so far stay for the next run (they are flushed)."""
        if not self._f.closed:
            self._record(force=True)
            self._f.close()
            self._ids.close()

    def _write(self, f, buf) -> None:
        try:
            f.write(buf)
        except OSError as exc:
            self._disk_full(exc, len(buf))

    def _disk_full(self, exc: OSError, nbytes: int):
        self.discard()
        err = disk_full(exc, self.path, nbytes)
        if err is None:
            raise exc
        raise err from exc

    def append(self, block: torch.Tensor, ids: torch.Tensor | None, next: int) -> None:
        """Rows (b, width) of dataset ids ``ids`` (None: the next b positions); ``next``: the
        dataset position after this batch."""
        st = self.store
        if block.dim() != 2 or block.shape[1] != st.width:
            raise StoreError(f"chunk {self.k} rows must be (rows, {st.width}), got {tuple(block.shape)}")
        b = block.shape[0]
        if ids is None:
            ids = torch.arange(self.next, self.next + b)
        if self.rows + b > self.stop - self.start or ids.numel() != b:
            raise StoreError(f"chunk {self.k} holds at most {self.stop - self.start} rows; got {self.rows + b} "
                             f"(or {ids.numel()} ids for {b} rows)")
        t = block.to(st.torch_dtype).contiguous()
        arr = t.view(torch.uint16).numpy() if st.torch_dtype == torch.bfloat16 else t.numpy()
        buf = memoryview(np.ascontiguousarray(arr)).cast("B")
        self._write(self._f, buf)
        self._crc = crc32c.crc32c(buf, value=self._crc)
        self._write(self._ids, memoryview(np.ascontiguousarray(ids.to(torch.int64).numpy())).cast("B"))
        self.rows += b
        self.advance(next)

    def advance(self, next: int) -> None:
        """The chunk's next dataset position (after a batch, or a batch the collate function emptied)."""
        self.next = max(self.next, min(int(next), self.stop))
        self._record(force=self.next >= self.stop)

    def _record(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._saved < STATE_EVERY_S:
            return
        try:
            self._f.flush()
            self._ids.flush()
            tmp = self.state.with_name(self.state.name + ".new")
            tmp.write_text(json.dumps({"rows": self.rows, "next": self.next}))
            os.replace(tmp, self.state)       # no fsync per batch: a killed process's writes are in the page cache
        except OSError as exc:
            self._disk_full(exc, 64)
        self._saved = now

    def finish(self) -> None:
        st, k = self.store, self.k
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self._ids.close()
            nbytes = self.part.stat().st_size
            os.replace(self.part, self.path)
        except OSError as exc:
            self._disk_full(exc, self.rows * self.row_bytes)
        entry = {"id": k, "rows": [self.start, self.stop], "n_rows": self.rows, "file": f"chunks/{self.path.name}",
                 "bytes": nbytes, "crc32c": f"{self._crc:08x}"}
        if self.rows != self.stop - self.start:      # rows a collate function dropped: the ids it kept
            ib = memoryview(np.ascontiguousarray(np.fromfile(self.ids_part, dtype=np.int64))).cast("B")
            write_bytes_atomic(st.ids_path(k), ib)
            entry["ids_crc32c"] = _crc(ib)
        self.ids_part.unlink(missing_ok=True)
        self.state.unlink(missing_ok=True)
        _atomic_write(st.marker_path(k), _dump(entry))

    def discard(self) -> None:
        """Remove this chunk's partial files (closing them first)."""
        for f in (getattr(self, "_f", None), getattr(self, "_ids", None)):
            if f is not None and not f.closed:
                f.close()
        for p in (self.part, self.ids_part, self.state, self.state.with_name(self.state.name + ".new")):
            Path(p).unlink(missing_ok=True)
