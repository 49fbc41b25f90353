"""File utilities of the store: atomic writes (temporary name, fsync, rename), a full disk as a
StoreError, and shard checksums (CRC-32C; sha256 for stores written before)."""

from __future__ import annotations

import hashlib
import json
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


def _dump(obj) -> str:
    return json.dumps(obj, indent=1, sort_keys=True) + "\n"
