"""Content-addressed file store. Objects are named by their sha256.

Two backends behind one interface: `LocalStorage` (a folder, shared by every process that sees it) and `S3Storage`
(an S3-compatible bucket, for workers on several machines). `make_storage(settings)` picks one from
`storage_url`. Uploads always land in a local temp file first (so they can be hashed and inspected), then
`commit_temp` moves them into the store.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol
from urllib.parse import urlsplit

from app.core.errors import DistilleryError

if TYPE_CHECKING:
    from app.core.config import Settings

CHUNK = 1024 * 1024
HEX = frozenset("0123456789abcdef")
log = logging.getLogger("distillery.storage")


class StorageUnavailable(DistilleryError):
    """The object store could not be reached or refused the request (transient)."""

    status_code = 503
    code = "storage_unavailable"


class ContentCorrupt(DistilleryError):
    """Stored bytes did not hash to the sha256 they are stored under."""

    status_code = 502
    code = "storage_content_corrupt"


def check_sha256(sha256: str) -> str:
    if len(sha256) != 64 or not HEX.issuperset(sha256):
        raise ValueError("not a sha256 hex digest")
    return sha256


class Storage(Protocol):
    def new_temp(self) -> tuple[BinaryIO, Path]: ...
    def commit_temp(self, temp: Path, sha256: str) -> None: ...
    def put_file(self, path: Path) -> tuple[str, int]: ...
    def exists(self, sha256: str) -> bool: ...
    def local_path(self, sha256: str) -> Path: ...
    def open(self, sha256: str) -> BinaryIO: ...
    def open_range(self, sha256: str, start: int, end: int) -> BinaryIO: ...
    def iter_range(self, sha256: str, start: int, end: int) -> Iterator[bytes]: ...
    def size(self, sha256: str) -> int: ...
    def delete(self, sha256: str) -> None: ...
    def clean_temp(self, older_than_s: float = 0) -> int: ...
    def check(self) -> None: ...


class LocalStorage:
    """Files under `root/objects/ab/cdef...`; temp files under `root/tmp` on the same file system (atomic rename)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.tmp = self.root / "tmp"
        self.objects.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def _path(self, sha256: str) -> Path:
        check_sha256(sha256)
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

    def open_range(self, sha256: str, start: int, end: int) -> BinaryIO:
        """A read-only file of bytes start..end inclusive (position 0 = byte `start`)."""
        f = self.open(sha256)
        return io.BufferedReader(_FileWindow(f, start, end - start + 1), CHUNK)

    def iter_range(self, sha256: str, start: int, end: int) -> Iterator[bytes]:
        """Yield bytes start..end inclusive."""
        return iter_file(self.open(sha256), start, end)

    def check(self) -> None:
        """Raise StorageUnavailable unless the store's folder is there."""
        if not self.objects.is_dir():
            raise StorageUnavailable(f"storage folder {self.objects} is missing")

    def clean_temp(self, older_than_s: float = 0) -> int:
        """Remove temp files left by a process that died mid-upload."""
        return _clean_folder(self.tmp, older_than_s)


def _clean_folder(folder: Path, older_than_s: float) -> int:
    removed = 0
    cutoff = time.time() - older_than_s
    for p in folder.iterdir():
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


# ------------------------------------------------------------------------------------ ranged readers

def iter_file(f: BinaryIO, start: int, end: int) -> Iterator[bytes]:
    """Bytes start..end (inclusive) of an open file, closing it at the end (or when the reader goes away)."""
    try:
        f.seek(start)
        left = end - start + 1
        while left > 0:
            chunk = f.read(min(CHUNK, left))
            if not chunk:
                break
            left -= len(chunk)
            yield chunk
    finally:
        f.close()


class _Window(io.RawIOBase):
    """A seekable, readable window of `_length` bytes; subclasses read at `_pos`."""

    _pos: int
    _length: int

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        if base + pos < 0:
            raise ValueError("negative seek position")
        self._pos = base + pos
        return self._pos


class _FileWindow(_Window):
    """Bytes offset..offset+length-1 of an open local file, seekable, positions relative to the window."""

    def __init__(self, f: BinaryIO, offset: int, length: int):
        self._f, self._offset, self._length, self._pos = f, offset, max(0, length), 0

    def readinto(self, buffer) -> int:
        left = self._length - self._pos
        if left <= 0:
            return 0
        view = memoryview(buffer)[:left]
        self._f.seek(self._offset + self._pos)
        n = self._f.readinto(view)
        self._pos += n or 0
        return n or 0

    def close(self) -> None:
        if not self.closed:
            self._f.close()
        super().close()


