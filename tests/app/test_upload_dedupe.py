"""Upload dedupe: a model or dataset whose content (sha256) the same owner already holds answers 200 with the existing
record and `X-Distillery-Existing: true` (no new row, no second quota charge); `?sha256=` filters the lists. On
SQLite and PostgreSQL."""
from __future__ import annotations

import hashlib
import io
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, text

from app.auth.keys import create_key
from app.core import db as core_db
from app.core.db import Database, owner_limit_lock
from app.core.tables import DatasetRow, ModelRow
from app.main import create_app
from app.models.repository import stored_bytes
from tests.app.test_api_uploads import _error, upload_dataset, upload_model
from tests.conftest import make_settings
from tests.helpers import digits_npz_bytes, mlp_onnx_bytes

EXISTING = "X-Distillery-Existing"


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _count(settings, table, **where) -> int:
    db = Database(settings)
    try:
        with db.session() as s:
            stmt = select(func.count()).select_from(table)
            for column, value in where.items():
                stmt = stmt.where(getattr(table, column) == value)
            return s.scalar(stmt)
    finally:
        db.dispose()


def _temp_files(settings) -> list:
    return list((settings.storage_dir / "tmp").iterdir())


def test_a_repeated_model_upload_answers_the_existing_model(client, settings):
    data = mlp_onnx_bytes()
    first = client.post("/v1/models", files={"file": ("a.onnx", data)},
                        data={"name": "first", "labels": '{"run": "1"}'})
    assert first.status_code == 201, first.text
    assert EXISTING not in first.headers
    model = first.json()

    # ten CLI runs of the same file: one model; another name and other labels change nothing (the record is kept)
    for i in range(3):
        again = client.post("/v1/models", files={"file": ("b.onnx", data)},
                            data={"name": f"again-{i}", "labels": '{"run": "2"}'})
        assert again.status_code == 200, again.text
        assert again.headers[EXISTING] == "true"
        assert again.json() == model
    assert model["name"] == "first" and model["labels"] == {"run": "1"}
    assert [m["id"] for m in client.get("/v1/models").json()["items"]] == [model["id"]]
    assert _count(settings, ModelRow) == 1
    assert _temp_files(settings) == []  # the repeat's temp file is gone
    stored = settings.storage_dir / "objects" / model["sha256"][:2] / model["sha256"][2:]
    assert stored.read_bytes() == data

    # a repeat is still checked like any upload: a bad label is a 422, not the existing model
    _error(client.post("/v1/models", files={"file": ("b.onnx", data)}, data={"labels": '{"BAD KEY": "x"}'}), 422,
           "invalid_label")
    assert _temp_files(settings) == []


def test_a_repeated_dataset_upload_answers_the_existing_dataset(client, settings):
    data = digits_npz_bytes()
    first = upload_dataset(client, data, name="digits.npz")
    assert first.status_code == 201 and EXISTING not in first.headers
    again = upload_dataset(client, data, name="other-name.npz")
    assert again.status_code == 200 and again.headers[EXISTING] == "true"
    assert again.json() == first.json() and again.json()["name"] == "digits.npz"
    other = upload_dataset(client, _npz(x=np.zeros((4, 2), np.float32)))
    assert other.status_code == 201 and other.json()["id"] != first.json()["id"]
    assert _count(settings, DatasetRow) == 2
    assert _temp_files(settings) == []


def test_sha256_filters_the_lists(client):
    a, b = mlp_onnx_bytes(hidden=16), mlp_onnx_bytes(hidden=24)
    ma, mb = upload_model(client, a).json(), upload_model(client, b).json()
    digest = hashlib.sha256(a).hexdigest()
    assert [m["id"] for m in client.get("/v1/models", params={"sha256": digest}).json()["items"]] == [ma["id"]]
    upper = client.get("/v1/models", params={"sha256": digest.upper()}).json()["items"]
    assert [m["id"] for m in upper] == [ma["id"]]
    assert client.get("/v1/models", params={"sha256": "0" * 64}).json()["items"] == []
    assert len(client.get("/v1/models").json()["items"]) == 2 and mb["id"] != ma["id"]

    data = digits_npz_bytes()
    ds = upload_dataset(client, data).json()
    found = client.get("/v1/datasets", params={"sha256": hashlib.sha256(data).hexdigest()}).json()["items"]
    assert [d["id"] for d in found] == [ds["id"]]
    assert client.get("/v1/datasets", params={"sha256": digest}).json()["items"] == []

    for path in ("/v1/models", "/v1/datasets"):
        for bad in ("abc", "g" * 64, "0" * 63, "0" * 65, digest + " "):
            err = _error(client.get(path, params={"sha256": bad}), 422, "validation_error")
            assert err["detail"]["errors"][0]["field"] == "query.sha256", err
            assert "sha256" in err["message"]


