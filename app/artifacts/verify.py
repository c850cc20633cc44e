"""Artifacts are checked against the sha256 the database recorded before any byte of them is served.

A stored file can rot (disk or volume faults, a bad restore, someone editing the store by hand). Serving it would
hand a client a model that differs from what the job measured, under an ETag that claims otherwise. So a download
opens the file once (through the Storage interface's `open()`), hashes it, and streams from that same open file
only when the digest matches the row's.

Hashing a multi-GB artifact on every download would be wasteful, so a verification is remembered in this process
per (file identity, size, mtime_ns): any rewrite of the file changes its mtime (or its inode, for a replace) and
forces a new check. A write that also restores the old mtime is not detected until the process restarts; that is
the documented limit of the cache. A store whose files have no descriptor (object storage) is verified once per
process per (sha256, size): its objects are written once under their sha256 and not rewritten in place.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from typing import BinaryIO

from app.core.errors import DistilleryError
from app.core.storage import CHUNK

log = logging.getLogger("distillery.artifacts")
CACHE_ENTRIES = 4096


class ArtifactCorrupted(DistilleryError):
    """503: the stored bytes do not match the recorded sha256. A fault of the server's storage, not of the request,
    so a 5xx that monitoring counts (and one that HTTP caches do not store by default); the bytes are never sent."""

    status_code = 503
    code = "artifact_corrupted"


class VerifiedCache:
    """Bounded LRU of file states whose sha256 was checked, shared by the threads of one API process."""

    def __init__(self, max_entries: int = CACHE_ENTRIES):
        self.max_entries = max_entries
        self._ok: OrderedDict[tuple, None] = OrderedDict()
        self._lock = threading.Lock()
        self.hashes = 0  # full hashes done (the test checks that repeats do not re-hash)

    def seen(self, key: tuple) -> bool:
        with self._lock:
            if key in self._ok:
                self._ok.move_to_end(key)
                return True
            return False

    def remember(self, key: tuple) -> None:
        with self._lock:
            self._ok[key] = None
            self._ok.move_to_end(key)
            while len(self._ok) > self.max_entries:
                self._ok.popitem(last=False)


_cache = VerifiedCache()


def _state_key(f: BinaryIO, sha256: str) -> tuple | None:
    """(sha256, device, inode, size, mtime_ns) of an open local file; None when the object has no file descriptor."""
    try:
        st = os.fstat(f.fileno())
    except (AttributeError, OSError, ValueError):
        return None
    return sha256, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _digest(f: BinaryIO) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    f.seek(0)
    while chunk := f.read(CHUNK):
        h.update(chunk)
        n += len(chunk)
    return h.hexdigest(), n


def open_verified(storage, artifact_id: str, sha256: str, size_bytes: int,
                  cache: VerifiedCache = _cache) -> BinaryIO:
    """The artifact's file, open and checked against `sha256` and `size_bytes`; ArtifactCorrupted otherwise.

    The caller streams from (and closes) the returned file: it is the very file that was checked, so a file swapped
    in after the check is not what gets served."""
    f = storage.open(sha256)
    try:
        key = _state_key(f, sha256)
        if key is not None and key[3] != size_bytes:
            _corrupted(artifact_id, sha256, size_bytes, f"{key[3]} bytes on disk")
        key = key or ("object", sha256, size_bytes)
        if not cache.seen(key):
            cache.hashes += 1
            actual, n = _digest(f)
            if n != size_bytes or actual != sha256:
                _corrupted(artifact_id, sha256, size_bytes, f"sha256 {actual} over {n} bytes in storage")
            cache.remember(key)
        return f
    except BaseException:
        f.close()
        raise


def _corrupted(artifact_id: str, sha256: str, size_bytes: int, found: str) -> None:
    log.error("artifact %s is corrupted in storage: recorded sha256 %s over %d bytes, found %s; not served",
              artifact_id, sha256, size_bytes, found)
    raise ArtifactCorrupted(f"the stored content of artifact {artifact_id} does not match its recorded sha256; it "
                            "is not served (the operator has been told in the server log; re-run the job to "
                            "produce it again)",
                            detail={"artifact_id": artifact_id, "sha256": sha256, "size_bytes": size_bytes})
