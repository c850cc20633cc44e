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
            for path in ("/docs", "/openapi.json", "/docs/assets/swagger-ui.css"):  # a browser on the docs
                assert c.get(path, headers={"X-Request-ID": "quiet-read"}).status_code == 200, path
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
    assert "quiet-read" not in access  # successful page and asset reads are DEBUG lines, below the INFO level


LOG_SAMPLE = """
import logging, sys
from app.core.logs import setup_logging
setup_logging("json", sys.argv[1])
access = logging.getLogger("uvicorn.access")
line = '%s - "%s %s HTTP/%s" %d'
for method, path, status in [("GET", "/v1/jobs?limit=100", 200), ("GET", "/v1/jobs/abc", 200),
                             ("GET", "/v1/models?limit=200", 200), ("GET", "/", 200), ("GET", "/dashboard/app.js", 304),
                             ("GET", "/docs/assets/swagger-ui-bundle.js", 200), ("HEAD", "/openapi.json", 200),
                             ("POST", "/v1/jobs", 202), ("GET", "/v1/jobs/abc", 404), ("GET", "/v1/jobs", 500),
                             ("GET", "/v1/jobs/abc/events", 200), ("GET", "/v1/artifacts/x/content", 200),
                             ("DELETE", "/v1/models/abc", 204), ("GET", "/healthz", 200)]:
    access.info(line, "127.0.0.1:5", method, path, "1.1", status)
logging.getLogger("alembic.runtime.plugins").info("setup plugin %s", "alembic.autogenerate.schemas")
logging.getLogger("alembic.runtime.migration").info("Context impl %s.", "SQLiteImpl")
logging.getLogger("alembic.runtime.migration").info("Will assume %s DDL.", "non-transactional")
logging.getLogger("alembic.runtime.migration").info("Running upgrade %s -> %s, %s", "0003", "0004", "labels")
logging.getLogger("kombu.connection").warning("No hostname was supplied. Reverting to default 'localhost'")
logging.getLogger("kombu.connection").warning("some other kombu warning")
"""


def _sample_lines(level: str) -> list[dict]:
    out = subprocess.run([sys.executable, "-c", LOG_SAMPLE, level], capture_output=True, text=True, timeout=60,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert out.returncode == 0, out.stderr
    return json_lines(out.stderr)


def test_polls_assets_and_start_up_chatter_are_below_info_and_json_stays_intact():
    records = _sample_lines("INFO")
    shown = [(r["method"], r["path"], r["status"]) for r in records if r["logger"] == "uvicorn.access"]
    assert shown == [("POST", "/v1/jobs", 202), ("GET", "/v1/jobs/abc", 404), ("GET", "/v1/jobs", 500),
                     ("GET", "/v1/jobs/abc/events", 200), ("GET", "/v1/artifacts/x/content", 200),
                     ("DELETE", "/v1/models/abc", 204), ("GET", "/healthz", 200)]
    assert all(r["level"] == "INFO" for r in records if r["logger"] == "uvicorn.access")
    others = [(r["logger"], r["level"], r["message"]) for r in records if r["logger"] != "uvicorn.access"]
    assert others == [("alembic.runtime.migration", "INFO", "Running upgrade 0003 -> 0004, labels"),
                      ("kombu.connection", "WARNING", "some other kombu warning")]

    debug = _sample_lines("DEBUG")  # asked for: every line is there, the quieted ones as DEBUG
    assert len([r for r in debug if r["logger"] == "uvicorn.access"]) == 14
    quiet = [r for r in debug if r["level"] == "DEBUG"]
    assert len(quiet) == 7 + 3 and {r["logger"] for r in quiet} == {
        "uvicorn.access", "alembic.runtime.migration", "kombu.connection"}
    assert any(r["logger"] == "alembic.runtime.plugins" for r in debug)  # its own level follows DEBUG
    assert {r["path"] for r in quiet if r["logger"] == "uvicorn.access"} == {
        "/v1/jobs?limit=100", "/v1/jobs/abc", "/v1/models?limit=200", "/", "/dashboard/app.js",
        "/docs/assets/swagger-ui-bundle.js", "/openapi.json"}
