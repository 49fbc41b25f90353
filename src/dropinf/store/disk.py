"""On-disk gradient store: fixed row-chunks of compressed features as raw memmap-able shards
plus a JSON manifest recording everything that makes features comparable.

Layout of a store folder::

    manifest.json          format, signature (model fingerprint, layers, compressor + seed + r),
                           layer column offsets, dtype, n, chunk_size, and — once complete —
                           every chunk's row range, byte size and checksum
    chunks/000000.bin      rows [0, C) × R_total columns, row-major, in the store dtype
    chunks/000000.json     the chunk's done-marker (written atomically after the data is synced)
    chunks/000000.bin.partial(.ids, .json)   a chunk being written, or stopped part way: its rows,
                           their ids and a resume record (store.chunk); gone once the chunk is done
    precond/NAME-HASH.npz  fitted preconditioners (see estimators.preconditioner), one per
                           estimator configuration, reused by ``Attributor.from_store``

A chunk counts as done only when its marker exists and the file's size and checksum match it,
so a run killed at any point (SIGKILL included) resumes without a lost or duplicated row. The
manifest has no timestamps or host names: two runs that store the same features produce
byte-identical folders.

Checksums are CRC-32C (hardware-accelerated, ~10 GB/s; stores written before used sha256 and
still read). Each shard is verified once per opened store — the first pass that reads it — and
then read at page-cache speed on every later pass (fit, score, top-k, self-influence).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..errors import FeatureMismatchError, StoreError  # StoreError: also dropinf.store.disk.StoreError
from .features import Features, _diff, comparable
from .chunk import ChunkWriter
from .files import _atomic_write, _checksum_ok, _crc, _dump
from .locks import claim

FORMAT = "dropinf-store/1"
DTYPES = {"float32": (np.float32, torch.float32), "float16": (np.float16, torch.float16),
          "bfloat16": (np.uint16, torch.bfloat16)}


@dataclass
class LayerCols:
    name: str
    r: int
    offset: int
    damping_dim: int


class FeatureStore:
    """A store folder. Create with ``FeatureStore.create`` (or reopen it for resume with the
    same arguments), read with ``FeatureStore.open``."""

    def __init__(self, path: Path, manifest: dict):
        self.path = Path(path)
        missing = [k for k in ("signature", "dtype", "n", "chunk_size", "n_chunks", "layers") if k not in manifest]
        if missing:
            raise StoreError(f"{self.path / 'manifest.json'} lacks {missing}: the store is damaged or was not "
                             f"written by dropinf. Rebuild it (delete the folder and re-run featurize).")
        self.manifest = manifest
        self.layers = [LayerCols(**l) for l in manifest["layers"]]
        self.n_examples, self.chunk_size = manifest["n"], manifest["chunk_size"]
        self.n_chunks = manifest["n_chunks"]
        # rows actually stored per chunk (a collate function may have dropped examples) and where
        # each chunk starts among the stored rows; known once the store is complete
        counts = [c.get("n_rows", c["rows"][1] - c["rows"][0]) for c in manifest.get("chunks") or []]
        self.offsets = [sum(counts[:k]) for k in range(len(counts))] if counts else \
            [k * self.chunk_size for k in range(self.n_chunks)]
        self.n = sum(counts) if counts else self.n_examples
        self.width = sum(l.r for l in self.layers)
        self.np_dtype, self.torch_dtype = DTYPES[manifest["dtype"]]
        self._verified: set[int] = set()   # shards whose checksum this open has already checked
        self.rows_read = 0                  # rows read so far (observable: tests, benchmarks)

    # ------------------------------------------------------------------ the RowSource seam
    def layer_names(self) -> list[str]:
        return [l.name for l in self.layers]

    def layer_r(self, name: str) -> int:
        return self._layer(name).r

    def damping_dim(self, name: str) -> int:
        return self._layer(name).damping_dim

    def _layer(self, name: str) -> LayerCols:
        for l in self.layers:
            if l.name == name:
                return l
        raise KeyError(name)

    @property
    def signature(self) -> dict:
        return self.manifest["signature"]

    @property
    def precond_dir(self) -> Path:
        return self.path / "precond"

    # ------------------------------------------------------------------ create / open
    @classmethod
    def create(cls, path, signature: dict, layers: list[LayerCols], n: int, chunk_size: int,
               dtype: str = "float32") -> "FeatureStore":
        """New store, or the existing one at ``path`` if it was started with identical settings
        (resume). A folder holding a different store is refused, naming the field."""
        if dtype not in DTYPES:
            raise StoreError(f"store dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if n <= 0:
            raise StoreError("cannot create a store for an empty dataset")
        path = Path(path)
        manifest = {"format": FORMAT, "signature": signature, "dtype": dtype, "n": int(n),
                    "chunk_size": int(chunk_size), "n_chunks": -(-int(n) // int(chunk_size)),
                    "layers": [vars(l) for l in layers], "complete": False, "chunks": []}
        mpath = path / "manifest.json"
        if mpath.exists():
            old = cls.open(path, require_complete=False).manifest
            for key in ("format", "signature", "dtype", "n", "chunk_size", "layers"):
                was, now = (comparable(old[key]), comparable(manifest[key])) if key == "signature" else (old[key], manifest[key])
                if was != now:
                    d = _diff(was, now, key) or [(key, was, now)]
                    what = "; ".join(f"{p}: store={s} vs now={q}" for p, s, q in d[:3])
                    raise FeatureMismatchError(
                        f"{path} already holds a store built with different settings ({what}). Use another "
                        f"folder, or delete this one to rebuild it.")
            return cls(path, old)
        (path / "chunks").mkdir(parents=True, exist_ok=True)
        _atomic_write(mpath, _dump(manifest))
        return cls(path, manifest)

    @classmethod
    def open(cls, path, require_complete: bool = True) -> "FeatureStore":
        path = Path(path)
        mpath = path / "manifest.json"
        if path.exists() and not path.is_dir():
            raise StoreError(f"{path} is a file, not a store folder: pass the folder that featurize(..., "
                             f"store=PATH) or `dropinf featurize --store PATH` created.")
        if not mpath.exists():
            raise StoreError(f"no store at {path}: {mpath} does not exist. Build one with "
                             f"attr.featurize(loader, store=PATH) or `dropinf featurize`.")
        try:
            manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as exc:
            raise StoreError(f"{mpath} is not valid JSON ({exc}); the store is corrupted — rebuild it.") from exc
        if manifest.get("format") != FORMAT:
            raise StoreError(f"{mpath} has format {manifest.get('format')!r}, expected {FORMAT!r}.")
        store = cls(path, manifest)
        if require_complete and not manifest.get("complete"):
            missing = [k for k in range(store.n_chunks) if not store.chunk_done(k)]
            raise StoreError(f"store {path} is incomplete: chunks {missing[:10]}{' ...' if len(missing) > 10 else ''} "
                             f"of {store.n_chunks} are not done. Re-run the same featurize command to resume it.")
        return store

    # ------------------------------------------------------------------ chunks
    def rows(self, k: int) -> tuple[int, int]:
        return k * self.chunk_size, min((k + 1) * self.chunk_size, self.n_examples)

    def data_path(self, k: int) -> Path:
        return self.path / "chunks" / f"{k:06d}.bin"

    def marker_path(self, k: int) -> Path:
        return self.path / "chunks" / f"{k:06d}.json"

    def chunk_done(self, k: int, verify: bool = False) -> bool:
        """Marker present and the data file's size (and, with verify, checksum) match it."""
        mp, dp = self.marker_path(k), self.data_path(k)
        if not mp.exists() or not dp.exists():
            return False
        try:
            marker = json.loads(mp.read_text())
        except json.JSONDecodeError:
            return False
        if dp.stat().st_size != marker["bytes"]:
            return False
        return not verify or _checksum_ok(marker, dp)

    def ids_path(self, k: int) -> Path:
        return self.path / "chunks" / f"{k:06d}.ids"

    def write_chunk(self, k: int, block: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        """Write rows of chunk k (rows × width, float32 tensor) and then its done-marker. ``ids``:
        the dataset ids of the rows when some of the chunk's examples were dropped (None: all)."""
        start, stop = self.rows(k)
        if ids is None and block.shape[0] != stop - start:
            raise StoreError(f"chunk {k} expects {stop - start} rows, got {block.shape[0]}")
        with self.chunk_writer(k, resume=False) as w:
            w.append(block, ids, next=stop)
            w.finish()

    def chunk_writer(self, k: int, resume: bool = True) -> ChunkWriter:
        """Chunk k written batch by batch (``append``), then ``finish()``: memory bounded by a batch;
        resumed where a previous run stopped inside it (store.chunk)."""
        return ChunkWriter(self, k, resume)

    def finalize(self) -> None:
        """All chunks done: record them in the manifest and mark the store complete."""
        chunks = []
        for k in range(self.n_chunks):
            if not self.chunk_done(k):
                raise StoreError(f"cannot finalize {self.path}: chunk {k} is not done")
            chunks.append(json.loads(self.marker_path(k).read_text()))
        for k in range(self.n_chunks):      # locks left by a writer killed after its marker
            self.lock_path(k).unlink(missing_ok=True)
        self.manifest["chunks"] = chunks
        self.manifest["n_rows"] = sum(c.get("n_rows", c["rows"][1] - c["rows"][0]) for c in chunks)
        self.manifest["complete"] = True
        _atomic_write(self.path / "manifest.json", _dump(self.manifest))

    def read_chunk(self, k: int, verify: bool = True) -> dict[str, torch.Tensor]:
        """{layer: (rows, r_l) float32 view} for chunk k, checking its size, and its checksum the
        first time this open reads it (``verify=False`` skips that)."""
        dp = self.data_path(k)
        entry = self._entry(k)
        rows = entry.get("n_rows", self.rows(k)[1] - self.rows(k)[0])
        if not dp.exists():
            raise StoreError(f"store shard {dp} is missing; rebuild the store (or re-run featurize to resume).")
        size = dp.stat().st_size
        if size != entry["bytes"]:
            raise StoreError(f"store shard {dp} is truncated or padded: {size} bytes on disk, {entry['bytes']} "
                             f"recorded in the manifest. Delete {self.marker_path(k).name} and the shard, then "
                             f"re-run featurize to recompute it.")
        arr = np.fromfile(dp, dtype=self.np_dtype)
        if verify and k not in self._verified:
            if not _checksum_ok(entry, dp, memoryview(arr).cast("B")):
                raise StoreError(f"store shard {dp} is corrupted: its checksum does not match the manifest. "
                                 f"Delete {self.marker_path(k).name} and the shard, then re-run featurize to "
                                 f"recompute it.")
            self._verified.add(k)
        t = torch.from_numpy(arr.reshape(rows, self.width))
        if self.torch_dtype == torch.bfloat16:
            t = t.view(torch.bfloat16)
        if t.dtype != torch.float32:
            t = t.float()
        self.rows_read += rows
        return {l.name: t[:, l.offset:l.offset + l.r] for l in self.layers}

    def _entry(self, k: int) -> dict:
        return self.manifest["chunks"][k] if self.manifest.get("chunks") else json.loads(self.marker_path(k).read_text())

    def ids(self) -> torch.Tensor:
        """(n,) int64 dataset id of every stored row, in row order."""
        parts = []
        for k in range(self.n_chunks):
            e = self._entry(k)
            if "ids_crc32c" in e:
                buf = self.ids_path(k).read_bytes() if self.ids_path(k).exists() else b""
                if _crc(buf) != e["ids_crc32c"]:
                    raise StoreError(f"{self.ids_path(k)} is missing or corrupted; rebuild the store (or delete "
                                     f"{self.marker_path(k).name} and re-run featurize to recompute that chunk).")
                parts.append(torch.from_numpy(np.frombuffer(buf, dtype=np.int64).copy()))
            else:
                parts.append(torch.arange(*self.rows(k)))
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    def iter_chunks(self, shard: tuple[int, int] = (0, 1), rows: int | None = None, verify: bool = True
                    ) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """(first row, {layer: (rows, r_l)}) per shard, in order (``rows`` is ignored: the blocks are
        the shards); ``shard=(rank, world)`` yields only the shards k with k % world == rank."""
        rank, world = shard
        for k in range(rank, self.n_chunks, world):
            yield self.offsets[k], self.read_chunk(k, verify)

    def row_ids(self) -> torch.Tensor:
        """(n,) dataset id of every stored row (the RowSource name of ``ids()``)."""
        return self.ids()

    def mean(self) -> Features:
        """One in-memory row, the mean over the stored rows (paper eq. 1's query), accumulated in float64."""
        sums = {l: torch.zeros(1, self.layer_r(l), dtype=torch.float64) for l in self.layer_names()}
        for _, chunk in self.iter_chunks():
            for l, v in chunk.items():
                sums[l] += v.double().sum(0, keepdim=True)
        return Features({l: (v / self.n).float() for l, v in sums.items()}, self.signature,
                        damping_dims={l: self.damping_dim(l) for l in self.layer_names()})

    # ------------------------------------------------------------------ one writer per chunk
    def lock_path(self, k: int) -> Path:
        return self.path / "chunks" / f"{k:06d}.lock"

    def claim(self, k: int) -> bool:
        """Atomically claim chunk k for this process (store.locks.claim)."""
        return claim(self.lock_path(k))

    def release(self, k: int) -> None:
        self.lock_path(k).unlink(missing_ok=True)

    def info(self, verify: bool = True) -> dict:
        """What the store holds. With ``verify`` every shard's size and checksum are checked, and a
        truncated, corrupted or missing shard makes the store ``damaged`` (and not complete)."""
        m = self.manifest
        damaged = []
        done = 0
        for k in range(self.n_chunks):
            if self.chunk_done(k, verify=verify):
                done += 1
            elif m.get("complete") or self.marker_path(k).exists():
                damaged.append(self.data_path(k).name)
        return {"path": str(self.path), "n": self.n, "n_examples": self.n_examples,
                "chunks": f"{done}/{self.n_chunks} done", "verified": bool(verify),
                "complete": bool(m["complete"]) and not damaged, "damaged": damaged,
                "dtype": m["dtype"], "chunk_size": self.chunk_size,
                "compressor": m["signature"].get("compressor"), "model": m["signature"].get("model"),
                "layers": len(self.layers), "columns": self.width,
                "bytes": sum(self.data_path(k).stat().st_size for k in range(self.n_chunks) if self.data_path(k).exists())}
