"""Faults of the services around the jobs, on the real services: a Redis restart that forgets the queue, PostgreSQL
cut off (a proxy the test cuts, never the shared server), an API process killed mid-upload, a corrupted artifact.

The machine's shared Redis and PostgreSQL are never restarted or stopped: Redis faults use a private redis-server
started here, PostgreSQL faults go through tests/proxy.py.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.core.broker import make_celery, send_run_job
from app.core.db import Database, utcnow
from app.core.tables import ArtifactRow, JobRow, ModelRow
from app.main import create_app
from tests.app.test_api_uploads import upload_model
from tests.conftest import REQUIRE_SERVICES, make_settings
from tests.e2e.conftest import FAST, free_port, settings_env, wait_for, wait_http, wait_terminal
from tests.e2e.held_job import GATE, STAGE, held_model_bytes, release
from tests.helpers import mlp_onnx_bytes
from tests.proxy import CuttableProxy

QUICK = {"method": "dynamic_int8", "benchmark": {"batch_sizes": [1], "repeats": 2, "warmup": 0}}


def poll(condition, timeout: float, what: str, interval: float = 0.1):
    """Wait for condition() to be truthy (returns it) or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what}")


def running_streaks(events: list[dict]) -> int:
    """How many times the job entered `running` (each attempt is one streak of running events)."""
    statuses = [e["status"] for e in events]
    return sum(1 for i, s in enumerate(statuses) if s == "running" and (i == 0 or statuses[i - 1] != "running"))


# ------------------------------------------------------------------------------------------ Redis restart

