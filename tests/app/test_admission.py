"""Memory-aware admission: a job whose model (and data) cannot fit the job memory limit is refused at submit time
with the numbers, on SQLite and PostgreSQL, against the API's setting or the limits live workers publish."""
from __future__ import annotations

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.core.db import Database, utcnow
from app.core.tables import WorkerRow
from app.main import create_app
from tests.app.test_api_uploads import upload_dataset, upload_model
from tests.conftest import make_settings
from tests.helpers import digits_npz_bytes, mlp_onnx_bytes

LIMIT = 512 * 1024


def weights_of(hidden: int) -> int:
    """max(file size, 4 bytes x parameters), as the estimate counts fp32 weights."""
    return max(len(mlp_onnx_bytes(hidden=hidden)), 4 * (64 * hidden + hidden + hidden * 10 + 10))


@pytest.fixture(params=["sqlite", "postgres"])
def small(request, tmp_path):
    """(client, settings) with a job memory limit of 512 KiB."""
    db = request.getfixturevalue("pg_url") if request.param == "postgres" else "sqlite"
    settings = make_settings(tmp_path, db, "filesystem", job_memory_limit_bytes=LIMIT)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client, settings


def submit(client, model_id, config, **extra):
    return client.post("/v1/jobs", json={"kind": extra.pop("kind", "quantize"), "model_id": model_id,
                                         "config": config, **extra})


def test_model_too_big_for_the_limit_is_refused_with_the_numbers(small):
    client, _ = small
    big = upload_model(client, mlp_onnx_bytes(hidden=1024)).json()
    resp = submit(client, big["id"], {"method": "dynamic_int8"})
    assert resp.status_code == 422, resp.text
    err = resp.json()["error"]
    weights = weights_of(1024)
    assert err["code"] == "insufficient_memory"
    assert err["detail"]["weights_bytes"] == weights and err["detail"]["factor"] == 3
    assert err["detail"]["estimate_bytes"] == 3 * weights and err["detail"]["limit_bytes"] == LIMIT
    assert err["detail"]["limit_source"] == "job_memory_limit_bytes" and err["detail"]["queue"] == "cpu"
    assert str(3 * weights) in err["message"] and str(LIMIT) in err["message"]
    assert client.get("/v1/jobs").json()["items"] == []  # nothing was queued

    small_model = upload_model(client, mlp_onnx_bytes(hidden=32)).json()
    ok = submit(client, small_model["id"], {"method": "dynamic_int8"})
    assert ok.status_code == 202, ok.text


def test_dataset_arrays_count_and_fine_tune_raises_the_factor(small):
    client, _ = small
    model = upload_model(client, mlp_onnx_bytes(hidden=128)).json()
    weights = weights_of(128)
    data = digits_npz_bytes()
    ds = upload_dataset(client, data).json()
    arrays = np.load(io.BytesIO(data))
    array_bytes = sum(arrays[k].nbytes for k in arrays.files)
    assert 3 * weights < LIMIT < 3 * weights + array_bytes
    assert submit(client, model["id"], {"method": "dynamic_int8"}).status_code == 202
    resp = submit(client, model["id"], {"method": "static_int8"}, dataset_id=ds["id"])
    assert resp.status_code == 422 and resp.json()["error"]["code"] == "insufficient_memory"
    assert resp.json()["error"]["detail"]["dataset_bytes"] == array_bytes
    assert resp.json()["error"]["detail"]["estimate_bytes"] == 3 * weights + array_bytes

    # prune: x3 without a fine-tune, x4 with one (gradients and optimizer state)
    mid = upload_model(client, mlp_onnx_bytes(hidden=512)).json()
    w = weights_of(512)
    buf = io.BytesIO()
    np.savez(buf, x=np.zeros((10, 64), np.float32), y=np.zeros(10, np.int64))
    tiny = upload_dataset(client, buf.getvalue(), name="tiny.npz").json()
    assert 3 * w + 10 * 64 * 4 + 80 < LIMIT < 4 * w
    prune = {"method": "magnitude", "sparsity": 0.5}
    assert submit(client, mid["id"], prune, kind="prune", dataset_id=tiny["id"]).status_code == 202
    tuned = submit(client, mid["id"], {**prune, "fine_tune": {"epochs": 1}}, kind="prune", dataset_id=tiny["id"])
    assert tuned.status_code == 422, tuned.text
    assert tuned.json()["error"]["detail"]["factor"] == 4
    assert tuned.json()["error"]["detail"]["estimate_bytes"] == 4 * w + 10 * 64 * 4 + 80

    # a built-in dataset counts at the float32 size the worker loads
    mnist = submit(client, model["id"], {"student": {"arch": "mlp", "hidden": [16]}}, kind="distill",
                   dataset_id="builtin:mnist")
    assert mnist.status_code == 422 and mnist.json()["error"]["detail"]["dataset_bytes"] == 70_000 * (784 * 4 + 8)


def test_the_limit_live_workers_publish_is_the_one_that_counts(small):
    client, settings = small
    big = upload_model(client, mlp_onnx_bytes(hidden=1024)).json()
    need = 3 * weights_of(1024)
    db = Database(settings)
    try:
        with db.session() as session:  # what a worker writes at start (worker/maintenance.register_worker)
            session.add(WorkerRow(name="big@test", queues="cpu", device="cpu",
                                  info={"job_memory_limit_bytes": 2 * need}, last_seen_at=utcnow()))
            session.add(WorkerRow(name="gpu@test", queues="gpu", device="cuda",
                                  info={"job_memory_limit_bytes": need // 2}, last_seen_at=utcnow()))
            session.commit()
        # the cpu workers allow twice what it needs, although this API process's own setting is smaller
        assert submit(client, big["id"], {"method": "dynamic_int8"}, device="cpu").status_code == 202
        # the only gpu worker allows half of it
        resp = submit(client, big["id"], {"method": "dynamic_int8"}, device="cuda")
        assert resp.status_code == 422, resp.text
        detail = resp.json()["error"]["detail"]
        assert detail["limit_bytes"] == need // 2 and detail["queue"] == "gpu"
        assert detail["limit_source"] == "the live gpu workers"
        with db.session() as session:  # a worker that stopped heartbeating no longer counts
            session.get(WorkerRow, "big@test").last_seen_at = utcnow().replace(year=2000)
            session.commit()
        late = submit(client, big["id"], {"method": "dynamic_int8"}, device="cpu")
        assert late.status_code == 422 and late.json()["error"]["detail"]["limit_source"] == "job_memory_limit_bytes"
    finally:
        db.dispose()
