"""The embedded default as a newcomer runs it: `distillery serve`, a real job over HTTP, Ctrl-C."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from tests.e2e.conftest import free_port, wait_http
from tests.helpers import digits_npz_bytes, mlp_onnx_bytes
from worker.maintenance import resolve_queues

pytestmark = pytest.mark.slow

#: What `distillery serve` used to print at every start (and its access log every 1.5 s while the dashboard is
#: open): none of it may come back at the default level.
START_UP_NOISE = ("alembic.runtime.plugins", "setup plugin alembic", "Context impl SQLiteImpl",
                  "Will assume non-transactional DDL", "superuser privileges", "SecurityWarning",
                  "No hostname was supplied")


def _embedded_worker(c: httpx.Client, timeout: float = 90.0) -> dict:
    """The embedded worker's entry in /v1/capabilities, once it has registered (it does when it consumes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        live = [w for w in c.get("/v1/capabilities").json()["workers"] if w["name"].startswith("embedded@")]
        if live:
            return live[0]
        time.sleep(0.2)
    raise TimeoutError("the embedded worker did not register")


def test_serve_runs_a_job_and_stops_cleanly_on_ctrl_c(tmp_path):
    port = free_port()
    data_dir = tmp_path / "distillery-data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILLERY_")}
    env.update(DISTILLERY_DATA_DIR=str(data_dir), PYTHONUNBUFFERED="1")
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + "/readyz", proc=proc)
        said = (tmp_path / "serve.log").read_text()
        assert "running OPEN on 127.0.0.1" in said and "loopback only" in said, said[-2000:]  # says so at start-up
        gpu_here = "gpu" in resolve_queues("auto")  # what `distillery worker` would consume on this machine
        with httpx.Client(base_url=base, timeout=30) as c:
            worker = _embedded_worker(c)
            # the only worker takes cpu jobs, and claims the GPU queue only where a GPU worker would
            assert worker["queues"] == (["cpu", "gpu"] if gpu_here else ["cpu"]), worker
            model = c.post("/v1/models", files={"file": ("m.onnx", mlp_onnx_bytes())}).json()
            ds = c.post("/v1/datasets", files={"file": ("d.npz", digits_npz_bytes())}).json()
            job = c.post("/v1/jobs", json={"kind": "quantize", "model_id": model["id"], "dataset_id": ds["id"],
                                           "config": {"method": "static_int8", "benchmark": {
                                               "batch_sizes": [1, 16], "repeats": 3, "warmup": 1}}}).json()
            seen = []
            with c.stream("GET", f"/v1/jobs/{job['id']}/events", timeout=180) as s:
                for line in s.iter_lines():
                    if line.startswith("event:"):
                        continue
                    if line.startswith("data:"):
                        seen.append(line)
            job = c.get(f"/v1/jobs/{job['id']}").json()
            assert job["status"] == "succeeded", (job, (tmp_path / "serve.log").read_text()[-3000:])
            # where it ran: the queue the API chose from the live worker, the worker that claimed it, its device
            assert job["queue"] == ("gpu" if gpu_here else "cpu"), job
            assert job["worker"] == worker["name"] and job["device"] == ("cuda" if gpu_here else "cpu"), job
            if not gpu_here:
                assert not any("GPU" in line for line in seen), seen  # never "queued for a GPU worker"
            content = c.get(f"/v1/artifacts/{job['artifact_id']}/content").content
            assert len(content) == job["metrics"]["result"]["size_bytes"]
            # what a browser on the dashboard and /docs fetches, over and over: not logged at INFO when it succeeds
            for path in ("/", "/dashboard/app.js", "/dashboard/app.css", "/v1/jobs?limit=100",
                         "/v1/models?limit=200", f"/v1/jobs/{job['id']}", "/docs", "/openapi.json",
                         "/docs/assets/swagger-ui-bundle.js"):
                assert c.get(path).status_code == 200, path
            assert c.get("/dashboard/nope.js").status_code == 404  # a failed read still is
        # everything it wrote is under DISTILLERY_DATA_DIR
        assert (data_dir / "distillery.db").exists() and (data_dir / "broker").is_dir()
        assert (data_dir / "storage" / "objects").is_dir()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["distillery-data", "serve.log"]
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children, "serve should run a worker process"
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground process group
        assert proc.wait(30) == 0
        gone, alive = psutil.wait_procs(children, timeout=15)
        assert not alive
        said = (tmp_path / "serve.log").read_text()
        assert [n for n in START_UP_NOISE if n in said] == [], said[:5000]
        access = re.findall(r'"(GET|POST|HEAD|PUT|PATCH|DELETE) (\S+) HTTP/[\d.]+" (\d+)', said)
        assert ("POST", "/v1/jobs", "202") in access and ("POST", "/v1/models", "201") in access, access  # writes
        assert ("GET", "/dashboard/nope.js", "404") in access, access
        assert ("GET", f"/v1/artifacts/{job['artifact_id']}/content", "200") in access, access  # not a poll
        polls = [a for a in access if a[0] == "GET" and a[2] == "200" and not a[1].endswith("/events") and (
            a[1] in ("/", "/docs", "/openapi.json", "/readyz")
            or a[1].startswith(("/dashboard/", "/docs/", "/v1/jobs", "/v1/models")))]
        assert polls == [("GET", "/readyz", "200")] * len(polls), polls  # only the readiness probes remain
        assert f"local worker {worker['name']} consumes" in said
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