class _S3Window(_Window):
    """Bytes offset..offset+length-1 of an S3 object, seekable. Reading streams one ranged GetObject from the current
    position to the end of the window; a seek elsewhere closes that stream and the next read opens another."""

    def __init__(self, storage: "S3Storage", key: str, offset: int, length: int):
        self._storage, self._key, self._offset, self._length = storage, key, offset, max(0, length)
        self._pos = 0
        self._body = None
        self._body_pos = -1

    def _drop_body(self) -> None:
        if self._body is not None:
            self._body.close()
            self._body, self._body_pos = None, -1

    def readinto(self, buffer) -> int:
        left = self._length - self._pos
        if left <= 0:
            return 0
        if self._body is None or self._body_pos != self._pos:
            self._drop_body()
            start = self._offset + self._pos
            self._body = self._storage._get(self._key, start, self._offset + self._length - 1)["Body"]
            self._body_pos = self._pos
        view = memoryview(buffer)[:left]
        with self._storage._errors("read"):
            data = self._body.read(len(view))
        if not data:
            raise StorageUnavailable(f"object {self._key} ended early at byte {self._offset + self._pos}")
        n = len(data)
        view[:n] = data
        self._pos += n
        self._body_pos = self._pos
        return n

    def close(self) -> None:
        if not self.closed:
            self._drop_body()
        super().close()


class _S3File(io.BufferedReader):
    identity: tuple | None = None


# ---------------------------------------------------------------------------------------- S3 backend

