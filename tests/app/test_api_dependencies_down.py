"""When the database or the broker cannot be reached, the API says so with a 503, never a 500."""
from __future__ import annotations

from fastapi.testclient import TestClient

from app.core.config import Settings
from app.main import create_app


def test_readyz_and_requests_when_everything_is_down(tmp_path):
    settings = Settings(data_dir=tmp_path, database_url="postgresql+psycopg://postgres@127.0.0.1:1/none",
                        broker_url="redis://127.0.0.1:1/0", auth="open")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 503
        checks = ready.json()["error"]["detail"]["checks"]
        assert checks["database"].startswith("unavailable") and checks["broker"].startswith("unavailable")
        resp = client.get("/v1/jobs")
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "database_unavailable"
        assert resp.headers["retry-after"] == "2"


def test_job_stays_queued_when_the_broker_is_down(tmp_path):
    """The row is committed first; a failed send leaves it queued for the reaper to dispatch."""
    from tests.conftest import make_settings
    from tests.helpers import mlp_onnx_bytes

    settings = make_settings(tmp_path, "sqlite", "filesystem").model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        model = client.post("/v1/models", files={"file": ("m.onnx", mlp_onnx_bytes())}).json()
        resp = client.post("/v1/jobs", json={"kind": "quantize", "model_id": model["id"],
                                             "config": {"method": "dynamic_int8"}})
        assert resp.status_code == 202 and resp.json()["status"] == "queued"
    from app.core.db import Database
    from app.core.tables import JobRow

    db = Database(settings)
    with db.session() as session:
        row = session.get(JobRow, resp.json()["id"])
        assert row.status == "queued" and row.dispatched_at is None
    db.dispose()
