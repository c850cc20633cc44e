"""Model and dataset uploads through the HTTP API, on SQLite and PostgreSQL."""
from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest

from tests.helpers import digits_npz_bytes, mlp_onnx_bytes


def _error(resp, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and {"code", "message", "detail"} <= set(body["error"])
    if code:
        assert body["error"]["code"] == code, body
    return body["error"]


def upload_model(client, data: bytes, name: str | None = "mlp.onnx"):
    files = {"file": ("mlp.onnx", data, "application/octet-stream")}
    return client.post("/v1/models", files=files, data={"name": name} if name else None)


def test_upload_onnx_model_is_hashed_and_inspected(client, settings):
    data = mlp_onnx_bytes()
    resp = upload_model(client, data)
    assert resp.status_code == 201, resp.text
    m = resp.json()
    assert m["format"] == "onnx" and m["name"] == "mlp.onnx" and m["owner"] == "default"
    assert m["size_bytes"] == len(data) and m["sha256"] == hashlib.sha256(data).hexdigest()
    insp = m["inspection"]
    assert insp["status"] == "done"
    assert insp["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["N", 64]}]
    assert insp["outputs"] == [{"name": "logits", "dtype": "float32", "shape": ["N", 10]}]
    assert insp["params"] == 64 * 256 + 256 + 256 * 10 + 10
    # stored by content, no temp file left behind
    stored = settings.storage_dir / "objects" / m["sha256"][:2] / m["sha256"][2:]
    assert stored.read_bytes() == data
    assert list((settings.storage_dir / "tmp").iterdir()) == []
    assert client.get(f"/v1/models/{m['id']}").json() == m


def test_list_models_paginates_newest_first(client):
    ids = [upload_model(client, mlp_onnx_bytes(hidden=16 + i), name=f"m{i}").json()["id"] for i in range(3)]
    page1 = client.get("/v1/models", params={"limit": 2}).json()
    assert [m["id"] for m in page1["items"]] == ids[::-1][:2] and page1["next_cursor"]
    page2 = client.get("/v1/models", params={"limit": 2, "cursor": page1["next_cursor"]}).json()
    assert [m["id"] for m in page2["items"]] == [ids[0]] and page2["next_cursor"] is None


@pytest.mark.parametrize("payload,code", [
    (b"", "not_a_model"),
    (b"\x00\x01garbage" * 100, "not_a_model"),
    (b'{"json": true}', "not_a_model"),
])
def test_not_a_model_is_422_and_leaves_nothing(client, settings, payload, code):
    _error(upload_model(client, payload), 422, code)
    assert client.get("/v1/models").json()["items"] == []
    assert list((settings.storage_dir / "tmp").iterdir()) == []
    assert not any((settings.storage_dir / "objects").rglob("*.*")) and not any(
        p.is_file() for p in (settings.storage_dir / "objects").rglob("*"))


def test_oversized_upload_is_413(tmp_path):
    from fastapi.testclient import TestClient

    from app.main import create_app
    from tests.conftest import make_settings

    settings = make_settings(tmp_path, "sqlite", "filesystem", max_upload_bytes=1000)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        err = _error(upload_model(c, mlp_onnx_bytes()), 413, "payload_too_large")
        assert err["detail"]["limit_bytes"] == 1000
        assert list((settings.storage_dir / "tmp").iterdir()) == []


def test_upload_requires_multipart_with_file(client):
    _error(client.post("/v1/models", content=b"abc", headers={"content-type": "application/octet-stream"}), 415)
    _error(client.post("/v1/models", data={"name": "x"}, files={"other": ("a", b"1")}), 422, "missing_file")


def test_truncated_multipart_body_is_rejected(client, settings):
    body = (b"--BOUND\r\nContent-Disposition: form-data; name=\"file\"; filename=\"m.onnx\"\r\n\r\n"
            + mlp_onnx_bytes()[:5000])
    resp = client.post("/v1/models", content=body, headers={"content-type": "multipart/form-data; boundary=BOUND"})
    _error(resp, 400, "upload_incomplete")
    assert list((settings.storage_dir / "tmp").iterdir()) == []


def test_unknown_and_malformed_ids(client):
    _error(client.get("/v1/models/" + "0" * 32), 404, "model_not_found")
    _error(client.get("/v1/models/not-an-id"), 422, "validation_error")
    _error(client.delete("/v1/models/" + "a" * 32), 404, "model_not_found")
    _error(client.get("/v1/nothing-here"), 404, "not_found")


def test_delete_model(client, settings):
    m = upload_model(client, mlp_onnx_bytes()).json()
    assert client.delete(f"/v1/models/{m['id']}").status_code == 204
    _error(client.get(f"/v1/models/{m['id']}"), 404)
    assert not (settings.storage_dir / "objects" / m["sha256"][:2] / m["sha256"][2:]).exists()


def upload_dataset(client, data: bytes, name="digits.npz"):
    return client.post("/v1/datasets", files={"file": (name, data, "application/octet-stream")})


def test_upload_dataset(client):
    resp = upload_dataset(client, digits_npz_bytes())
    assert resp.status_code == 201, resp.text
    d = resp.json()
    assert d["inputs"] == ["x"] and d["has_labels"] and d["num_classes"] == 10
    assert d["n_samples"] == 1437 and d["n_test"] == 360 and d["split"] == "provided"
    assert d["arrays"]["x"] == {"shape": [1437, 64], "dtype": "float32"}
    assert client.get(f"/v1/datasets/{d['id']}").json() == d
    assert [i["id"] for i in client.get("/v1/datasets").json()["items"]] == [d["id"]]


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.mark.parametrize("arrays,needle", [
    ({"x": np.array([object(), object()], dtype=object)}, "dtype object"),
    ({"x": np.zeros((4, 2), np.float32), "y": np.zeros(3, np.int64)}, "different lengths"),
    ({"x": np.zeros((4, 2), np.float32), "y": np.zeros(4, np.float32)}, "integer"),
    ({"x": np.zeros((4, 2), np.float32), "y": -np.ones(4, np.int64)}, "negative"),
    ({"x": np.array(["a", "b"])}, "only numeric"),
    ({"y": np.zeros(4, np.int64)}, "no input arrays"),
    ({"x": np.zeros((4, 2), np.float32), "x_test": np.zeros((2, 3), np.float32)}, "sample shape"),
])
def test_bad_datasets_are_422(client, arrays, needle):
    err = _error(upload_dataset(client, _npz(**arrays)), 422)
    assert needle in err["message"], err


def test_not_an_npz(client):
    _error(upload_dataset(client, b"hello"), 422, "not_an_npz")


def test_a_temp_file_owner_is_alive_only_while_it_runs():
    """The start-up sweep keeps a live process's upload temp file and removes a dead one's, a zombie's included (a
    SIGKILLed uvicorn worker whose parent died too can stay unreaped for a while)."""
    import subprocess
    import time

    import psutil

    from app.core.uploads import _owner_alive, _start_stamp

    proc = subprocess.Popen(["sleep", "60"])
    try:
        stamp = _start_stamp(proc.pid)
        assert _owner_alive(proc.pid, stamp)
        assert not _owner_alive(proc.pid, stamp + 500)  # same pid, another start time: a reused pid
        proc.kill()  # not waited for: a zombie until reaped
        deadline = time.monotonic() + 10
        while psutil.Process(proc.pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the killed child never became a zombie"
        assert not _owner_alive(proc.pid, stamp)
    finally:
        proc.kill()
        proc.wait()
    assert not _owner_alive(proc.pid, stamp)  # reaped: gone