def test_a_deleted_model_is_uploaded_anew(client, settings):
    data = mlp_onnx_bytes()
    first = upload_model(client, data).json()
    assert client.delete(f"/v1/models/{first['id']}").status_code == 204
    again = upload_model(client, data)
    assert again.status_code == 201 and EXISTING not in again.headers
    assert again.json()["id"] != first["id"]
    assert client.get("/v1/models", params={"sha256": first["sha256"]}).json()["items"] == [again.json()]
    stored = settings.storage_dir / "objects" / first["sha256"][:2] / first["sha256"][2:]
    assert stored.read_bytes() == data  # stored again after the delete removed it


def test_a_model_of_the_same_content_in_another_format_is_not_a_repeat(client, settings):
    """Same bytes, another recorded format (a row written by an older inspector): the upload makes its own model."""
    data = mlp_onnx_bytes()
    db = Database(settings)
    try:
        with db.session() as s:
            s.add(ModelRow(owner="default", name="old", format="torchscript", size_bytes=len(data),
                           sha256=hashlib.sha256(data).hexdigest(), info={}))
            s.commit()
    finally:
        db.dispose()
    resp = upload_model(client, data)
    assert resp.status_code == 201 and resp.json()["format"] == "onnx"


def test_duplicates_from_before_answer_the_oldest(client, settings):
    """A database may hold duplicates made before dedupe existed: a repeat answers the oldest of them."""
    data = mlp_onnx_bytes()
    oldest = upload_model(client, data, name="oldest").json()
    db = Database(settings)
    try:
        with db.session() as s:  # what ten runs of an older server left behind
            s.add(ModelRow(owner="default", name="newer", format="onnx", size_bytes=len(data),
                           sha256=oldest["sha256"], info={}))
            s.commit()
    finally:
        db.dispose()
    again = upload_model(client, data, name="again")
    assert again.status_code == 200 and again.json()["id"] == oldest["id"]


@pytest.fixture
def owners(settings):
    """Keys for alice and bob (authentication required)."""
    settings = settings.model_copy(update={"auth": "required", "auth_cache_s": 0.0})
    db = Database(settings)
    with db.session() as s:
        headers = {o: {"Authorization": f"Bearer {create_key(s, o)[1]}"} for o in ("alice", "bob")}
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c, headers
    db.dispose()


def test_owners_never_share_records(owners):
    client, h = owners
    data, npz = mlp_onnx_bytes(), digits_npz_bytes()
    alice = client.post("/v1/models", files={"file": ("m.onnx", data)}, headers=h["alice"])
    bob = client.post("/v1/models", files={"file": ("m.onnx", data)}, headers=h["bob"])
    assert alice.status_code == bob.status_code == 201
    assert alice.json()["id"] != bob.json()["id"] and bob.json()["owner"] == "bob"
    again = client.post("/v1/models", files={"file": ("m.onnx", data)}, headers=h["bob"])
    assert again.status_code == 200 and again.json()["id"] == bob.json()["id"]
    digest = alice.json()["sha256"]
    for who in ("alice", "bob"):
        found = client.get("/v1/models", params={"sha256": digest}, headers=h[who]).json()["items"]
        assert [m["owner"] for m in found] == [who]

    da = client.post("/v1/datasets", files={"file": ("d.npz", npz)}, headers=h["alice"])
    db_ = client.post("/v1/datasets", files={"file": ("d.npz", npz)}, headers=h["bob"])
    assert da.status_code == db_.status_code == 201 and da.json()["id"] != db_.json()["id"]
    found = client.get("/v1/datasets", params={"sha256": da.json()["sha256"]}, headers=h["bob"]).json()["items"]
    assert [d["id"] for d in found] == [db_.json()["id"]]


