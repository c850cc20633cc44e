"""Bodies that are not uploads are bounded: a declared or streamed body past the limit is a 413, not held in memory."""
from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from app.core.bodylimit import JSON_BODY_LIMIT
from app.main import create_app
from tests.conftest import make_settings


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    settings = make_settings(tmp_path_factory.mktemp("bodylimit"), "sqlite", "filesystem")
    with TestClient(create_app(settings)) as client:
        yield client


def _big_job_body() -> bytes:
    body = {"kind": "quantize", "model_id": "0" * 32, "config": {"method": "fp16"}, "labels": {"x": "y" * 200},
            "padding": "z" * (JSON_BODY_LIMIT + 10)}
    return json.dumps(body).encode()


def test_declared_length_over_the_limit_is_413(api):
    resp = api.post("/v1/jobs", content=_big_job_body(), headers={"content-type": "application/json"})
    assert resp.status_code == 413
    err = resp.json()["error"]
    assert err["code"] == "payload_too_large" and str(JSON_BODY_LIMIT) in err["message"]


@pytest.mark.parametrize("content_type", ["application/json", "multipart/form-data; boundary=x"])
def test_streamed_body_over_the_limit_is_413_whatever_its_content_type(api, content_type):
    data = _big_job_body()

    def chunks():  # no Content-Length: the body is cut off as it streams past the limit
        for i in range(0, len(data), 64 * 1024):
            yield data[i:i + 64 * 1024]

    resp = api.post("/v1/jobs", content=chunks(), headers={"content-type": content_type})
    assert resp.status_code == 413, resp.text
    assert resp.json()["error"]["code"] == "payload_too_large"
    assert api.get("/healthz").status_code == 200


def test_a_body_under_the_limit_reaches_validation(api):
    resp = api.post("/v1/jobs", json={"kind": "quantize", "model_id": "0" * 32, "config": {"method": "fp16"}})
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "model_not_found"
