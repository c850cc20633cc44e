"""Jobs are never lost and never run twice at once: SIGKILLed workers, cancel and time limits."""
from __future__ import annotations

import io

import numpy as np
import psutil
import pytest

from tests.app.test_api_uploads import upload_dataset, upload_model
from tests.e2e.conftest import FAST, production_settings, wait_for, wait_terminal
from tests.conftest import make_settings
from tests.helpers import digits_npz_bytes, mlp_onnx_bytes

pytestmark = pytest.mark.slow

# Enough timed runs on a wide model that the job spends many seconds measuring.
SLOW = {"method": "dynamic_int8", "benchmark": {"batch_sizes": [1, 256], "repeats": 4000, "warmup": 1}}


def submit_slow(api, model_id):
    resp = api.post("/v1/jobs", json={"kind": "quantize", "model_id": model_id, "config": SLOW})
    assert resp.status_code == 202, resp.text
    return resp.json()


def _running(ev):
    return ev["status"] == "running" and ev["progress"] > 0.2


def test_sigkilled_worker_job_finishes_on_another(api, stack, start_worker):
    a = start_worker(stack, "a@test")
    model = upload_model(api, mlp_onnx_bytes(hidden=1024)).json()
    job = submit_slow(api, model["id"])
    wait_for(api, job["id"], _running)
    a.kill9()
    b = start_worker(stack, "b@test")
    job, events = wait_terminal(api, job["id"], timeout=300)
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 2 and job["worker"] == b.name, events
    statuses = [e["status"] for e in events]
    # running -> queued (re-queued by the reaper) -> running -> succeeded: never two runs at once
    first_requeue = statuses.index("queued", 1)
    assert "running" in statuses[:first_requeue] and statuses[first_requeue + 1:].count("queued") == 0
    assert statuses[-1] == "succeeded"


def test_sigkilled_worker_without_attempts_left_fails_worker_lost(request, tmp_path, start_worker):
    from fastapi.testclient import TestClient

    from app.main import create_app

    settings = production_settings(request, tmp_path, max_attempts=1)
    with TestClient(create_app(settings)) as api:
        a = start_worker(settings, "a@test")
        model = upload_model(api, mlp_onnx_bytes(hidden=1024)).json()
        job = submit_slow(api, model["id"])
        wait_for(api, job["id"], _running)
        children = a.kill9_alone()  # the worker only: its job process must not run on without it
        assert children
        _, alive = psutil.wait_procs(children, timeout=15)
        assert not alive, f"processes outlived their worker: {alive}"
        start_worker(settings, "b@test")
        job, _ = wait_terminal(api, job["id"])
        assert job["status"] == "failed" and job["attempts"] == 1
        assert job["error"]["code"] == "worker_lost"


def test_cancel_running_job_and_worker_takes_next(api, stack, start_worker):
    start_worker(stack, "w@test")
    model = upload_model(api, mlp_onnx_bytes(hidden=1024)).json()
    job = submit_slow(api, model["id"])
    wait_for(api, job["id"], _running)
    resp = api.post(f"/v1/jobs/{job['id']}/cancel")
    assert resp.status_code == 200 and resp.json()["status"] in ("running", "cancelled")
    job, _ = wait_terminal(api, job["id"], timeout=30)
    assert job["status"] == "cancelled" and job["error"]["code"] == "cancelled"
    quick = api.post("/v1/jobs", json={"kind": "quantize", "model_id": model["id"], "config": {
        "method": "dynamic_int8", "benchmark": {"batch_sizes": [1], "repeats": 2, "warmup": 0}}}).json()
    quick, _ = wait_terminal(api, quick["id"])
    assert quick["status"] == "succeeded"


def test_time_limit_kills_the_job_not_the_worker(request, tmp_path, start_worker):
    from fastapi.testclient import TestClient

    from app.main import create_app

    # Long enough for a small job on a busy machine. The slow job times 2 x 10,000 runs at batch 4096 on 4096
    # evaluation rows (about 3 x 10^8 multiply-adds a run): minutes on any CPU. (Without a dataset the engine
    # evaluates on 256 synthetic rows and clips the batch to them: a fast machine finished that within the limit.)
    settings = production_settings(request, tmp_path, job_time_limit_s=15.0)
    with TestClient(create_app(settings)) as api:
        w = start_worker(settings, "w@test")
        model = upload_model(api, mlp_onnx_bytes(hidden=1024)).json()
        rng = np.random.default_rng(0)
        rows = {"x": rng.random((4096, 64), np.float32), "y": rng.integers(0, 10, 4096)}
        buf = io.BytesIO()
        np.savez(buf, **rows, x_test=rows["x"], y_test=rows["y"])
        big = upload_dataset(api, buf.getvalue()).json()
        slow = {**SLOW, "benchmark": {**SLOW["benchmark"], "batch_sizes": [1, 4096], "repeats": 10_000}}
        resp = api.post("/v1/jobs", json={"kind": "quantize", "model_id": model["id"], "dataset_id": big["id"],
                                          "config": slow})
        assert resp.status_code == 202, resp.text
        job, _ = wait_terminal(api, resp.json()["id"])
        assert job["status"] == "failed" and job["error"]["code"] == "timeout"
        assert w.proc.poll() is None
        ds = upload_dataset(api, digits_npz_bytes()).json()
        nxt = api.post("/v1/jobs", json={"kind": "quantize", "model_id": model["id"], "dataset_id": ds["id"],
                                         "config": {"method": "dynamic_int8", "benchmark": {
                                             "batch_sizes": [1], "repeats": 1, "warmup": 0}}}).json()
        nxt, _ = wait_terminal(api, nxt["id"])
        assert nxt["status"] == "succeeded", nxt["error"]


def test_memory_limit_fails_with_out_of_memory(request, tmp_path, start_worker):
    from fastapi.testclient import TestClient

    from app.main import create_app

    settings = production_settings(request, tmp_path, job_memory_limit_bytes=40 * 1024**2)
    with TestClient(create_app(settings)) as api:
        w = start_worker(settings, "w@test")
        model = upload_model(api, mlp_onnx_bytes()).json()
        job, _ = wait_terminal(api, submit_slow(api, model["id"])["id"])
        assert job["status"] == "failed" and job["error"]["code"] == "out_of_memory"
        assert "memory limit" in job["error"]["message"] and w.proc.poll() is None
        # the worker takes the next job: claimed, run and recorded by the same worker (under the same 40 MB limit
        # any job process, with its runtime loaded, is over it, so it ends the same way)
        nxt = api.post("/v1/jobs", json={"kind": "quantize", "model_id": model["id"], "config": {
            "method": "dynamic_int8", "benchmark": {"batch_sizes": [1], "repeats": 1, "warmup": 0}}}).json()
        nxt, _ = wait_terminal(api, nxt["id"])
        assert nxt["worker"] == job["worker"] and nxt["attempts"] == 1, nxt
        assert nxt["status"] == "failed" and nxt["error"]["code"] == "out_of_memory", nxt
        assert w.proc.poll() is None
