"""Job submission, validation, idempotency, cancel and events through the HTTP API (no worker running)."""
from __future__ import annotations

import json

import pytest

from tests.app.test_api_uploads import _error, upload_dataset, upload_model
from tests.helpers import digits_npz_bytes, mlp_onnx_bytes


@pytest.fixture
def model_id(client):
    return upload_model(client, mlp_onnx_bytes()).json()["id"]


@pytest.fixture
def dataset_id(client):
    return upload_dataset(client, digits_npz_bytes()).json()["id"]


def submit(client, model_id, dataset_id=None, headers=None, **config):
    body = {"kind": "quantize", "model_id": model_id, "config": {"method": "dynamic_int8", **config}}
    if dataset_id:
        body["dataset_id"] = dataset_id
    return client.post("/v1/jobs", json=body, headers=headers or {})


def test_submit_returns_queued_job_with_defaults(client, model_id, dataset_id):
    resp = submit(client, model_id, dataset_id)
    assert resp.status_code == 202, resp.text
    job = resp.json()
    assert resp.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued" and job["attempts"] == 0 and job["max_attempts"] == 3
    assert job["progress"] == 0.0 and job["error"] is None and job["artifact_id"] is None
    assert job["config"]["calibration"] == {"samples": 512, "method": "minmax"}
    assert job["config"]["benchmark"]["batch_sizes"] == [1, 64]
    assert client.get(f"/v1/jobs/{job['id']}").json() == job


@pytest.mark.parametrize("config,field", [
    ({"method": "dynamic_int8", "bogus": 1}, "config.bogus"),
    ({"method": "int3"}, "config.method"),
    ({"method": "static_int8", "calibration": {"samples": 0}}, "config.calibration.samples"),
    ({"method": "static_int8", "calibration": {"samples": "many"}}, "config.calibration.samples"),
    ({"method": "dynamic_int8", "max_accuracy_drop": -1}, "config.max_accuracy_drop"),
    ({"method": "dynamic_int8", "benchmark": {"batch_sizes": [1, 1]}}, "config.benchmark.batch_sizes"),
    ({"method": "dynamic_int8", "benchmark": {"repeats": 10**9}}, "config.benchmark.repeats"),
])
def test_bad_config_is_422_naming_the_field(client, model_id, config, field):
    resp = client.post("/v1/jobs", json={"kind": "quantize", "model_id": model_id, "config": config})
    err = _error(resp, 422, "validation_error")
    assert any(e["field"] == field for e in err["detail"]["errors"]), err


def test_nan_and_malformed_json(client, model_id):
    raw = '{"kind": "quantize", "model_id": "%s", "config": {"method": "dynamic_int8", "max_accuracy_drop": NaN}}'
    _error(client.post("/v1/jobs", content=raw % model_id, headers={"content-type": "application/json"}), 422)
    err = _error(client.post("/v1/jobs", content="{not json", headers={"content-type": "application/json"}), 422)
    assert "not valid JSON" in err["message"]
    _error(client.post("/v1/jobs", json={"kind": "prune", "model_id": model_id, "config": {}}), 422)
    _error(client.post("/v1/jobs", json=["a list"]), 422)


def test_references_are_checked(client, model_id):
    _error(submit(client, "f" * 32), 404, "model_not_found")
    _error(submit(client, model_id, dataset_id="e" * 32), 404, "dataset_not_found")
    resp = client.post("/v1/jobs", json={"kind": "quantize", "model_id": model_id, "config": {"method": "static_int8"}})
    _error(resp, 422, "dataset_required")


def test_dataset_must_fit_the_model(client):
    mid = upload_model(client, mlp_onnx_bytes(input_name="pixels")).json()["id"]
    did = upload_dataset(client, digits_npz_bytes(input_name="other")).json()["id"]
    err = _error(submit(client, mid, did), 422, "dataset_mismatch")
    assert err["detail"]["model_inputs"] == ["pixels"]


def test_idempotency_key(client, model_id):
    h = {"Idempotency-Key": "abc-123"}
    first = submit(client, model_id, headers=h)
    again = submit(client, model_id, headers=h)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"] and again.headers["idempotent-replayed"] == "true"
    _error(submit(client, model_id, headers=h, per_channel=False), 409, "idempotency_key_reused")
    assert len(client.get("/v1/jobs").json()["items"]) == 1


