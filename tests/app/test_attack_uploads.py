"""Denial-of-service uploads from the attack run, one test per finding, on SQLite and on PostgreSQL.

Each test builds the attack payload itself and asserts the fix by behaviour: the request is refused with the status
and code that name the problem, no temp file is left in the storage temp folder, no row is written, and where the
attack was about reading too much, the bytes the API pulled from the body stayed bounded.

Streamed bodies are sent straight to the ASGI app (in the TestClient's event loop, so its lifespan and services are
the real ones): the TestClient would join a generator body into one message before the app sees it, while here the
app pulls one chunk per `receive()` and every pulled byte is counted, as a server hands a chunked body over.

  3. many small text fields, chunked: the multipart parse is bounded (parts, text fields, part headers, body bytes);
  4. an .npz whose zip directory lists a huge number of entries: refused from its end record, before zipfile reads it;
 10. an .npz whose .npy header claims shape (10, 2**62, 4): its size is computed without int64 wrap-around;
  6. uploads by an owner at or over the storage quota: refused before the body is read; in-flight bytes count.
"""
from __future__ import annotations

import asyncio
import io
import itertools
import json
import struct
import tracemalloc
import zipfile
from collections.abc import AsyncIterator, Iterable

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.core.tables import DatasetRow, ModelRow
from app.core.uploads import FORM_ALLOWANCE, MAX_PARTS, MAX_TEXT_BYTES, MAX_TEXT_FIELD
from app.datasets.validate import MAX_ARRAYS, MAX_DIRECTORY_BYTES, validate_npz
from app.main import create_app

LIMIT = 1024 * 1024  # DISTILLERY_MAX_UPLOAD_BYTES of these tests
QUOTA = 1024 * 1024  # DISTILLERY_MAX_STORAGE_BYTES_PER_OWNER
ARRAY_LIMIT = 64 * 1024 * 1024  # DISTILLERY_MAX_DATASET_ARRAY_BYTES
CHUNK = 16 * 1024  # bytes per ASGI message of a streamed body
BOUNDARY = "attackboundary"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


@pytest.fixture
def api(settings):
    """The app on each database (the `settings` fixture), with small upload, quota and array limits."""
    limited = settings.model_copy(update={"max_upload_bytes": LIMIT, "max_storage_bytes_per_owner": QUOTA,
                                          "max_dataset_array_bytes": ARRAY_LIMIT})
    with TestClient(create_app(limited), raise_server_exceptions=False) as client:
        yield limited, client


@pytest.fixture
def roomy(settings):
    """The app on each database with room for a large archive (64 MiB uploads), for the zip-directory attacks."""
    roomy = settings.model_copy(update={"max_upload_bytes": 64 * 1024 * 1024, "max_dataset_array_bytes": ARRAY_LIMIT})
    with TestClient(create_app(roomy), raise_server_exceptions=False) as client:
        yield roomy, client


# --------------------------------------------------------------------------- helpers


class Body:
    """A streamed request body: chunks handed to the app one per receive(), counting the bytes it pulled."""

    def __init__(self, chunks: Iterable[bytes] | AsyncIterator[bytes]):
        self.chunks = chunks
        self.pulled = 0

    async def __aiter__(self):
        if hasattr(self.chunks, "__aiter__"):
            async for chunk in self.chunks:
                yield chunk
        else:
            for chunk in self.chunks:
                yield chunk


