"""Property-based API conformance with schemathesis, in process on the ASGI app (SQLite, API keys required).

Every operation in the app's own OpenAPI spec (whatever it holds when the test runs) is called with generated
requests, valid and invalid ones (schemathesis' positive and negative modes, derandomized), with a real key; each
response must not be a 5xx, must have a documented status code, content type and headers, and its body must match
the declared schema (errors included: `{"error": {...}}`). Generated ids find nothing, so a second test calls every
GET with ids in its path with the ids of real rows, on SQLite and PostgreSQL. The event stream is fuzzed too (its
404s and 422s); a real job's stream is not, since a queued job's stream only ends when the job does.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.auth.keys import create_key
from app.core.config import Settings
from app.core.db import Database
from app.main import create_app
from tests.conftest import make_settings
from tests.helpers import digits_npz_bytes, mlp_onnx_bytes

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance]
MAX_EXAMPLES = 25  # per operation and generation mode; the whole test stays around a minute on 2 busy cores


# The spec of the app as built at collection time (building the app touches no database, only its lifespan does;
# nothing is written under this data dir). schemathesis' `from_fixture` loader does not run on pytest 9.
schema = schemathesis.openapi.from_dict(create_app(Settings(
    data_dir=Path(tempfile.gettempdir()) / "distillery-spec-only", auth="required")).openapi())
schema.config.generation.update(max_examples=MAX_EXAMPLES, deterministic=True, database="none")


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def live(request, tmp_path_factory):
    """(app, auth headers): the app on SQLite, then on PostgreSQL (where job polls take the fast path below the
    router), with keys required, a key, and a real model, dataset and job."""
    db_url = "sqlite" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    # a high rate limit: hundreds of requests a second from one owner are the test, not abuse; uploads bounded
    cfg = make_settings(tmp_path_factory.mktemp("schemathesis"), db_url, "filesystem", auth="required",
                        auth_cache_s=300.0, rate_limit_per_minute=10**9, max_upload_bytes=1 << 20)
    db = Database(cfg)
    with db.session() as session:
        _, key = create_key(session, "schemathesis")
    db.dispose()
    headers = {"Authorization": f"Bearer {key}"}
    app = create_app(cfg)
    with TestClient(app, raise_server_exceptions=False, headers=headers) as client:
        model = client.post("/v1/models", files={"file": ("mlp.onnx", mlp_onnx_bytes(), "application/octet-stream")})
        assert model.status_code == 201, model.text
        data = client.post("/v1/datasets", files={"file": ("d.npz", digits_npz_bytes(), "application/octet-stream")})
        assert data.status_code == 201, data.text
        job = client.post("/v1/jobs", json={"kind": "quantize", "model_id": model.json()["id"],
                                            "config": {"method": "dynamic_int8"}})
        assert job.status_code == 202, job.text
    yield app, headers
    asgi.shutdown_lifespans()  # schemathesis started the app's lifespan for its calls; close its database pool


@schema.parametrize()
@hypothesis_settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_openapi_spec(case, live):
    app, headers = live
    case.call_and_validate(app=app, headers=headers, checks=CHECKS, timeout=30)


def test_real_resources_conform_to_the_spec(settings):
    """Every GET with ids in its path, called with the ids of real rows (generated ids only ever find 404s), on
    SQLite and on PostgreSQL (where the job status is read by the fast path that writes its JSON by hand)."""
    cfg = settings.model_copy(update={"auth": "required"})
    db = Database(cfg)
    with db.session() as session:
        _, key = create_key(session, "schemathesis")
    db.dispose()
    with TestClient(create_app(cfg), raise_server_exceptions=False,
                    headers={"Authorization": f"Bearer {key}"}) as client:
        model = client.post("/v1/models", files={"file": ("mlp.onnx", mlp_onnx_bytes(), "application/octet-stream")})
        data = client.post("/v1/datasets", files={"file": ("d.npz", digits_npz_bytes(), "application/octet-stream")})
        job = client.post("/v1/jobs", json={"kind": "quantize", "model_id": model.json()["id"],
                                            "dataset_id": data.json()["id"], "config": {"method": "static_int8"}})
        assert job.status_code == 202, job.text
        ids = {"model_id": model.json()["id"], "dataset_id": data.json()["id"], "job_id": job.json()["id"]}
        called = []
        for result in schema.get_all_operations():
            op = result.ok()
            names = [p.name for p in op.path_parameters]
            if op.method.upper() != "GET" or not names or not set(names) <= ids.keys() or op.path.endswith("/events"):
                continue  # the events stream of a queued job never ends: its 404 is covered above
            case = op.Case(path_parameters={n: ids[n] for n in names})
            response = client.get(case.formatted_path)
            assert response.status_code == 200, (op.label, response.text)
            case.validate_response(response, checks=CHECKS)
            called.append(op.label)
        assert {"GET /v1/jobs/{job_id}", "GET /v1/models/{model_id}", "GET /v1/datasets/{dataset_id}"} <= set(called)
        for path in ("/v1/jobs", "/v1/models", "/v1/datasets"):  # lists with real items
            response = client.get(path)
            assert response.json()["items"], path
            schema[path]["GET"].Case().validate_response(response, checks=CHECKS)


def test_spec_declares_the_common_errors():
    """What the fuzzing relies on, stated directly: auth, validation and database errors are declared per route."""
    spec = create_app(Settings(data_dir=Path(tempfile.gettempdir()) / "distillery-spec-only")).openapi()
    error = {"$ref": "#/components/schemas/ErrorResponse"}
    jobs = spec["paths"]["/v1/jobs"]["post"]
    for code in ("400", "401", "404", "422", "429", "503"):
        assert jobs["responses"][code]["content"]["application/json"]["schema"] == error, code
    assert jobs["security"] == [{"bearerAuth": []}]
    assert spec["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert "HTTPValidationError" not in str(spec)  # FastAPI's default 422 body is not what the app answers
    health = spec["paths"]["/healthz"]["get"]
    assert set(health["responses"]) == {"200"} and "security" not in health  # no key, no database
    ready = spec["paths"]["/readyz"]["get"]["responses"]["503"]
    assert ready["content"]["application/json"]["schema"] == error
