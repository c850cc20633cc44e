"""Streaming multipart uploads: parsed as they arrive, written to a temp file while hashing, bounded in size.

The request body is never held in memory (FastAPI's UploadFile would spool the whole file before the route runs). The
parse is bounded: the file part by `max_upload_bytes`, the rest of the form (parts, their headers, text fields) by
the constants below, and the whole body read by `max_upload_bytes + FORM_ALLOWANCE` whether or not a
Content-Length is sent; reading stops the moment a bound is crossed. An owner's storage quota is applied while the
file streams in (UploadQuota).
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import psutil

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from app.core.errors import DistilleryError, PayloadTooLarge, Unprocessable
from app.core.storage import LocalStorage

MAX_TEXT_FIELD = 16384  # the `labels` field of 20 labels fits
MAX_TEXT_BYTES = 32768  # all text fields together (the API reads two: `name` and `labels`)
MAX_PARTS = 8  # parts of the form: the one file part, so at most 7 text fields
MAX_PART_HEADERS = 8  # headers of one part (Content-Disposition, Content-Type, ...)
MAX_PART_HEADER_BYTES = 8192  # names and values of one part's headers together
# Bytes of a body past its file part: a form within the bounds above needs at most about 100 KiB (8 parts of
# 8 KiB headers and two boundary lines of at most 262 bytes each, 32 KiB of text).
FORM_ALLOWANCE = 128 * 1024
UNOWNED_TEMP_MAX_AGE_S = 3600.0
log = logging.getLogger("distillery.uploads")


# An upload's temp file is named after the process writing it: `upload~HOST~PID~START~<name>` (START: the
# process's start time in 1/100 s). At start-up an API process removes the temp files of dead processes on its own
# host (killed mid-upload) at once, but not a live process's: several API processes (uvicorn workers, other hosts
# on a shared volume) share the temp folder. Files of other hosts, and unnamed ones, go by age (the store's
# clean_temp: not written for an hour).
_OWNED = re.compile(r"^upload~(?P<host>[A-Za-z0-9.-]{1,64})~(?P<pid>\d{1,10})~(?P<start>\d{1,16})~")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:64] or "host"


def _start_stamp(pid: int) -> int | None:
    try:
        return int(round(psutil.Process(pid).create_time() * 100))
    except (psutil.Error, OSError):
        return None


def owned_temp(storage) -> tuple[BinaryIO, Path]:
    """A new temp file from the store, renamed after this process (the open file follows the rename)."""
    f, temp = storage.new_temp()
    pid = os.getpid()
    owned = temp.with_name(f"upload~{_host()}~{pid}~{_start_stamp(pid) or 0}~{temp.name}")
    try:
        os.rename(temp, owned)
    except OSError:
        f.close()
        temp.unlink(missing_ok=True)
        raise
    return f, owned


def _owner_alive(pid: int, start: int) -> bool:
    """Whether the process that named a temp file still runs: same pid, same start time (a reused pid has another),
    and not a zombie (a killed process whose parent died too may wait a while to be reaped, but writes nothing)."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        now = int(round(proc.create_time() * 100))
    except (psutil.Error, OSError):
        return False
    return abs(now - start) <= 1


def sweep_temp_files(storage, unowned_max_age_s: float = UNOWNED_TEMP_MAX_AGE_S) -> int:
    """Remove upload temp files whose writer is gone; returns how many were removed."""
    folder = getattr(storage, "tmp", None)
    if folder is None or not Path(folder).is_dir():
        return 0
    host, cutoff, removed = _host(), time.time() - unowned_max_age_s, 0
    for p in Path(folder).iterdir():
        m = _OWNED.match(p.name)
        try:
            if m and m["host"] == host:
                stale = not _owner_alive(int(m["pid"]), int(m["start"]))
            else:
                stale = p.stat().st_mtime <= cutoff
            if stale and p.is_file():
                p.unlink()
                removed += 1
        except FileNotFoundError:
            pass
    if removed:
        log.info("removed %d temp file(s) left by processes that died mid-upload", removed)
    return removed


class UnsupportedMediaType(DistilleryError):
    status_code = 415
    code = "unsupported_media_type"


class UploadAborted(DistilleryError):
    status_code = 400
    code = "upload_incomplete"


def _invalid_form(message: str, limit: str, value: int) -> Unprocessable:
    return Unprocessable(message, code="invalid_upload", detail={"limit": limit, "value": value})


