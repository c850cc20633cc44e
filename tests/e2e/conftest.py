"""Real processes: Celery workers (threads pool, real broker) and `distillery serve`."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from app.core.config import Settings
from app.core.db import Database, utcnow
from app.core.tables import WorkerRow
from tests.conftest import make_settings

HELD_JOB_PLUGIN = Path(__file__).with_name("held_job.py")

FAST = {"heartbeat_interval_s": 0.5, "worker_lost_after_s": 4.0, "reaper_interval_s": 0.5,
        "redispatch_after_s": 30.0}


def settings_env(settings: Settings) -> dict[str, str]:
    env = {f"DISTILLERY_{k.upper()}": str(v) for k, v in settings.model_dump().items() if v is not None}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class WorkerProc:
    def __init__(self, settings: Settings, name: str, log: Path, queues: str = "cpu,gpu"):
        self.settings, self.name, self.log = settings, name, log
        cmd = [sys.executable, "-m", "celery", "-A", "worker.celery_app:celery", "worker", "--pool", "threads",
               "--concurrency", "1", "--without-gossip", "--without-mingle", "--hostname", name, "--queues", queues,
               "--loglevel", "INFO"]
        self._log = open(log, "ab")
        self.born = utcnow()
        env = {**os.environ, **settings_env(settings)}
        # every test worker can run held jobs (tests/e2e/held_job.py), beside the plugins a test names
        env["DISTILLERY_JOB_PLUGINS"] = ",".join(filter(None, (settings.job_plugins, str(HELD_JOB_PLUGIN))))
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     cwd=Path(__file__).resolve().parents[2])
        self.wait_registered()

    def wait_registered(self, timeout: float = 60.0) -> None:
        """The worker's row is (re)written once the worker consumes (worker_ready)."""
        db = Database(self.settings)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"worker exited: {self.log.read_text()[-3000:]}")
                with db.session() as session:
                    row = session.get(WorkerRow, self.name)
                    if row is not None and row.started_at >= self.born:
                        return
                time.sleep(0.1)
        finally:
            db.dispose()
        raise TimeoutError(f"worker {self.name} did not register: {self.log.read_text()[-3000:]}")

    def kill9(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def kill9_alone(self) -> list:
        """SIGKILL the worker process only (not its process group); returns the processes it had started."""
        import psutil

        children = psutil.Process(self.proc.pid).children(recursive=True)
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        return children

    def discard(self) -> None:
        """The test is over: kill the worker and its job processes at once (a graceful stop takes seconds, and
        the tests that need one call `stop` themselves)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self._log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


@pytest.fixture
def start_worker(tmp_path):
    workers: list[WorkerProc] = []

    def start(settings: Settings, name: str = "w1@test", queues: str = "cpu,gpu") -> WorkerProc:
        w = WorkerProc(settings, name, tmp_path / f"{name.replace('@', '_')}.log", queues)
        workers.append(w)
        return w

    yield start
    for w in workers:
        w.discard()


@pytest.fixture(params=["redis-postgres", "embedded"])
def stack(request, tmp_path):
    """(settings) of a real stack: PostgreSQL + Redis, or SQLite + the file-system broker."""
    if request.param == "redis-postgres":
        return production_settings(request, tmp_path)
    return make_settings(tmp_path, "sqlite", "filesystem", **FAST)


def production_settings(request, tmp_path, **overrides):
    """Settings on PostgreSQL and Redis (a flushed Redis database of this test process), FAST unless overridden."""
    pg = request.getfixturevalue("pg_url")
    redis_url = request.getfixturevalue("redis_url")
    db_index = 1 + os.getpid() % 14
    url = redis_url.rsplit("/", 1)[0] + f"/{db_index}"
    import redis

    redis.Redis.from_url(url).flushdb()
    return make_settings(tmp_path, pg, url, **{**FAST, **overrides})


@pytest.fixture
def api(stack):
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(stack), raise_server_exceptions=False) as c:
        yield c


def wait_terminal(client, job_id: str, timeout: float = 180.0) -> tuple[dict, list[dict]]:
    """Follow the job's event stream until it ends; returns (job, events)."""
    events: list[dict] = []
    deadline = time.monotonic() + timeout
    last = 0
    while time.monotonic() < deadline:
        with client.stream("GET", f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": str(last)}) as s:
            for line in s.iter_lines():
                if line.startswith("data:"):
                    ev = json.loads(line[5:])
                    events.append(ev)
                    last = ev["seq"]
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job, events
    raise TimeoutError(f"job {job_id} did not finish")


def wait_for(client, job_id: str, predicate, timeout: float = 120.0) -> dict:
    """Follow the event stream until an event satisfies predicate."""
    deadline = time.monotonic() + timeout
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as s:
        for line in s.iter_lines():
            if line.startswith("data:") and predicate(json.loads(line[5:])):
                return json.loads(line[5:])
            if time.monotonic() > deadline:
                break
    raise TimeoutError(f"job {job_id}: condition not reached")


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 90.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("server exited")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(url)