class PrivateRedis:
    """A redis-server of this test alone, without persistence: a restart loses every queued message."""

    def __init__(self, folder: Path):
        self.folder, self.port = folder, free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=2)

    def start(self) -> None:
        with open(self.folder / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(self.folder)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        def answers():
            try:
                return self.client().ping()
            except Exception:  # noqa: BLE001 - not up yet
                return False

        poll(answers, 20, "the private redis-server to answer")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> None:
        self.kill()
        self.start()


@pytest.fixture
def private_redis(tmp_path):
    if shutil.which("redis-server") is None:
        message = "redis-server is not installed (needed to restart a private Redis)"
        if REQUIRE_SERVICES:
            pytest.fail(message)
        pytest.skip(message)
    r = PrivateRedis(tmp_path / "redis")
    yield r
    r.kill()


def _submit_quick(api, model_id: str) -> str:
    resp = api.post("/v1/jobs", json={"kind": "quantize", "model_id": model_id, "config": QUICK})
    assert resp.status_code == 202, resp.text
    return resp.json()["id"]


def _artifacts_per_job(settings, job_ids: list[str]) -> dict[str, int]:
    from sqlalchemy import func, select

    db = Database(settings)
    try:
        with db.session() as session:
            rows = session.execute(select(ArtifactRow.job_id, func.count()).where(ArtifactRow.job_id.in_(job_ids))
                                   .group_by(ArtifactRow.job_id)).all()
            return {job_id: n for job_id, n in rows}
    finally:
        db.dispose()


@pytest.mark.slow
def test_redis_restart_loses_the_queue_but_no_job_is_lost(tmp_path, pg_url, private_redis, start_worker):
    settings = make_settings(tmp_path, pg_url, private_redis.url, **{**FAST, "redispatch_after_s": 2.0})
    with TestClient(create_app(settings)) as api:
        model = upload_model(api, mlp_onnx_bytes(hidden=32)).json()
        ids = [_submit_quick(api, model["id"]) for _ in range(3)]
        assert private_redis.client().llen("cpu") == 3  # no worker yet: the messages wait in Redis
        restarted_at = utcnow()
        private_redis.restart()  # no persistence: the queue is gone
        assert private_redis.client().llen("cpu") == 0
        start_worker(settings, "w@test")
        for job_id in ids:
            job, events = wait_terminal(api, job_id)
            assert job["status"] == "succeeded", job
            assert job["attempts"] == 1 and running_streaks(events) == 1, events
        poll(lambda: private_redis.client().llen("cpu") == 0, 60, "the queue to drain")
    db = Database(settings)
    try:
        with db.session() as session:
            for job_id in ids:  # sent again by the worker's reaper (nothing else sends after the restart)
                assert session.get(JobRow, job_id).dispatched_at > restarted_at
    finally:
        db.dispose()
    assert _artifacts_per_job(settings, ids) == {job_id: 1 for job_id in ids}


def test_reaper_resends_what_the_broker_lost_not_what_waits_its_turn(tmp_path, pg_url, private_redis):
    """One reaper round, called directly (no worker process): jobs whose messages wait in Redis are left alone
    however long they wait; once Redis has lost them, they are sent again."""
    from sqlalchemy import update

    from worker.maintenance import reap_once
    from worker.runtime import Runtime

    settings = make_settings(tmp_path, pg_url, private_redis.url, redispatch_after_s=60.0)
    with TestClient(create_app(settings)) as api:
        model = upload_model(api, mlp_onnx_bytes(hidden=32)).json()
        ids = [_submit_quick(api, model["id"]) for _ in range(3)]
    rt = Runtime(settings)
    long_ago = utcnow().replace(year=2000)
    try:
        with rt.db.session() as session:  # as if they had waited behind long jobs since then
            session.execute(update(JobRow).where(JobRow.id.in_(ids)).values(dispatched_at=long_ago))
            session.commit()
        reap_once(rt)
        assert private_redis.client().llen("cpu") == 3  # all still in the broker: no copies
        with rt.db.session() as session:
            assert all(session.get(JobRow, i).dispatched_at == long_ago for i in ids)

        private_redis.restart()  # the queue is gone
        reap_once(rt)
        assert private_redis.client().llen("cpu") == 3  # each sent again, once
        with rt.db.session() as session:
            assert all(session.get(JobRow, i).dispatched_at > long_ago for i in ids)
        reap_once(rt)
        assert private_redis.client().llen("cpu") == 3
    finally:
        rt.db.dispose()


@pytest.mark.slow
def test_duplicate_messages_do_not_run_a_job_twice(tmp_path, pg_url, private_redis, start_worker):
    settings = make_settings(tmp_path, pg_url, private_redis.url, **FAST)
    with TestClient(create_app(settings)) as api:
        model = upload_model(api, mlp_onnx_bytes(hidden=32)).json()
        ids = [_submit_quick(api, model["id"]) for _ in range(3)]
        celery = make_celery(settings)
        for _ in range(3):  # every job three more times, as a redelivery or a re-dispatch would
            for job_id in ids:
                send_run_job(celery, job_id, "cpu")
        assert private_redis.client().llen("cpu") == 12
        start_worker(settings, "a@test")
        start_worker(settings, "b@test")  # two workers race for the copies
        for job_id in ids:
            job, events = wait_terminal(api, job_id)
            assert job["status"] == "succeeded", job
            assert job["attempts"] == 1 and running_streaks(events) == 1, events
        # every copy was consumed: the late ones found nothing to claim
        poll(lambda: private_redis.client().llen("cpu") == 0, 60, "the duplicates to be consumed")
    assert _artifacts_per_job(settings, ids) == {job_id: 1 for job_id in ids}


# ----------------------------------------------------------------------------------- PostgreSQL unavailable

@pytest.fixture
def pg_proxy(pg_url):
    from sqlalchemy.engine import make_url

    url = make_url(pg_url)
    proxy = CuttableProxy(url.host or "127.0.0.1", url.port or 5432)
    yield proxy
    proxy.close()


def _db_down(resp) -> None:
    assert resp.status_code == 503, resp.text
    assert resp.json()["error"]["code"] == "database_unavailable", resp.text
    assert resp.headers["retry-after"]


def test_api_answers_503_while_postgres_is_cut_and_recovers_by_itself(tmp_path, pg_url, pg_proxy):
    direct = make_settings(tmp_path, pg_url, "filesystem")
    settings = direct.model_copy(update={"database_url": pg_proxy.url_for(direct.database_url)})
    with TestClient(create_app(settings), raise_server_exceptions=False) as api:
        model = upload_model(api, mlp_onnx_bytes(hidden=32)).json()
        job_id = _submit_quick(api, model["id"])
        assert api.get(f"/v1/jobs/{job_id}").status_code == 200  # the polling path's own pool is connected too

        pg_proxy.cut()
        assert api.get("/healthz").json() == {"status": "ok"}
        ready = api.get("/readyz")
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "not_ready"
        checks = ready.json()["error"]["detail"]["checks"]
        assert checks["database"].startswith("unavailable") and checks["broker"] == "ok"
        for path in ("/v1/jobs", f"/v1/jobs/{job_id}", f"/v1/models/{model['id']}", "/v1/models", "/metrics"):
            _db_down(api.get(path))
        _db_down(api.post("/v1/jobs", json={"kind": "quantize", "model_id": model["id"], "config": QUICK}))
        _db_down(upload_model(api, mlp_onnx_bytes(hidden=16)))

        pg_proxy.restore()  # no restart: the pools reconnect on their own
        poll(lambda: api.get("/v1/jobs").status_code == 200, 60, "the API to reach PostgreSQL again")
        poll(lambda: api.get(f"/v1/jobs/{job_id}").status_code == 200, 60, "the polling path to recover")
        assert api.get("/readyz").status_code == 200
        assert api.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"
        assert len(api.get("/v1/models").json()["items"]) == 1  # the upload refused during the cut left no row
        _submit_quick(api, model["id"])


QUICK = {"method": "dynamic_int8", "benchmark": {"batch_sizes": [1], "repeats": 1, "warmup": 0}}


@pytest.mark.slow
def test_worker_keeps_a_result_finished_while_postgres_is_cut(tmp_path, pg_url, pg_proxy, start_worker):
    direct = make_settings(tmp_path, pg_url, "filesystem", **FAST)
    through_proxy = direct.model_copy(update={"database_url": pg_proxy.url_for(direct.database_url)})
    objects = direct.storage_dir / "objects"
    with TestClient(create_app(direct)) as api:  # the API (the test's eyes) reaches PostgreSQL directly
        worker = start_worker(through_proxy, "w@test")
        model = upload_model(api, held_model_bytes(GATE)).json()  # runs once the test releases it
        before = {p for p in objects.glob("*/*")}  # the uploaded model's file only
        resp = api.post("/v1/jobs", json={"kind": "quantize", "model_id": model["id"], "config": QUICK})
        assert resp.status_code == 202, resp.text
        job_id = resp.json()["id"]
        wait_for(api, job_id, lambda ev: ev["status"] == "running" and ev["stage"] == STAGE)

        pg_proxy.cut()
        assert release(direct) == 1
        # the job's process finishes during the outage: the worker stores the artifact, then cannot record it
        try:
            stored = poll(lambda: {p for p in objects.glob("*/*")} - before, 180, "the artifact to be stored")
        except TimeoutError:
            pytest.fail(f"no artifact stored; job {api.get(f'/v1/jobs/{job_id}').json()}\n"
                        f"worker log:\n{worker.log.read_text(errors='replace')[-6000:]}")
        refused = pg_proxy.refused
        poll(lambda: pg_proxy.refused >= refused + 3, 60, "the worker to keep trying the database")
        assert api.get(f"/v1/jobs/{job_id}").json()["status"] == "running"  # nothing recorded yet

        pg_proxy.restore()
        job, events = wait_terminal(api, job_id, timeout=120)
        assert job["status"] == "succeeded", job
        assert job["attempts"] == 1 and job["worker"] == "w@test"  # recorded, not re-run
        assert "queued" not in [e["status"] for e in events[1:]]
        art = api.get(f"/v1/artifacts/{job['artifact_id']}").json()
        assert {p.parent.name + p.name for p in stored} == {art["sha256"]}
        content = api.get(f"/v1/artifacts/{art['id']}/content")
        assert content.status_code == 200 and hashlib.sha256(content.content).hexdigest() == art["sha256"]


# ------------------------------------------------------------------------------ API killed during an upload

class ApiServer:
    """`distillery api` as production runs it (uvicorn processes, API keys), in its own process group."""

    def __init__(self, settings, log: Path, workers: int):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILLERY_")}
        env.update(settings_env(settings), DISTILLERY_API_WORKERS=str(workers))
        self._log = open(log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "app.cli", "api", "--host", "127.0.0.1", "--port",
                                      str(self.port)], env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=log.parent, start_new_session=True)
        wait_http(self.base + "/healthz", proc=self.proc)

    def kill9(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill9()
        self._log.close()


@pytest.fixture
def api_servers(tmp_path):
    servers: list[ApiServer] = []

    def start(settings, workers: int = 1) -> ApiServer:
        s = ApiServer(settings, tmp_path / f"api{len(servers)}.log", workers)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


@pytest.fixture
def keyed(tmp_path, pg_url):
    """(settings, API key) of a production-like setup: PostgreSQL, keys required."""
    from app.auth.keys import create_key

    settings = make_settings(tmp_path, pg_url, "filesystem", auth="required")
    db = Database(settings)
    try:
        with db.session() as session:
            _, key = create_key(session, "uploader")
    finally:
        db.dispose()
    return settings, key


class SlowUpload:
    """A multipart model upload on a thread that sends the first part of the file, then holds the connection open
    until release() (as a slow client would), then sends the rest."""

    BOUNDARY = "distillery-fault-test"

    def __init__(self, base: str, key: str, data: bytes):
        self.data, self.gate = data, threading.Event()
        self.response: httpx.Response | None = None
        self.error: Exception | None = None
        self.thread = threading.Thread(target=self._run, args=(base, key), daemon=True)
        self.thread.start()

    def _body(self):
        yield (f"--{self.BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.onnx\"\r\n"
               "Content-Type: application/octet-stream\r\n\r\n").encode()
        half = len(self.data) // 2
        for i in range(0, half, 64 * 1024):
            yield self.data[i:min(i + 64 * 1024, half)]
        self.gate.wait(120)
        yield self.data[half:]
        yield f"\r\n--{self.BOUNDARY}--\r\n".encode()

    def _run(self, base: str, key: str) -> None:
        try:
            self.response = httpx.post(base + "/v1/models", content=self._body(), timeout=120, headers={
                "content-type": f"multipart/form-data; boundary={self.BOUNDARY}", "authorization": f"Bearer {key}"})
        except httpx.HTTPError as exc:
            self.error = exc

    def release(self) -> None:
        self.gate.set()
        self.thread.join(130)
        assert not self.thread.is_alive()


def _temp_files(settings) -> list[Path]:
    return sorted((settings.storage_dir / "tmp").iterdir())


def _receiving(settings, at_least: int):
    """The upload temp file once the server has written `at_least` bytes of the body into it."""
    files = [p for p in _temp_files(settings) if p.name.startswith("upload~") and p.stat().st_size >= at_least]
    return files[0] if files else None


@pytest.mark.slow
def test_api_killed_mid_upload_leaves_no_row_and_no_temp_file(keyed, api_servers):
    settings, key = keyed
    data = mlp_onnx_bytes(hidden=4096)  # ~1.2 MB
    server = api_servers(settings, workers=2)
    upload = SlowUpload(server.base, key, data)
    temp = poll(lambda: _receiving(settings, len(data) // 4), 60, "the server to receive part of the upload")
    server.kill9()  # the whole uvicorn process group, mid-stream
    upload.release()
    assert upload.response is None and upload.error is not None
    assert temp.exists()  # what the killed process left

    restarted = api_servers(settings, workers=2)  # its start-up sweeps the dead process's temp file
    assert _temp_files(settings) == []
    assert list((settings.storage_dir / "objects").glob("*/*")) == []
    models = httpx.get(restarted.base + "/v1/models", headers={"authorization": f"Bearer {key}"}).json()
    assert models["items"] == []
    db = Database(settings)
    try:
        with db.session() as session:
            assert session.query(ModelRow).count() == 0
    finally:
        db.dispose()


@pytest.mark.slow
def test_a_starting_api_process_keeps_another_live_process_upload(keyed, api_servers):
    settings, key = keyed
    data = mlp_onnx_bytes(hidden=4096)
    a = api_servers(settings)
    upload = SlowUpload(a.base, key, data)
    temp = poll(lambda: _receiving(settings, len(data) // 4), 60, "server A to receive part of the upload")
    assert f"~{a.proc.pid}~" in temp.name  # named after the process writing it
    api_servers(settings)  # B starts on the same storage while A's upload is in flight
    assert temp.exists()
    upload.release()
    assert upload.response is not None and upload.response.status_code == 201, upload.error or upload.response.text
    assert upload.response.json()["sha256"] == hashlib.sha256(data).hexdigest()
    assert _temp_files(settings) == []


# ---------------------------------------------------------------------------- artifacts verified on read

def _recorded_artifact(client, settings, content: bytes) -> tuple[str, Path]:
    """A job that succeeded with `content` as its artifact, recorded as a worker records one (same repository
    calls: claim, store the file, artifact row + succeeded in one commit). Returns (artifact id, stored file)."""
    from app.core.storage import make_storage
    from app.jobs import repository as repo

    model = upload_model(client, mlp_onnx_bytes(hidden=32)).json()
    job_id = _submit_quick(client, model["id"])
    src = settings.data_dir / "artifact.onnx"
    src.write_bytes(content)
    storage = make_storage(settings)
    sha, size = storage.put_file(src)
    db = Database(settings)
    try:
        with db.session() as session:
            job = repo.claim(session, job_id, "test@worker", "cpu")
            artifact = ArtifactRow(owner=job.owner, job_id=job_id, format="onnx", size_bytes=size, sha256=sha,
                                   filename="mlp.dynamic_int8.onnx")
            assert repo.succeed(session, job_id, job.attempts, artifact, {"provenance": {"artifact_sha256": sha}})
            session.commit()
            artifact_id = artifact.id
    finally:
        db.dispose()
    return artifact_id, storage.local_path(sha)


def test_a_corrupted_artifact_is_reported_never_served(client, settings):
    from app.artifacts.verify import _cache

    content = mlp_onnx_bytes(hidden=64)
    artifact_id, stored = _recorded_artifact(client, settings, content)
    url = f"/v1/artifacts/{artifact_id}/content"

    hashed = _cache.hashes
    full = client.get(url)
    assert full.status_code == 200 and full.content == content
    assert _cache.hashes == hashed + 1
    part = client.get(url, headers={"Range": "bytes=10-99"})
    assert part.status_code == 206 and part.content == content[10:100]
    head = client.head(url)
    assert head.status_code == 200 and head.content == b"" and head.headers["content-length"] == str(len(content))
    assert client.get(url).content == content
    assert _cache.hashes == hashed + 1  # verified once for this file state, not per download

    # a bad restore: same size, one byte different, put in place by rename
    bad = bytearray(content)
    bad[len(bad) // 2] ^= 0xFF
    swap = stored.with_name("swap")
    swap.write_bytes(bytes(bad))
    os.replace(swap, stored)
    for resp in (client.get(url), client.get(url, headers={"Range": "bytes=0-99"}),
                 client.get(url, headers={"Range": "bytes=-10"})):
        assert resp.status_code == 503, resp.status_code
        err = resp.json()["error"]
        assert err["code"] == "artifact_corrupted" and err["detail"]["artifact_id"] == artifact_id
        assert bytes(bad[:100]) not in resp.content
    head = client.head(url)
    assert head.status_code == 503 and head.content == b""
    # a client that holds the recorded content (ETag = its sha256) is told it is current; no bytes are sent
    etag = full.headers["etag"]
    assert client.get(url, headers={"If-None-Match": etag}).status_code == 304

    # truncated in place: the size alone gives it away
    with open(stored, "r+b") as f:
        f.truncate(len(content) - 1)
    assert client.get(url).json()["error"]["code"] == "artifact_corrupted"

    # restored from a good copy: served again
    swap.write_bytes(content)
    os.replace(swap, stored)
    again = client.get(url)
    assert again.status_code == 200 and again.content == content