class _InFlight:
    """Bytes of the uploads this API process is receiving, per quota key (database, owner)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._bytes: dict[Hashable, int] = {}

    def add(self, key: Hashable, n: int) -> int:
        """Count `n` more (or fewer) bytes for `key`; returns the key's in-flight bytes."""
        with self._lock:
            total = self._bytes.get(key, 0) + n
            if total:
                self._bytes[key] = total
            else:
                self._bytes.pop(key, None)
            return total

    def get(self, key: Hashable) -> int:
        with self._lock:
            return self._bytes.get(key, 0)


IN_FLIGHT = _InFlight()


class UploadQuota:
    """An owner's storage quota, applied while an upload streams in (app/models/service.upload_quota makes one).

    `begin` refuses an owner already at or over the quota before the body is read; `take` counts each block of the
    file against the quota together with the owner's other uploads in flight, and refuses (the upload is aborted,
    its temp file deleted) as soon as stored + in-flight bytes pass it; `release` uncounts the upload when it ends,
    however it ends.

    The in-flight count is per API process (a dict in this process): concurrent uploads of one owner to other API
    processes are not seen here. The check when the upload's row is inserted (models.service.check_quota, under
    the owner's lock) stays authoritative across processes; this one only stops an over-quota upload early.
    """

    def __init__(self, key: Hashable, limit: int, stored_bytes: Callable[[], int],
                 refuse: Callable[[int, int], DistilleryError]):
        self.key, self.limit = key, limit
        self._stored_bytes = stored_bytes  # what the owner stores now (a database query: run off the event loop)
        self._refuse = refuse  # (stored, in flight) -> the error to raise
        self.stored = 0
        self.held = 0

    async def begin(self) -> None:
        self.stored = await run_in_threadpool(self._stored_bytes)
        in_flight = IN_FLIGHT.get(self.key)
        if self.stored + in_flight >= self.limit:
            raise self._refuse(self.stored, in_flight)

    def take(self, n: int) -> None:
        self.held += n
        in_flight = IN_FLIGHT.add(self.key, n)
        if self.stored + in_flight > self.limit:
            raise self._refuse(self.stored, in_flight)

    def release(self) -> None:
        if self.held:
            IN_FLIGHT.add(self.key, -self.held)
            self.held = 0


@dataclass
class ReceivedUpload:
    temp_path: Path
    sha256: str
    size_bytes: int
    filename: str | None
    fields: dict[str, str] = field(default_factory=dict)


