"""API keys, owner isolation and per-owner limits, on SQLite and PostgreSQL."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app.auth.keys import create_key, revoke_key
from app.core.db import Database
from app.main import create_app
from tests.app.test_api_uploads import _error, upload_model
from tests.conftest import make_settings
from tests.helpers import mlp_onnx_bytes


@pytest.fixture
def secured(settings):
    """The same stack with authentication required, and keys for alice, bob and an admin."""
    settings = settings.model_copy(update={"auth": "required", "auth_cache_s": 0.0})
    db = Database(settings)
    keys = {}
    with db.session() as s:
        for owner, admin in (("alice", False), ("bob", False), ("ops", True)):
            keys[owner] = create_key(s, owner, admin=admin)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c, {o: {"Authorization": f"Bearer {k}"} for o, (_, k) in keys.items()}, keys, db
    db.dispose()


def test_keys_are_required_and_checked(secured):
    client, headers, _, _ = secured
    err = _error(client.get("/v1/models"), 401, "unauthorized")
    assert "Bearer" in err["message"]
    _error(client.get("/v1/models", headers={"Authorization": "Bearer dk_0123456789abcdef.nope-nope-nope-nope-nope"}), 401)
    _error(client.get("/v1/models", headers={"Authorization": "Basic abc"}), 401)
    assert client.get("/v1/models", headers=headers["alice"]).status_code == 200
    assert client.get("/healthz").status_code == 200  # probes stay open


def test_owners_are_isolated_and_admin_sees_all(secured):
    client, h, _, _ = secured
    client.headers.update(h["alice"])
    model = upload_model(client, mlp_onnx_bytes()).json()
    assert model["owner"] == "alice"
    job = client.post("/v1/jobs", json={"kind": "quantize", "model_id": model["id"],
                                        "config": {"method": "dynamic_int8"}}).json()
    client.headers.update(h["bob"])
    for path in (f"/v1/models/{model['id']}", f"/v1/jobs/{job['id']}", f"/v1/jobs/{job['id']}/events"):
        _error(client.get(path), 404)  # 404, not 403: ids leak nothing
    _error(client.post(f"/v1/jobs/{job['id']}/cancel"), 404)
    _error(client.delete(f"/v1/models/{model['id']}"), 404)
    _error(client.post("/v1/jobs", json={"kind": "quantize", "model_id": model["id"],
                                         "config": {"method": "dynamic_int8"}}), 404, "model_not_found")
    assert client.get("/v1/models").json()["items"] == [] and client.get("/v1/jobs").json()["items"] == []
    client.headers.update(h["ops"])
    assert [m["id"] for m in client.get("/v1/models").json()["items"]] == [model["id"]]
    assert client.get(f"/v1/jobs/{job['id']}").json()["owner"] == "alice"


def test_revoked_key_stops_working(secured):
    client, h, keys, db = secured
    assert client.get("/v1/models", headers=h["bob"]).status_code == 200
    with db.session() as s:
        assert revoke_key(s, keys["bob"][0].id)
    _error(client.get("/v1/models", headers=h["bob"]), 401)


def test_concurrent_jobs_and_storage_limits(tmp_path):
    settings = make_settings(tmp_path, "sqlite", "filesystem", max_concurrent_jobs_per_owner=2,
                             max_storage_bytes_per_owner=200_000)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        model = upload_model(client, mlp_onnx_bytes()).json()
        body = {"kind": "quantize", "model_id": model["id"], "config": {"method": "dynamic_int8"}}
        assert [client.post("/v1/jobs", json=body).status_code for _ in range(2)] == [202, 202]
        err = _error(client.post("/v1/jobs", json=body), 429, "concurrent_jobs_limit")
        assert err["detail"] == {"limit": "max_concurrent_jobs_per_owner", "value": 2, "active": 2}
        assert "limit is 2" in err["message"]
        err = _error(upload_model(client, mlp_onnx_bytes(hidden=1024)), 413, "storage_limit")
        assert err["detail"]["value"] == 200_000 and err["detail"]["limit"] == "max_storage_bytes_per_owner"
        assert len(client.get("/v1/models").json()["items"]) == 1
        assert list((settings.storage_dir / "tmp").iterdir()) == []


def test_rate_limit(tmp_path):
    settings = make_settings(tmp_path, "sqlite", "filesystem", rate_limit_per_minute=5)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        codes = [client.get("/v1/models").status_code for _ in range(7)]
        assert codes[:5] == [200] * 5 and codes[5:] == [429, 429]
        err = client.get("/v1/models").json()["error"]
        assert err["code"] == "rate_limited" and err["detail"]["value"] == 5


def test_cli_keys_and_production_refuses_open(tmp_path, monkeypatch, capsys):
    from app.cli import main
    from app.core.config import get_settings

    monkeypatch.setenv("DISTILLERY_DATA_DIR", str(tmp_path))
    for var in ("DISTILLERY_DATABASE_URL", "DISTILLERY_AUTH"):
        monkeypatch.delenv(var, raising=False)
    get_settings.cache_clear()
    try:
        assert main(["migrate"]) == 0
        assert main(["keys", "create", "--owner", "team-a", "--label", "ci"]) == 0
        key = capsys.readouterr().out.strip().splitlines()[-1]
        assert key.startswith("dk_")
        key_id = key[3:19]
        assert main(["keys", "list"]) == 0
        listing = capsys.readouterr().out
        assert key_id in listing and "team-a" in listing and key not in listing
        assert main(["keys", "revoke", key_id]) == 0
        assert main(["keys", "revoke", key_id]) == 1
        assert main(["keys", "create", "--owner", "bad owner!"]) == 2
        monkeypatch.setenv("DISTILLERY_AUTH", "open")
        get_settings.cache_clear()
        assert main(["api", "--port", "1"]) == 2
        assert "refusing to start" in capsys.readouterr().err
        assert main(["serve", "--host", "0.0.0.0", "--port", "1"]) == 2
    finally:
        get_settings.cache_clear()


def test_keys_are_stored_only_as_a_hash(secured):
    import hashlib

    from sqlalchemy import text

    _, _, keys, db = secured
    row, key = keys["alice"]
    secret = key.split(".", 1)[1]
    with db.session() as s:
        stored = s.execute(text("SELECT * FROM api_keys WHERE id = :id"), {"id": row.id}).mappings().one()
    assert stored["secret_sha256"] == hashlib.sha256(secret.encode()).hexdigest()
    assert not any(secret in str(v) for v in stored.values())  # the secret itself is nowhere in the row


def test_datasets_artifacts_and_lineage_are_isolated_too(secured, settings):
    """Bob can neither see nor use Alice's dataset, artifact or models through any route; the admin sees them."""
    from tests.app.test_api_uploads import upload_dataset
    from tests.e2e.test_faults_services import _recorded_artifact
    from tests.helpers import digits_npz_bytes

    client, h, _, _ = secured
    client.headers.update(h["alice"])
    dataset = upload_dataset(client, digits_npz_bytes()).json()
    artifact_id, _ = _recorded_artifact(client, settings, mlp_onnx_bytes(hidden=48))
    teacher = upload_model(client, mlp_onnx_bytes()).json()
    assert client.get(f"/v1/artifacts/{artifact_id}").json()["owner"] == "alice"

    client.headers.update(h["bob"])
    for path in (f"/v1/datasets/{dataset['id']}", f"/v1/artifacts/{artifact_id}",
                 f"/v1/artifacts/{artifact_id}/content", f"/v1/artifacts/{artifact_id}/lineage",
                 f"/v1/models/{teacher['id']}/jobs"):
        _error(client.get(path), 404)
    assert client.head(f"/v1/artifacts/{artifact_id}/content").status_code == 404
    _error(client.post("/v1/models/from-artifact", json={"artifact_id": artifact_id}), 404)
    own = upload_model(client, mlp_onnx_bytes()).json()
    for body, code in (
            ({"kind": "quantize", "model_id": own["id"], "dataset_id": dataset["id"],
              "config": {"method": "static_int8"}}, "dataset_not_found"),
            ({"kind": "quantize", "artifact_id": artifact_id, "config": {"method": "dynamic_int8"}}, None),
            ({"kind": "distill", "model_id": own["id"], "dataset_id": "builtin:digits",
              "config": {"student": {"model_id": teacher["id"]}}}, "model_not_found")):
        _error(client.post("/v1/jobs", json=body), 404, code)
    assert client.get("/v1/datasets").json()["items"] == []
    assert client.get("/v1/jobs").json()["items"] == []

    client.headers.update(h["ops"])
    assert dataset["id"] in [d["id"] for d in client.get("/v1/datasets").json()["items"]]
    assert client.get(f"/v1/artifacts/{artifact_id}/lineage").status_code == 200