def test_list_filters_and_pagination(client, model_id):
    ids = [submit(client, model_id).json()["id"] for _ in range(3)]
    client.post(f"/v1/jobs/{ids[0]}/cancel")
    page = client.get("/v1/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in page["items"]] == ids[::-1][:2]
    rest = client.get("/v1/jobs", params={"limit": 2, "cursor": page["next_cursor"]}).json()
    assert [j["id"] for j in rest["items"]] == [ids[0]] and rest["next_cursor"] is None
    assert [j["id"] for j in client.get("/v1/jobs", params={"status": "cancelled"}).json()["items"]] == [ids[0]]
    assert len(client.get("/v1/jobs", params={"model_id": model_id, "kind": "quantize"}).json()["items"]) == 3
    assert client.get("/v1/jobs", params={"model_id": "0" * 32}).json()["items"] == []
    _error(client.get("/v1/jobs", params={"status": "exploded"}), 422)


def test_cancel_queued_job_and_events(client, model_id):
    job = submit(client, model_id).json()
    resp = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert resp.status_code == 200 and resp.json()["status"] == "cancelled"
    assert resp.json()["error"]["code"] == "cancelled" and resp.json()["finished_at"]
    _error(client.post(f"/v1/jobs/{job['id']}/cancel"), 409, "invalid_transition")
    with client.stream("GET", f"/v1/jobs/{job['id']}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        text = "".join(stream.iter_text())
    events = [json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:")]
    assert [e["status"] for e in events] == ["queued", "cancelled"]
    assert [e["seq"] for e in events] == [1, 2]
    with client.stream("GET", f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": "1"}) as stream:
        text = "".join(stream.iter_text())
    assert [json.loads(l[5:])["status"] for l in text.splitlines() if l.startswith("data:")] == ["cancelled"]


def test_model_in_use_cannot_be_deleted(client, model_id):
    job = submit(client, model_id).json()
    _error(client.delete(f"/v1/models/{model_id}"), 409, "model_in_use")
    client.post(f"/v1/jobs/{job['id']}/cancel")
    assert client.delete(f"/v1/models/{model_id}").status_code == 204


def test_health_ready_metrics_openapi(client, model_id):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "broker": "ok"}
    submit(client, model_id)
    text = client.get("/metrics").text
    assert 'distillery_jobs{kind="quantize",status="queued"} 1.0' in text
    assert "distillery_upload_bytes" in text
    spec = client.get("/openapi.json").json()
    assert {"/v1/models", "/v1/jobs", "/v1/jobs/{job_id}/events", "/v1/artifacts/{artifact_id}/content"} <= set(spec["paths"])


def test_prune_and_distill_jobs_are_validated_and_queued(client, model_id, dataset_id):
    prune = client.post("/v1/jobs", json={"kind": "prune", "model_id": model_id, "dataset_id": dataset_id, "config": {
        "method": "channels", "ratio": 0.5, "fine_tune": {"epochs": 2}}})
    assert prune.status_code == 202, prune.text
    cfg = prune.json()["config"]
    assert cfg["fine_tune"] == {"epochs": 2, "lr": 0.001, "distill": True} and cfg["round_to"] == 8
    assert cfg["output_format"] is None
    distill = client.post("/v1/jobs", json={"kind": "distill", "model_id": model_id, "dataset_id": "builtin:digits",
                                            "config": {"student": {"arch": "mlp", "hidden": [32]}, "epochs": 3}})
    assert distill.status_code == 202, distill.text
    job = distill.json()
    assert job["dataset_id"] == "builtin:digits" and job["config"]["student"] == {"arch": "mlp", "hidden": [32]}
    assert job["config"]["temperature"] == 4.0 and job["config"]["alpha"] == 0.7
    assert client.get(f"/v1/jobs/{job['id']}").json()["dataset_id"] == "builtin:digits"


def test_kind_specific_rules(client, model_id):
    err = _error(client.post("/v1/jobs", json={"kind": "distill", "model_id": model_id, "config": {
        "student": {"shrink": 0.5}}}), 422, "dataset_required")
    assert err["detail"]["field"] == "dataset_id"
    _error(client.post("/v1/jobs", json={"kind": "prune", "model_id": model_id, "config": {
        "method": "magnitude", "fine_tune": {"epochs": 1}}}), 422, "dataset_required")
    _error(client.post("/v1/jobs", json={"kind": "quantize", "model_id": model_id, "config": {
        "method": "static_int8", "output_format": "torchscript"}, "dataset_id": "builtin:digits"}), 422,
        "unsupported_output_format")
    _error(client.post("/v1/jobs", json={"kind": "distill", "model_id": model_id, "dataset_id": "builtin:mnist",
                                         "config": {"student": {"model_id": "c" * 32}}}), 404, "model_not_found")
    err = _error(client.post("/v1/jobs", json={"kind": "quantize", "model_id": model_id, "dataset_id": "builtin:cifar",
                                               "config": {"method": "fp16"}}), 422, "validation_error")
    assert err["detail"]["errors"][0]["field"] == "dataset_id"
    err = _error(client.post("/v1/jobs", json={"kind": "distill", "model_id": model_id, "dataset_id": "builtin:mnist",
                                               "config": {"student": {"arch": "rnn"}}}), 422, "validation_error")
    assert err["detail"]["errors"][0]["field"] == "config.student"


def test_student_model_is_in_use_while_the_job_runs(client, model_id):
    student = upload_model(client, mlp_onnx_bytes(hidden=32), name="student").json()["id"]
    job = client.post("/v1/jobs", json={"kind": "distill", "model_id": model_id, "dataset_id": "builtin:digits",
                                        "config": {"student": {"model_id": student}}}).json()
    _error(client.delete(f"/v1/models/{student}"), 409, "model_in_use")
    client.post(f"/v1/jobs/{job['id']}/cancel")
    assert client.delete(f"/v1/models/{student}").status_code == 204


def test_capabilities_aggregate_live_workers(client, settings):
    from app.core.db import Database, utcnow
    from app.core.tables import WorkerRow

    caps = client.get("/v1/capabilities").json()
    assert caps == {"methods": [], "builtin_datasets": {}, "workers": []}
    db = Database(settings)
    method = {"kind": "quantize", "method": "static_int8", "input_formats": ["onnx"], "output_formats": ["onnx"]}
    with db.session() as s:
        s.add(WorkerRow(name="gpu1", queues="gpu", device="cuda", last_seen_at=utcnow(), info={
            "methods": [{**method, "devices": ["cuda"]}], "builtin_datasets": {"mnist": True}}))
        s.add(WorkerRow(name="cpu1", queues="cpu", device="cpu", last_seen_at=utcnow(), info={
            "methods": [{**method, "input_formats": ["onnx", "torchscript"], "devices": ["cpu"]}],
            "builtin_datasets": {"mnist": False, "digits": True}}))
        s.commit()
    db.dispose()
    caps = client.get("/v1/capabilities").json()
    assert caps["methods"] == [{**method, "input_formats": ["onnx", "torchscript"], "devices": ["cpu", "cuda"]}]
    assert caps["builtin_datasets"] == {"mnist": True, "digits": True}
    assert [(w["name"], w["live"]) for w in caps["workers"]] == [("cpu1", True), ("gpu1", True)]


def test_polling_fast_path_matches_the_regular_rendering(client, settings, model_id):
    """On PostgreSQL GET /v1/jobs/{id} skips the ORM; it must say exactly what JobOut says."""
    from app.core.db import Database
    from app.jobs import repository, service

    job = submit(client, model_id, headers={"Idempotency-Key": "k"}).json()
    db = Database(settings)
    with db.session() as s:
        repository.transition(s, job["id"], metrics={"result": {"x": 1.5, "nested": [1, None]}}, error_code="boom",
                              error_message=None)
        s.commit()
        expected = service.to_out(service.get(s, "default", job["id"])).model_dump(mode="json")
    db.dispose()
    resp = client.get(f"/v1/jobs/{job['id']}")
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
    assert resp.json() == expected
    assert resp.json()["error"] == {"code": "boom", "message": ""}
    assert resp.json()["created_at"].endswith("Z")
    _error(client.get("/v1/jobs/" + "0" * 32), 404, "job_not_found")
