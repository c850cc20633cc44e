"""The embedded default as a newcomer runs it: `distillery serve`, a real job over HTTP, Ctrl-C."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import psutil
import pytest

from tests.e2e.conftest import free_port, wait_http
from tests.helpers import digits_npz_bytes, mlp_onnx_bytes

pytestmark = pytest.mark.slow


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
        with httpx.Client(base_url=base, timeout=30) as c:
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
            content = c.get(f"/v1/artifacts/{job['artifact_id']}/content").content
            assert len(content) == job["metrics"]["result"]["size_bytes"]
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
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