class S3Storage:
    """Objects at `s3://bucket/prefix/objects/ab/cdef...` on any S3-compatible store (AWS S3, MinIO, ...).

    Uploads stream to a local temp file (hashed and inspected there), then go up in parts of at most `part_size`
    bytes (constant memory); nothing stays in the temp folder. The API serves downloads straight from ranged
    GetObject streams. Workers get local files from `local_path`: a download into a cache folder, verified
    against the sha256, renamed into place atomically, and evicted least-recently-used past `cache_max_bytes`
    (entries used within `cache_pin_s` are kept, since a running job may still open them).

    Credentials come from boto3's standard chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN,
    AWS_PROFILE and ~/.aws, or an instance/task role); none are kept in Settings.
    """

    MIN_PART = 5 * 1024**2  # S3's smallest part (all but the last)
    MAX_PARTS = 10_000

    def __init__(self, bucket: str, prefix: str, *, tmp_dir: Path, cache_dir: Path, endpoint_url: str | None = None,
                 region: str | None = None, part_size: int = 16 * 1024**2, cache_max_bytes: int = 20 * 1024**3,
                 cache_pin_s: float = 3600.0):
        import boto3
        from botocore.config import Config

        if not bucket:
            raise ValueError("an S3 storage URL needs a bucket: s3://bucket/prefix")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.tmp = Path(tmp_dir)
        self.cache = Path(cache_dir)
        self.cache_objects = self.cache / "objects"
        self.cache_tmp = self.cache / "tmp"
        for d in (self.tmp, self.cache_objects, self.cache_tmp):
            d.mkdir(parents=True, exist_ok=True)
        _clean_folder(self.cache_tmp, 3600)  # downloads a killed process left half-written
        self.part_size = max(self.MIN_PART, part_size)
        self.cache_max_bytes = cache_max_bytes
        self.cache_pin_s = cache_pin_s
        self.endpoint_url = endpoint_url
        config = Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=10, read_timeout=60,
                        s3={"addressing_style": "path"} if endpoint_url else None)
        # a Session per store: boto3's default session is not thread-safe to build clients from
        session = boto3.session.Session()
        self.client = session.client("s3", endpoint_url=endpoint_url,
                                     region_name=region or session.region_name or "us-east-1", config=config)

    def __repr__(self) -> str:
        return f"S3Storage(s3://{self.bucket}/{self.prefix})"

    # ---- keys and errors

    def key(self, sha256: str) -> str:
        check_sha256(sha256)
        rel = f"objects/{sha256[:2]}/{sha256[2:]}"
        return f"{self.prefix}/{rel}" if self.prefix else rel

    @contextmanager
    def _errors(self, action: str):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as exc:
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound"):
                raise FileNotFoundError(f"s3://{self.bucket}: no such object ({action})") from None
            raise StorageUnavailable(f"object storage refused to {action}: {code or 'error'}",
                                     detail={"backend": "s3", "bucket": self.bucket, "code": code}) from None
        except BotoCoreError as exc:
            raise StorageUnavailable(f"object storage unreachable ({action}): {type(exc).__name__}",
                                     detail={"backend": "s3", "bucket": self.bucket}) from None

    def _head(self, sha256: str) -> dict:
        with self._errors("head an object"):
            return self.client.head_object(Bucket=self.bucket, Key=self.key(sha256))

    def _get(self, key: str, start: int, end: int) -> dict:
        with self._errors("read an object"):
            return self.client.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={start}-{end}")

    # ---- writing

    def new_temp(self) -> tuple[BinaryIO, Path]:
        fd, name = tempfile.mkstemp(dir=self.tmp, prefix="upload-")
        return os.fdopen(fd, "wb"), Path(name)

    def commit_temp(self, temp: Path, sha256: str) -> None:
        """Upload a fully written temp file (unless the bucket has that content already), then remove it."""
        try:
            if not self.exists(sha256):
                self._upload(temp, sha256)
        finally:
            Path(temp).unlink(missing_ok=True)

    def put_file(self, path: Path) -> tuple[str, int]:
        """Hash a local file, upload it under its sha256; returns (sha256, size). The file is left in place."""
        h = hashlib.sha256()
        n = 0
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
                n += len(chunk)
        digest = h.hexdigest()
        if not self.exists(digest):
            self._upload(Path(path), digest)
        return digest, n

    def _upload(self, path: Path, sha256: str) -> None:
        key = self.key(sha256)
        size = path.stat().st_size
        part = max(self.part_size, -(-size // self.MAX_PARTS))
        meta = {"sha256": sha256}
        with open(path, "rb") as f:
            if size <= part:
                with self._errors("store an object"):
                    self.client.put_object(Bucket=self.bucket, Key=key, Body=f, ContentLength=size, Metadata=meta,
                                           ContentType="application/octet-stream")
                return
            with self._errors("start a multipart upload"):
                upload_id = self.client.create_multipart_upload(
                    Bucket=self.bucket, Key=key, Metadata=meta, ContentType="application/octet-stream")["UploadId"]
            try:
                parts = []
                number = 1
                while chunk := f.read(part):  # one part in memory at a time
                    with self._errors("upload a part"):
                        etag = self.client.upload_part(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                                       PartNumber=number, Body=chunk)["ETag"]
                    parts.append({"ETag": etag, "PartNumber": number})
                    number += 1
                with self._errors("complete a multipart upload"):
                    self.client.complete_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                                          MultipartUpload={"Parts": parts})
            except BaseException:
                try:
                    self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
                except Exception:  # noqa: BLE001 - the first error is the one to report
                    log.warning("could not abort multipart upload %s of %s", upload_id, key)
                raise

    def delete(self, sha256: str) -> None:
        with self._errors("delete an object"):
            self.client.delete_object(Bucket=self.bucket, Key=self.key(sha256))
        self._cache_path(sha256).unlink(missing_ok=True)

    # ---- reading

    def exists(self, sha256: str) -> bool:
        try:
            self._head(sha256)
            return True
        except FileNotFoundError:
            return False

    def size(self, sha256: str) -> int:
        return int(self._head(sha256)["ContentLength"])

    def open(self, sha256: str) -> BinaryIO:
        """A seekable, read-only file of the whole object, streamed on demand (FileNotFoundError if absent).

        Its `identity` (bucket, key, size, ETag, Last-Modified) changes whenever the object is rewritten, as a local
        file's (device, inode, size, mtime) does: a cache of verified contents can key on it."""
        head = self._head(sha256)
        size = int(head["ContentLength"])
        f = _S3File(_S3Window(self, self.key(sha256), 0, size), CHUNK)
        f.identity = (self.bucket, self.key(sha256), size, head.get("ETag"), str(head.get("LastModified")))
        return f

    def open_range(self, sha256: str, start: int, end: int) -> BinaryIO:
        """A read-only file of bytes start..end inclusive (position 0 = byte `start`), one ranged GetObject."""
        return io.BufferedReader(_S3Window(self, self.key(sha256), start, end - start + 1), CHUNK)

    def iter_range(self, sha256: str, start: int, end: int) -> Iterator[bytes]:
        """Yield bytes start..end inclusive from one ranged GetObject. The request is made here, before the first
        byte is asked for, so an unreachable store is an error the caller can still answer with a status code."""
        if end < start:
            return iter(())
        body = self._get(self.key(sha256), start, end)["Body"]

        def stream() -> Iterator[bytes]:
            try:
                with self._errors("read an object"):
                    yield from body.iter_chunks(CHUNK)
            finally:
                body.close()

        return stream()

    def local_path(self, sha256: str) -> Path:
        """A local copy of the object, from the cache or downloaded into it (verified against the sha256)."""
        dest = self._cache_path(sha256)
        if dest.is_file():
            os.utime(dest)  # the LRU clock
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.cache_tmp, prefix="fetch-")
        temp = Path(name)
        try:
            h = hashlib.sha256()
            size = 0
            with os.fdopen(fd, "wb") as out:
                with self._errors("download an object"):
                    body = self.client.get_object(Bucket=self.bucket, Key=self.key(sha256))["Body"]
                    try:
                        for chunk in body.iter_chunks(CHUNK):
                            h.update(chunk)
                            out.write(chunk)
                            size += len(chunk)
                    finally:
                        body.close()
            if h.hexdigest() != sha256:
                raise ContentCorrupt(f"s3://{self.bucket}/{self.key(sha256)} does not hash to its name",
                                     detail={"expected_sha256": sha256, "actual_sha256": h.hexdigest()})
            os.chmod(temp, 0o444)
            os.replace(temp, dest)
        finally:
            temp.unlink(missing_ok=True)
        self.evict_cache(keep=dest)
        return dest

    def _cache_path(self, sha256: str) -> Path:
        check_sha256(sha256)
        return self.cache_objects / sha256[:2] / sha256[2:]

    def evict_cache(self, keep: Path | None = None) -> int:
        """Remove least-recently-used cache entries until the cache fits cache_max_bytes; entries used within
        cache_pin_s stay (a running job may open them). Returns the bytes freed."""
        entries = []
        total = 0
        for p in self.cache_objects.glob("*/*"):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            entries.append((st.st_mtime, st.st_size, p))
            total += st.st_size
        freed = 0
        cutoff = time.time() - self.cache_pin_s
        for mtime, size, p in sorted(entries):
            if total <= self.cache_max_bytes:
                break
            if p == keep or mtime > cutoff:
                continue
            p.unlink(missing_ok=True)
            total -= size
            freed += size
        return freed

    # ---- housekeeping

    def check(self) -> None:
        """Raise StorageUnavailable unless the bucket answers (HeadBucket)."""
        try:
            with self._errors("head the bucket"):
                self.client.head_bucket(Bucket=self.bucket)
        except FileNotFoundError:
            raise StorageUnavailable(f"bucket {self.bucket!r} does not exist",
                                     detail={"backend": "s3", "bucket": self.bucket}) from None

    def clean_temp(self, older_than_s: float = 0) -> int:
        """Remove temp files (uploads, downloads) left by a process that died mid-transfer."""
        return _clean_folder(self.tmp, older_than_s) + _clean_folder(self.cache_tmp, older_than_s)


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket/prefix` -> (bucket, prefix)."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"storage_url must look like s3://bucket/prefix, got {url!r}")
    return parts.netloc, parts.path.strip("/")


def make_storage(settings: "Settings") -> LocalStorage | S3Storage:
    """The store the settings name: `storage_url` s3://bucket/prefix, else the local `storage_dir`."""
    if not settings.storage_url:
        return LocalStorage(settings.storage_dir)
    bucket, prefix = parse_s3_url(settings.storage_url)
    return S3Storage(bucket, prefix, tmp_dir=settings.storage_dir / "tmp", cache_dir=settings.data_dir / "cache",
                     endpoint_url=settings.s3_endpoint_url, region=settings.s3_region,
                     cache_max_bytes=settings.storage_cache_max_bytes, cache_pin_s=settings.job_time_limit_s)