def test_a_burst_cannot_pass_the_per_owner_limits(settings):
    """Ten submissions and six uploads at once against limits of 3 jobs and 2 models' bytes: exactly the limit gets
    through; the count and the insert are one step per owner (an advisory lock on PostgreSQL)."""
    from concurrent.futures import ThreadPoolExecutor

    model_bytes = mlp_onnx_bytes()
    settings = settings.model_copy(update={"max_concurrent_jobs_per_owner": 3, "api_submit_concurrency": 8,
                                           "max_storage_bytes_per_owner": 2 * len(model_bytes) + len(model_bytes) // 2})
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        model = upload_model(client, model_bytes).json()
        body = {"kind": "quantize", "model_id": model["id"], "config": {"method": "dynamic_int8"}}
        others = [mlp_onnx_bytes(seed=1 + i) for i in range(6)]  # distinct files of the same size
        assert {len(o) for o in others} == {len(model_bytes)}
        with ThreadPoolExecutor(10) as pool:
            submitted = list(pool.map(lambda _: client.post("/v1/jobs", json=body).status_code, range(10)))
            uploaded = list(pool.map(lambda data: upload_model(client, data).status_code, others))
        assert sorted(submitted) == [202] * 3 + [429] * 7
        assert len(client.get("/v1/jobs").json()["items"]) == 3
        assert sorted(uploaded) == [201] + [413] * 5  # the first model and one more fit
        assert len(client.get("/v1/models").json()["items"]) == 2
