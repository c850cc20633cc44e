"""Jobs are never lost and never run twice at once: SIGKILLed workers, cancel and time limits."""
from __future__ import annotations

import psutil
import pytest

from tests.app.test_api_uploads import upload_dataset, upload_model
from tests.e2e.conftest import production_settings, wait_for, wait_terminal
from tests.e2e.held_job import GATE, HOLD, STAGE, held_model_bytes, release
from tests.helpers import digits_npz_bytes, mlp_onnx_bytes

pytestmark = pytest.mark.slow

QUICK = {"method": "dynamic_int8", "benchmark": {"batch_sizes": [1], "repeats": 1, "warmup": 0}}


def submit_held(api, marker=HOLD, **kw):
    """A job that runs until stopped (HOLD) or until the test releases it (GATE): tests/e2e/held_job.py."""
    model = upload_model(api, held_model_bytes(marker, **kw)).json()
    resp = api.post("/v1/jobs", json={"kind": "quantize", "model_id": model["id"], "config": QUICK})
    assert resp.status_code == 202, resp.text
    return model, resp.json()


def _held(ev):
    return ev["status"] == "running" and ev["stage"] == STAGE


def test_sigkilled_worker_job_finishes_on_another(api, stack, start_worker):
    a = start_worker(stack, "a@test")
    _, job = submit_held(api, GATE)
    wait_for(api, job["id"], _held)
    a.kill9()
    b = start_worker(stack, "b@test")
    seen = {"requeued": False}

    def held_on_b(ev):  # held again after the reaper re-queued it: now on b
        seen["requeued"] |= ev["status"] == "queued" and ev["stage"].startswith("re-queued")
        return seen["requeued"] and _held(ev)

    wait_for(api, job["id"], held_on_b)
    assert release(stack) >= 1
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
        _, job = submit_held(api)
        wait_for(api, job["id"], _held)
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
    _, job = submit_held(api)
    wait_for(api, job["id"], _held)
    resp = api.post(f"/v1/jobs/{job['id']}/cancel")
    assert resp.status_code == 200 and resp.json()["status"] in ("running", "cancelled")
    job, _ = wait_terminal(api, job["id"], timeout=30)
    assert job["status"] == "cancelled" and job["error"]["code"] == "cancelled"
    plain = upload_model(api, mlp_onnx_bytes()).json()
    quick = api.post("/v1/jobs", json={"kind": "quantize", "model_id": plain["id"], "config": QUICK}).json()
    quick, _ = wait_terminal(api, quick["id"])
    assert quick["status"] == "succeeded"


def test_time_limit_kills_the_job_not_the_worker(request, tmp_path, start_worker):
    from fastapi.testclient import TestClient

    from app.main import create_app

    # The limit must let the small job after the held one finish on a busy machine.
    settings = production_settings(request, tmp_path, job_time_limit_s=10.0)
    with TestClient(create_app(settings)) as api:
        w = start_worker(settings, "w@test")
        _, job = submit_held(api)
        job, _ = wait_terminal(api, job["id"])
        assert job["status"] == "failed" and job["error"]["code"] == "timeout"
        assert "time limit of 10 s" in job["error"]["message"]
        assert w.proc.poll() is None
        model = upload_model(api, mlp_onnx_bytes()).json()
        ds = upload_dataset(api, digits_npz_bytes()).json()
        nxt = api.post("/v1/jobs", json={"kind": "quantize", "model_id": model["id"], "dataset_id": ds["id"],
                                         "config": QUICK}).json()
        nxt, _ = wait_terminal(api, nxt["id"])
        assert nxt["status"] == "succeeded", nxt["error"]


def test_memory_limit_fails_with_out_of_memory(request, tmp_path, start_worker):
    from fastapi.testclient import TestClient

    from app.main import create_app

    settings = production_settings(request, tmp_path, job_memory_limit_bytes=40 * 1024**2)
    with TestClient(create_app(settings)) as api:
        w = start_worker(settings, "w@test")
        _, job = submit_held(api)
        job, _ = wait_terminal(api, job["id"])
        assert job["status"] == "failed" and job["error"]["code"] == "out_of_memory"
        assert "memory limit" in job["error"]["message"] and w.proc.poll() is None
        # the worker takes the next job: claimed, run and recorded by the same worker (under the same 40 MB limit
        # any job process, with its runtime loaded, is over it, so it ends the same way)
        plain = upload_model(api, mlp_onnx_bytes()).json()
        nxt = api.post("/v1/jobs", json={"kind": "quantize", "model_id": plain["id"], "config": QUICK}).json()
        nxt, _ = wait_terminal(api, nxt["id"])
        assert nxt["worker"] == job["worker"] and nxt["attempts"] == 1, nxt
        assert nxt["status"] == "failed" and nxt["error"]["code"] == "out_of_memory", nxt
        assert w.proc.poll() is None
