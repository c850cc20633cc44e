"""Content-addressed file store. Objects are named by their sha256; an object store can implement the same interface."""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

CHUNK = 1024 * 1024


class Storage(Protocol):
    def new_temp(self) -> tuple[BinaryIO, Path]: ...
    def commit_temp(self, temp: Path, sha256: str) -> None: ...
    def put_file(self, path: Path) -> tuple[str, int]: ...
    def exists(self, sha256: str) -> bool: ...
    def local_path(self, sha256: str) -> Path: ...
    def open(self, sha256: str) -> BinaryIO: ...
    def size(self, sha256: str) -> int: ...
    def delete(self, sha256: str) -> None: ...


class LocalStorage:
    """Files under `root/objects/ab/cdef...`; temp files under `root/tmp` on the same file system (atomic rename)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.tmp = self.root / "tmp"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def _path(self, sha256: str) -> Path:
        if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
            raise ValueError("not a sha256 hex digest")
        return self.objects / sha256[:2] / sha256[2:]

    def new_temp(self) -> tuple[BinaryIO, Path]:
        fd, name = tempfile.mkstemp(dir=self.tmp, prefix="upload-")
        return os.fdopen(fd, "wb"), Path(name)

    def commit_temp(self, temp: Path, sha256: str) -> None:
        """Move a fully written temp file into place; a second copy of the same content is simply dropped."""
        dest = self._path(sha256)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            temp.unlink(missing_ok=True)
            return
        os.chmod(temp, 0o644)
        os.replace(temp, dest)

    def put_file(self, path: Path) -> tuple[str, int]:
        """Copy a file in (hashing as it goes); returns (sha256, size)."""
        h = hashlib.sha256()
        n = 0
        out, temp = self.new_temp()
        try:
            with out, open(path, "rb") as src:
                while chunk := src.read(CHUNK):
                    h.update(chunk)
                    out.write(chunk)
                    n += len(chunk)
            digest = h.hexdigest()
            self.commit_temp(temp, digest)
            return digest, n
        finally:
            temp.unlink(missing_ok=True)

    def exists(self, sha256: str) -> bool:
        return self._path(sha256).is_file()

    def local_path(self, sha256: str) -> Path:
        return self._path(sha256)

    def open(self, sha256: str) -> BinaryIO:
        return open(self._path(sha256), "rb")

    def size(self, sha256: str) -> int:
        return self._path(sha256).stat().st_size

    def delete(self, sha256: str) -> None:
        self._path(sha256).unlink(missing_ok=True)

    def iter_range(self, sha256: str, start: int, end: int) -> Iterator[bytes]:
        """Yield bytes start..end inclusive."""
        with self.open(sha256) as f:
            f.seek(start)
            left = end - start + 1
            while left > 0:
                chunk = f.read(min(CHUNK, left))
                if not chunk:
                    break
                left -= len(chunk)
                yield chunk

    def clean_temp(self, older_than_s: float = 0) -> int:
        """Remove temp files left by a process that died mid-upload."""
        import time

        removed = 0
        cutoff = time.time() - older_than_s
        for p in self.tmp.iterdir():
            try:
                if p.stat().st_mtime <= cutoff:
                    if p.is_dir():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        p.unlink()
                    removed += 1
            except FileNotFoundError:
                pass
        return removed


def make_storage(settings) -> LocalStorage:
    return LocalStorage(settings.storage_dir)