async def asgi_post(app, path: str, body: Body, content_type: str = CONTENT_TYPE) -> tuple[int, dict]:
    """POST `body` to the ASGI app as a chunked request (no Content-Length); returns (status, JSON body)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "state": {},
             "headers": [(b"host", b"testserver"), (b"content-type", content_type.encode()),
                         (b"transfer-encoding", b"chunked")],
             "client": ("127.0.0.1", 50000), "server": ("testserver", 80)}
    chunks = body.__aiter__()
    finished = False
    status, parts = None, []

    async def receive():
        nonlocal finished
        if not finished:
            try:
                chunk = await chunks.__anext__()
            except StopAsyncIteration:
                finished = True
                return {"type": "http.request", "body": b"", "more_body": False}
            body.pulled += len(chunk)
            return {"type": "http.request", "body": chunk, "more_body": True}
        return {"type": "http.disconnect"}

    async def send(message):
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            parts.append(message.get("body", b""))

    await app(scope, receive, send)
    return status, json.loads(b"".join(parts) or b"null")


def post_streamed(client, path: str, body: Body, content_type: str = CONTENT_TYPE) -> tuple[int, dict]:
    return client.portal.call(asgi_post, client.app, path, body, content_type)


def rechunk(pieces: Iterable[bytes], size: int = CHUNK) -> Iterable[bytes]:
    """Regroup a lazy stream of pieces into chunks of about `size` bytes (nothing is built ahead)."""
    buf = bytearray()
    for piece in pieces:
        buf += piece
        while len(buf) >= size:
            yield bytes(buf[:size])
            del buf[:size]
    if buf:
        yield bytes(buf)


def part_head(name: str, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()


def file_part(data: bytes, filename: str = "d.npz") -> bytes:
    return part_head("file", filename) + data + b"\r\n"


CLOSE = f"--{BOUNDARY}--\r\n".encode()


def npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def assert_error(status: int, body: dict, want_status: int, code: str, needle: str) -> dict:
    assert status == want_status, body
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "detail"}, body
    error = body["error"]
    assert error["code"] == code, error
    assert needle.lower() in error["message"].lower(), error
    return error


def temp_files(settings) -> list:
    folder = settings.storage_dir / "tmp"
    return sorted(folder.iterdir()) if folder.is_dir() else []


def rows(client) -> dict[str, int]:
    with client.app.state.services.db.session() as session:
        return {t.__tablename__: session.scalar(select(func.count()).select_from(t)) for t in (ModelRow, DatasetRow)}


def assert_nothing_left(settings, client, rows_before: dict[str, int]) -> None:
    assert temp_files(settings) == []
    assert rows(client) == rows_before
    assert client.get("/healthz").status_code == 200


# --------------------------------------------------------------------------- 3. the multipart parse is bounded


def many_text_fields(count: int = 25_000_000) -> Iterable[bytes]:
    """The attack: small text fields, each under the per-field bound (400 MiB of them); no file part, no end."""
    for i in range(count):
        yield part_head(f"f{i}") + b"v" * 8 + b"\r\n"


def test_many_small_text_fields_stop_at_the_part_bound(api):
    settings, client = api
    before = rows(client)
    body = Body(rechunk(many_text_fields()))
    error = assert_error(*post_streamed(client, "/v1/datasets", body), 422, "invalid_upload",
                         f"more than {MAX_PARTS} parts")
    assert error["detail"] == {"limit": "parts", "value": MAX_PARTS}
    assert body.pulled <= 2 * CHUNK, body.pulled  # refused at part 9, some 600 bytes in: not 400 MiB later
    assert_nothing_left(settings, client, before)


def test_text_fields_are_bounded_together(api):
    settings, client = api
    before = rows(client)
    field = b"t" * (MAX_TEXT_FIELD - 1)  # each field is under its own bound; together they pass MAX_TEXT_BYTES
    count = MAX_TEXT_BYTES // len(field) + 1
    assert count < MAX_PARTS
    pieces = [part_head(f"t{i}") + field + b"\r\n" for i in range(count)]
    body = Body(rechunk([*pieces, file_part(npz(x=np.zeros((4, 2), np.float32))), CLOSE]))
    error = assert_error(*post_streamed(client, "/v1/datasets", body), 422, "invalid_upload", "text fields")
    assert error["detail"] == {"limit": "text_bytes", "value": MAX_TEXT_BYTES}
    assert_nothing_left(settings, client, before)


def endless(piece: bytes) -> Iterable[bytes]:
    while True:
        yield piece


@pytest.mark.parametrize("attack", ["long_header_value", "many_headers"])
def test_part_headers_are_bounded(api, attack):
    settings, client = api
    before = rows(client)
    head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="d.npz"\r\n'.encode()
    if attack == "long_header_value":
        pieces = itertools.chain([head, b"X-Pad: "], endless(b"p" * 1024))
    else:
        pieces = itertools.chain([head], (f"X-Pad-{i}: p\r\n".encode() for i in itertools.count()))
    body = Body(rechunk(pieces))
    assert_error(*post_streamed(client, "/v1/datasets", body), 422, "invalid_upload", "header")
    assert body.pulled <= 2 * CHUNK, body.pulled
    assert_nothing_left(settings, client, before)


def test_body_bytes_are_bounded_without_content_length(api):
    """A valid form, then an endless epilogue after the closing boundary (the parser skips it): the body is cut off
    past max_upload_bytes + FORM_ALLOWANCE."""
    settings, client = api
    before = rows(client)
    form = [part_head("name") + b"d\r\n", file_part(npz(x=np.zeros((4, 2), np.float32))), CLOSE]
    body = Body(rechunk(itertools.chain(form, endless(b"e" * 1024))))
    error = assert_error(*post_streamed(client, "/v1/datasets", body), 413, "payload_too_large", "exceeds the limit")
    assert error["detail"] == {"limit_bytes": LIMIT, "body_limit_bytes": LIMIT + FORM_ALLOWANCE}
    assert LIMIT + FORM_ALLOWANCE < body.pulled <= LIMIT + FORM_ALLOWANCE + CHUNK
    assert_nothing_left(settings, client, before)


def test_a_full_form_at_the_limits_is_accepted(api):
    """The bounds leave room for a real form: a file of max_upload_bytes with the text fields a client sends."""
    settings, client = api
    data = npz(x=np.zeros((LIMIT // 8 - 64, 2), np.float32))
    assert LIMIT - 4096 < len(data) <= LIMIT
    body = Body(rechunk([part_head("name") + b"n" * 255 + b"\r\n", part_head("note") + b"z" * MAX_TEXT_FIELD
                         + b"\r\n", file_part(data), CLOSE]))
    status, out = post_streamed(client, "/v1/datasets", body)
    assert status == 201, out
    assert out["size_bytes"] == len(data) and out["name"] == "n" * 255
    assert temp_files(settings) == []


# --------------------------------------------------------------------------- 4. a huge zip directory


def huge_directory_zip(entries: int, declared: int | None = None, zip64: bool = True) -> bytes:
    """A zip of one empty member whose central directory lists it `entries` times (51 bytes each). The end record
    declares `declared` entries (default: the truth); zip64 end records as a million-entry archive needs."""
    name = b"x.npy"
    local = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 0, 0, 0x21, 0, 0, 0, len(name), 0) + name
    central = struct.pack("<4s4B4H3L5H2L", b"PK\x01\x02", 20, 3, 20, 0, 0, 0, 0, 0x21, 0, 0, 0, len(name), 0, 0, 0,
                          0, 0, 0) + name
    directory = central * entries
    declared = entries if declared is None else declared
    offset, size = len(local), len(directory)
    if not zip64:
        end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, declared, declared, size, offset, 0)
        return local + directory + end
    end64_at = offset + size
    end64 = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, declared, declared, size, offset)
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, end64_at, 1)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    return local + directory + end64 + locator + end


@pytest.mark.parametrize("shape", ["zip64_200k_entries", "60k_entries", "entry_count_lies"])
def test_npz_with_a_huge_zip_directory_is_refused_from_its_end_record(roomy, shape):
    settings, client = roomy
    entries, declared, zip64 = {"zip64_200k_entries": (200_000, None, True), "60k_entries": (60_000, None, False),
                                "entry_count_lies": (60_000, 1, False)}[shape]
    data = huge_directory_zip(entries, declared, zip64)
    assert len(zipfile.ZipFile(io.BytesIO(data)).infolist()) == entries  # a real archive: zipfile would parse it all
    before = rows(client)
    resp = client.post("/v1/datasets", files={"file": ("dir.npz", data, "application/octet-stream")})
    error = assert_error(resp.status_code, resp.json(), 422, "invalid_dataset", "zip directory lists")
    assert error["detail"] == {"entries": entries if declared is None else declared, "directory_bytes": 51 * entries,
                               "limit_entries": MAX_ARRAYS, "limit_directory_bytes": MAX_DIRECTORY_BYTES}
    assert_nothing_left(settings, client, before)


def test_huge_zip_directory_is_refused_without_reading_it(tmp_path):
    """validate_npz reads the end record only: its memory stays far below the 10 MB directory (zipfile would hold
    the directory and 200,000 ZipInfo objects, over 100 MB)."""
    from app.datasets.validate import DatasetRejected

    path = tmp_path / "dir.npz"
    path.write_bytes(huge_directory_zip(200_000))
    tracemalloc.start()
    try:
        with pytest.raises(DatasetRejected) as refused:
            validate_npz(path, ARRAY_LIMIT)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert refused.value.code == "invalid_dataset" and refused.value.detail["entries"] == 200_000
    assert peak < 256 * 1024, peak


def test_model_zip_with_a_huge_directory_is_refused(roomy):
    """The model inspector shares the end-record check (app/core/zipdir.py)."""
    settings, client = roomy
    before = rows(client)
    data = huge_directory_zip(120_000)  # 6 MB of directory, over the inspector's 4 MiB
    resp = client.post("/v1/models", files={"file": ("m.pt", data, "application/octet-stream")})
    assert_error(resp.status_code, resp.json(), 422, "model_too_complex", "too many entries")
    assert_nothing_left(settings, client, before)


# --------------------------------------------------------------------------- 10. .npy shapes past int64


def npy_header_only(shape: tuple, descr: str = "<f4") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def npz_members(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buf.getvalue()


@pytest.mark.parametrize("shape,code,needle", [
    ((10, 2**62, 4), "dataset_too_large", "over the limit"),  # int64 product: 10 * 2**62 * 4 * 4 wraps to 0
    ((2**64 + 10, 4), "dataset_too_large", "over the limit"),  # past int64 altogether
    ((10, 2**62, 0), "dataset_too_large", "a dimension over the limit"),  # 0 bytes, an absurd axis
    ((-10, 4), "invalid_dataset", "non-negative integers"),
    ((10, -2**62, -4), "invalid_dataset", "non-negative integers"),  # negative dims whose product is positive
    ((True, 4), "invalid_dataset", "non-negative integers"),
    ((1,) * 40, "invalid_dataset", "dimensions"),
])
def test_npy_header_with_an_absurd_shape_is_422(api, shape, code, needle):
    settings, client = api
    data = npz_members({"x.npy": npy_header_only(shape), "y.npy": npy_header_only((10,), "<i8") + bytes(80)})
    assert len(data) < 1024
    before = rows(client)
    resp = client.post("/v1/datasets", files={"file": ("shape.npz", data, "application/octet-stream")})
    error = assert_error(resp.status_code, resp.json(), 422, code, needle)
    assert "'x'" in error["message"]
    if code == "dataset_too_large":
        assert error["detail"] == {"limit_bytes": ARRAY_LIMIT, "array": "x"}
    assert_nothing_left(settings, client, before)


def test_npy_shape_within_the_limit_is_still_checked_against_its_data(api):
    """The checked arithmetic keeps the stored-size check: a header whose (honest) size the member does not hold."""
    settings, client = api
    data = npz_members({"x.npy": npy_header_only((1000, 4)) + bytes(16)})
    resp = client.post("/v1/datasets", files={"file": ("short.npz", data, "application/octet-stream")})
    assert_error(resp.status_code, resp.json(), 422, "invalid_dataset", "does not match its stored size")


# --------------------------------------------------------------------------- 6. the storage quota while uploading


def fill_quota(client, size: int = QUOTA) -> None:
    """The owner already stores `size` bytes (a dataset row, as if the quota was lowered after it was stored)."""
    with client.app.state.services.db.session() as session:
        session.add(DatasetRow(owner="default", name="stored", size_bytes=size, sha256="0" * 64, info={}))
        session.commit()


def file_stream(total: int) -> Iterable[bytes]:
    """A file part of `total` bytes (lazy), as an upload of that size."""
    yield part_head("file", "big.npz")
    yield from rechunk(endless_bytes(total))
    yield b"\r\n" + CLOSE


def endless_bytes(total: int) -> Iterable[bytes]:
    block = b"\x00" * CHUNK
    for _ in range(total // CHUNK):
        yield block


def test_owner_over_quota_is_refused_before_the_body_is_read(api):
    """The attack: 20 parallel 100 MB uploads by an owner already over the quota. Each is a 413 before one byte of
    its body is pulled, and no temp file is made."""
    settings, client = api
    fill_quota(client, QUOTA + 1)
    before = rows(client)
    bodies = [Body(file_stream(100 * 1024 * 1024)) for _ in range(20)]

    async def parallel():
        return await asyncio.gather(*(asgi_post(client.app, "/v1/models", b) for b in bodies))

    for status, out in client.portal.call(parallel):
        error = assert_error(status, out, 413, "storage_limit", "at or over the limit")
        assert error["detail"] == {"limit": "max_storage_bytes_per_owner", "value": QUOTA, "used": QUOTA + 1,
                                   "in_flight": 0}
    assert [b.pulled for b in bodies] == [0] * 20
    assert_nothing_left(settings, client, before)
    # with a Content-Length too, and for datasets; exactly at the quota counts as full
    with client.app.state.services.db.session() as session:
        session.query(DatasetRow).update({DatasetRow.size_bytes: QUOTA})
        session.commit()
    resp = client.post("/v1/datasets", files={"file": ("d.npz", npz(x=np.zeros((4, 2), np.float32)))})
    assert_error(resp.status_code, resp.json(), 413, "storage_limit", "at or over the limit")
    assert_nothing_left(settings, client, before)


def test_in_flight_uploads_count_against_the_quota(api):
    """Upload A is held mid-stream; upload B of the same owner passes the quota with A's in-flight bytes and is
    aborted (its temp file deleted) as soon as it does; A then completes; the in-flight count is released."""
    settings, client = api
    before = rows(client)
    data = npz(x=np.zeros((10240, 16), np.float32))  # 640 KiB: one fits the 1 MiB quota, two do not
    stream = b"".join([part_head("name") + b"a\r\n", file_part(data), CLOSE])
    held_at = 512 * 1024

    async def scenario():
        a_held, a_resume = asyncio.Event(), asyncio.Event()

        async def a_chunks():
            for i in range(0, len(stream), CHUNK):
                if i == held_at:  # every chunk before this one has been parsed: the app asked for the next
                    a_held.set()
                    await a_resume.wait()
                yield stream[i:i + CHUNK]

        a_body, b_body = Body(a_chunks()), Body(rechunk([stream]))
        a = asyncio.ensure_future(asgi_post(client.app, "/v1/datasets", a_body))
        try:
            await a_held.wait()
            in_flight_a = temp_files(settings)
            b = await asgi_post(client.app, "/v1/datasets", b_body)
            left_during_a = temp_files(settings)
        finally:
            a_resume.set()
        return await a, b, b_body.pulled, in_flight_a, left_during_a

    (a_status, a_out), (b_status, b_out), b_pulled, in_flight_a, left_during_a = client.portal.call(scenario)
    error = assert_error(b_status, b_out, 413, "storage_limit", "is uploading")
    in_flight_a_bytes = held_at - len(part_head("name") + b"a\r\n" + part_head("file", "d.npz"))
    assert error["detail"]["used"] == 0 and error["detail"]["value"] == QUOTA
    assert QUOTA < error["detail"]["in_flight"] <= QUOTA + CHUNK
    needed = QUOTA - in_flight_a_bytes  # B's file bytes that pass the quota with A's
    assert needed < b_pulled <= needed + 2 * CHUNK and b_pulled < len(stream)  # stopped as soon as it passed
    assert len(in_flight_a) == 1 and left_during_a == in_flight_a  # B's temp file was deleted, A's kept
    assert a_status == 201, a_out
    assert a_out["size_bytes"] == len(data)
    assert temp_files(settings) == []
    # A is stored now (640 KiB) and nothing is in flight: a small upload fits, another 640 KiB is cut off mid-file
    small = client.post("/v1/datasets", files={"file": ("s.npz", npz(x=np.zeros((4, 2), np.float32)))})
    assert small.status_code == 201, small.text
    c_body = Body(rechunk([stream]))
    error = assert_error(*post_streamed(client, "/v1/datasets", c_body), 413, "storage_limit", "is uploading")
    assert error["detail"]["used"] == len(data) + small.json()["size_bytes"]
    assert c_body.pulled < len(stream)
    assert temp_files(settings) == []
    assert rows(client) == {**before, "datasets": before["datasets"] + 2}