class _Receiver:
    def __init__(self, storage: LocalStorage, file_field: str, max_bytes: int, quota: UploadQuota | None = None):
        self.storage, self.file_field, self.max_bytes, self.quota = storage, file_field, max_bytes, quota
        self.fields: dict[str, str] = {}
        self.parts = 0
        self.text_bytes = 0
        self._header_count = 0
        self._header_bytes = 0
        self.file = None
        self.temp: Path | None = None
        self.hasher = hashlib.sha256()
        self.size = 0
        self.filename: str | None = None
        self.files_seen = 0
        self._headers: dict[bytes, bytes] = {}
        self._hname = b""
        self._hval = b""
        self._part: str | None = None
        self._text = bytearray()
        self.error: DistilleryError | None = None

    # python-multipart callbacks
    def on_part_begin(self):
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise _invalid_form(f"the form has more than {MAX_PARTS} parts (one '{self.file_field}' part and "
                                f"at most {MAX_PARTS - 1} text fields)", "parts", MAX_PARTS)
        self._headers, self._part, self._text = {}, None, bytearray()
        self._header_count = self._header_bytes = 0

    def _header_data(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > MAX_PART_HEADER_BYTES:
            raise _invalid_form(f"the headers of form part {self.parts} are longer than {MAX_PART_HEADER_BYTES} "
                                "bytes", "part_header_bytes", MAX_PART_HEADER_BYTES)

    def on_header_field(self, data, start, end):
        self._header_data(end - start)
        self._hname += data[start:end]

    def on_header_value(self, data, start, end):
        self._header_data(end - start)
        self._hval += data[start:end]

    def on_header_end(self):
        self._header_count += 1
        if self._header_count > MAX_PART_HEADERS:
            raise _invalid_form(f"form part {self.parts} has more than {MAX_PART_HEADERS} headers", "part_headers",
                                MAX_PART_HEADERS)
        self._headers[self._hname.lower()] = self._hval
        self._hname, self._hval = b"", b""

    def on_headers_finished(self):
        _, opts = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = opts.get(b"name", b"").decode("utf-8", "replace")
        self._part = name
        if name == self.file_field:
            self.files_seen += 1
            if self.files_seen > 1:
                raise Unprocessable(f"send exactly one '{self.file_field}' part", code="invalid_upload")
            fname = opts.get(b"filename")
            self.filename = fname.decode("utf-8", "replace")[:255] if fname else None
            self.file, self.temp = owned_temp(self.storage)

    def on_part_data(self, data, start, end):
        chunk = data[start:end]
        if self._part == self.file_field:
            self.size += len(chunk)
            if self.size > self.max_bytes:
                raise PayloadTooLarge(f"upload exceeds the limit of {self.max_bytes} bytes",
                                      detail={"limit_bytes": self.max_bytes})
            if self.quota is not None:
                self.quota.take(len(chunk))
            self.hasher.update(chunk)
            self.file.write(chunk)
        else:
            self._text += chunk
            self.text_bytes += len(chunk)
            if len(self._text) > MAX_TEXT_FIELD:
                raise Unprocessable(f"form field '{self._part}' is longer than {MAX_TEXT_FIELD} bytes",
                                    code="invalid_upload")
            if self.text_bytes > MAX_TEXT_BYTES:
                raise _invalid_form(f"the form's text fields are longer than {MAX_TEXT_BYTES} bytes together",
                                    "text_bytes", MAX_TEXT_BYTES)

    def on_part_end(self):
        if self._part != self.file_field and self._part:
            self.fields[self._part] = self._text.decode("utf-8", "replace")
        self._part = None

    def close(self):
        if self.file is not None and not self.file.closed:
            self.file.close()

    def discard(self):
        self.close()
        if self.temp is not None:
            self.temp.unlink(missing_ok=True)


async def receive_upload(request: Request, storage: LocalStorage, *, max_bytes: int, file_field: str = "file",
                         quota: UploadQuota | None = None) -> ReceivedUpload:
    ctype, opts = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data" or b"boundary" not in opts:
        raise UnsupportedMediaType(f"send multipart/form-data with a '{file_field}' part")
    body_limit = max_bytes + FORM_ALLOWANCE
    declared = request.headers.get("content-length")
    declared = int(declared) if declared and declared.isdigit() else None
    if declared is not None and declared > body_limit:
        raise PayloadTooLarge(f"upload of {declared} bytes exceeds the limit of {max_bytes} bytes",
                              detail={"limit_bytes": max_bytes, "content_length": declared})
    if quota is not None:
        await quota.begin()  # before the body is read
    rx = _Receiver(storage, file_field, max_bytes, quota)
    callbacks = {name: getattr(rx, name) for name in (
        "on_part_begin", "on_part_data", "on_part_end", "on_header_field", "on_header_value", "on_header_end",
        "on_headers_finished")}
    parser = MultipartParser(opts[b"boundary"], callbacks)
    read = 0
    try:
        async for chunk in request.stream():
            read += len(chunk)
            if read > body_limit:  # a chunked body has no Content-Length to refuse it early
                raise PayloadTooLarge(f"upload exceeds the limit of {max_bytes} bytes: the body passed {body_limit} "
                                      f"bytes ({FORM_ALLOWANCE} bytes allowed for the form around the file)",
                                      detail={"limit_bytes": max_bytes, "body_limit_bytes": body_limit})
            parser.write(chunk)
        parser.finalize()
        rx.close()
        if rx.temp is None:
            raise Unprocessable(f"the form has no '{file_field}' part", code="missing_file")
        if parser.state != MultipartState.END:
            raise UploadAborted("the multipart body ended before its closing boundary")
        return ReceivedUpload(rx.temp, rx.hasher.hexdigest(), rx.size, rx.filename, rx.fields)
    except ClientDisconnect:
        rx.discard()
        raise UploadAborted("the client disconnected before the upload finished")
    except MultipartParseError as exc:
        rx.discard()
        raise Unprocessable(f"malformed multipart body: {exc}", code="invalid_upload") from None
    except BaseException:
        rx.discard()
        raise
    finally:
        if quota is not None:
            quota.release()
