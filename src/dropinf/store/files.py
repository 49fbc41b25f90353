"""File utilities of the store: atomic writes (temporary name, fsync, rename), a full disk as a
StoreError, and shard checksums (CRC-32C; sha256 for stores written before)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import crc32c

from ..errors import StoreError


def _tmp_name(path: Path) -> Path:
    """A temporary name unique to this process and thread, so that concurrent writers never
    rename each other's files."""
    import threading
    return path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident() % 10**6}.tmp")


def disk_full(exc: OSError, path: Path, nbytes: int):
    """A DropinfError for a write that ran out of space (ENOSPC/EDQUOT), else None."""
    import errno
    import shutil
    if exc.errno not in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return None
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = 0
    return StoreError(f"no space left on the device writing {path} ({nbytes:,} bytes needed, {free:,} free). "
                      f"Nothing partial was kept: free some space and re-run the same command to resume.")


def write_bytes_atomic(path: Path, data) -> None:
    """Write ``data`` (bytes-like or str) to a per-process temporary file, fsync, rename over
    ``path``; the temporary file is removed whatever happens, and a full disk is a StoreError."""
    tmp = _tmp_name(path)
    mode = "w" if isinstance(data, str) else "wb"
    try:
        with open(tmp, mode) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        err = disk_full(exc, path, len(data))
        if err is None:
            raise
        raise err from exc
    finally:
        if tmp.exists():
            tmp.unlink()


class AtomicAppend:
    """A file written piece by piece: bytes go to a per-process temporary file and into a running
    CRC-32C; ``commit()`` fsyncs and renames it over ``path``. Without a commit (an error, an
    interruption) the temporary file is removed, so ``path`` is whole or absent. A full disk is a
    StoreError."""

    def __init__(self, path: Path):
        self.path, self.tmp = Path(path), _tmp_name(Path(path))
        self.nbytes, self._crc = 0, 0
        self._f = open(self.tmp, "wb")

    def write(self, buf) -> None:
        try:
            self._f.write(buf)
        except OSError as exc:
            self._fail(exc, len(buf))
        self._crc = crc32c.crc32c(buf, value=self._crc)
        self.nbytes += len(buf)

    @property
    def crc(self) -> str:
        return f"{self._crc:08x}"

    def commit(self) -> None:
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            os.replace(self.tmp, self.path)
        except OSError as exc:
            self._fail(exc, self.nbytes)

    def discard(self) -> None:
        if not self._f.closed:
            self._f.close()
        if self.tmp.exists():
            self.tmp.unlink()

    def _fail(self, exc: OSError, nbytes: int):
        self.discard()
        err = disk_full(exc, self.path, nbytes)
        if err is None:
            raise exc
        raise err from exc


def _atomic_write(path: Path, text: str) -> None:
    write_bytes_atomic(path, text)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _crc(buf) -> str:
    return f"{crc32c.crc32c(buf):08x}"


def _checksum_ok(entry: dict, path: Path, buf=None) -> bool:
    """True if the shard matches its recorded checksum (CRC-32C, or sha256 for older stores).
    ``buf``: the shard's bytes already in memory (avoids a second read)."""
    if "crc32c" in entry:
        if buf is None:
            buf = path.read_bytes()
        return _crc(buf) == entry["crc32c"]
    return _sha256(path) == entry.get("sha256")