@pytest.fixture(params=["sqlite", "postgres"])
def quota_client(request, tmp_path):
    """(client, settings, size of model a, size of model b) with a storage quota of exactly a + b."""
    a, b = mlp_onnx_bytes(hidden=32), mlp_onnx_bytes(hidden=64)
    db = request.getfixturevalue("pg_url") if request.param == "postgres" else "sqlite"
    settings = make_settings(tmp_path, db, "filesystem", max_storage_bytes_per_owner=len(a) + len(b))
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client, settings, a, b


def test_a_repeat_is_not_counted_against_the_quota(quota_client):
    client, settings, a, b = quota_client
    assert len(b) >= len(a)  # so the repeat of a streams within the quota (stored a + in flight a <= a + b)
    first = upload_model(client, a)
    assert first.status_code == 201
    assert upload_model(client, a).status_code == 200
    assert upload_model(client, a).status_code == 200
    second = upload_model(client, b)  # would pass the quota had a repeat been stored and counted again
    assert second.status_code == 201, second.text
    db = Database(settings)
    try:
        with db.session() as s:
            assert stored_bytes(s, "default") == len(a) + len(b) == settings.max_storage_bytes_per_owner
    finally:
        db.dispose()
    _error(upload_model(client, mlp_onnx_bytes(hidden=8)), 413, "storage_limit")  # the quota still holds
    assert _temp_files(settings) == []


class _CountingLock:
    """Stands in for the in-process SQLite owner lock: the same lock, which also counts the threads waiting on it."""

    def __init__(self):
        self.lock = threading.Lock()
        self.changed = threading.Condition()
        self.waiting = 0

    def __enter__(self):
        with self.changed:
            self.waiting += 1
            self.changed.notify_all()
        self.lock.acquire()
        with self.changed:
            self.waiting -= 1
        return self

    def __exit__(self, *exc):
        self.lock.release()


def _pg_waiting_advisory_locks(session) -> int:
    return session.scalar(text(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
        "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"))


def test_concurrent_identical_uploads_make_one_row(client, settings):
    """Two uploads of one content that both find no model (the first is not committed yet) meet at the owner's
    storage lock: the one that takes it second finds the first's row there and answers it."""
    data = mlp_onnx_bytes()
    results: list = []

    def upload():
        results.append(upload_model(client, data))

    db = Database(settings)
    threads = [threading.Thread(target=upload) for _ in range(2)]
    try:
        with db.session() as session:
            if settings.is_sqlite:
                counting = _CountingLock()
                core_db._sqlite_owner_locks["storage:default"] = counting
                counting.lock.acquire()  # held by the test: both uploads stop at the lock, after their checks
                try:
                    for t in threads:
                        t.start()
                    with counting.changed:
                        assert counting.changed.wait_for(lambda: counting.waiting == 2, timeout=60)
                finally:
                    counting.lock.release()
            else:
                with owner_limit_lock(session, "default", "storage"):  # a transaction-scoped advisory lock
                    for t in threads:
                        t.start()
                    deadline = time.monotonic() + 60
                    with db.engine.connect() as probe:
                        while _pg_waiting_advisory_locks(probe) < 2:
                            assert time.monotonic() < deadline, "the uploads never reached the owner's lock"
                            time.sleep(0.02)
                session.rollback()  # releases the lock
        for t in threads:
            t.join(timeout=120)
    finally:
        core_db._sqlite_owner_locks.pop("storage:default", None)
        db.dispose()
    assert sorted(r.status_code for r in results) == [200, 201], [r.text for r in results]
    assert results[0].json()["id"] == results[1].json()["id"]
    assert [r.headers.get(EXISTING) for r in sorted(results, key=lambda r: r.status_code)] == ["true", None]
    assert _count(settings, ModelRow) == 1
    assert _temp_files(settings) == []
