"""Structured logs: a real worker and a real job with log_format=json, and `distillery api` with several processes.

Every line is one JSON object; the lines written while a job is claimed, run and recorded carry its id; API access
lines carry the request id that the response echoes in X-Request-ID.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.app.test_api_uploads import upload_dataset, upload_model
from tests.conftest import make_settings
from tests.e2e.conftest import FAST, free_port, settings_env, wait_http, wait_terminal
from tests.helpers import digits_npz_bytes, mlp_onnx_bytes

pytestmark = pytest.mark.slow


def json_lines(text: str) -> list[dict]:
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        assert line.strip(), f"line {n} is empty"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"line {n} is not JSON: {line[:300]!r}")
        assert isinstance(rec, dict) and {"ts", "level", "logger", "message"} <= set(rec), rec
        records.append(rec)
    return records


@pytest.fixture
def pg_redis(tmp_path, pg_url, redis_url):
    import redis

    url = redis_url.rsplit("/", 1)[0] + f"/{1 + os.getpid() % 14}"
    redis.Redis.from_url(url).flushdb()
    return make_settings(tmp_path, pg_url, url, log_format="json", **FAST)


def test_worker_lines_are_json_and_name_the_job(pg_redis, start_worker):
    settings = pg_redis
    worker = start_worker(settings, "logs@test")
    with TestClient(create_app(settings), raise_server_exceptions=False) as api:
        model = upload_model(api, mlp_onnx_bytes()).json()
        dataset = upload_dataset(api, digits_npz_bytes()).json()
        resp = api.post("/v1/jobs", json={"kind": "quantize", "model_id": model["id"], "dataset_id": dataset["id"],
                                          "config": {"method": "static_int8", "benchmark": {
                                              "batch_sizes": [1], "repeats": 3, "warmup": 1}}})
        assert resp.status_code == 202, resp.text
        job_id = resp.json()["id"]
        job, _ = wait_terminal(api, job_id)
        assert job["status"] == "succeeded", job
    # the task's own "succeeded in" line comes right after the result is committed: wait for it, no sleep
    deadline = time.monotonic() + 30
    while "succeeded in" not in worker.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    worker.stop()

    records = json_lines(worker.log.read_text())
    assert any(r["logger"].startswith("celery") for r in records)  # Celery's own lines are JSON too
    assert all(r.get("worker") == "logs@test" for r in records if r["logger"].startswith(("distillery", "celery")))
    claimed = next(i for i, r in enumerate(records) if "claimed" in r["message"] and job_id in r["message"])
    done = next(i for i, r in enumerate(records) if r["logger"] == "celery.app.trace" and "succeeded in" in r["message"])
    during = records[claimed:done + 1]
    assert len(during) >= 3
    assert [r for r in during if r.get("job_id") != job_id] == [], "lines during the job without its id"
    assert {r["logger"] for r in during} >= {"distillery.worker", "celery.app.trace"}
    # and no line outside the job claims to be about it
    outside = [r for r in records[:claimed] + records[done + 1:] if r.get("job_id")]
    assert outside == []


def test_api_processes_log_json_access_lines_with_the_request_id(pg_redis, tmp_path):
    settings = pg_redis.model_copy(update={"auth": "required"})
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILLERY_")}
    log_path = tmp_path / "api.log"
    with open(log_path, "wb") as log:  # two uvicorn processes: each one sets its logging up from the same config
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", "api", "--host", "127.0.0.1", "--port", str(port),
                                 "--workers", "2"], env={**env, **settings_env(settings)}, stdout=log,
                                stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + "/healthz", proc=proc)
        with httpx.Client(base_url=base, timeout=10) as c:
            ok = c.get("/healthz", headers={"X-Request-ID": "probe-7f3a"})
            assert ok.status_code == 200 and ok.headers["x-request-id"] == "probe-7f3a"
            denied = c.get("/v1/models")  # no key: 401, with a request id the server chose
            assert denied.status_code == 401
            generated = denied.headers["x-request-id"]
            assert len(generated) == 16
            bad = c.get("/healthz", headers={"X-Request-ID": "x" * 200})  # too long: replaced, not echoed
            assert bad.headers["x-request-id"] != "x" * 200
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    records = json_lines(log_path.read_text())
    access = {r.get("request_id"): r for r in records if r["logger"] == "uvicorn.access"}
    assert access["probe-7f3a"]["path"] == "/healthz" and access["probe-7f3a"]["status"] == 200
    assert access[generated]["path"] == "/v1/models" and access[generated]["status"] == 401
    assert access[generated]["method"] == "GET"
    started = [r for r in records if r["logger"] == "uvicorn.error" and "Started server process" in r["message"]]
    assert len(started) == 2  # both processes log JSON
