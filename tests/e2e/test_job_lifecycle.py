"""A real job from upload to download on a real worker process: PostgreSQL + Redis, and the embedded default."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from tests.app.test_api_uploads import upload_dataset, upload_model
from tests.e2e.conftest import wait_terminal
from tests.helpers import digits, digits_npz_bytes, mlp_onnx_bytes

pytestmark = pytest.mark.slow

QUICK_BENCH = {"batch_sizes": [1, 32], "repeats": 5, "warmup": 1}


def submit(api, model_id, dataset_id=None, **config):
    body = {"kind": "quantize", "model_id": model_id, "device": "auto",
            "config": {"method": "static_int8", "benchmark": QUICK_BENCH, **config}}
    if dataset_id:
        body["dataset_id"] = dataset_id
    resp = api.post("/v1/jobs", json=body)
    assert resp.status_code == 202, resp.text
    return resp.json()


def test_static_int8_from_upload_to_download(api, stack, start_worker, tmp_path):
    import onnxruntime as ort

    worker = start_worker(stack, "w1@test")
    model = upload_model(api, mlp_onnx_bytes()).json()
    dataset = upload_dataset(api, digits_npz_bytes()).json()
    job = submit(api, model["id"], dataset["id"], calibration={"samples": 256, "method": "minmax"})
    job, events = wait_terminal(api, job["id"])
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 1 and job["worker"] == worker.name and job["device"] == "cpu"
    assert job["progress"] == 1.0 and job["started_at"] and job["finished_at"]
    statuses = [e["status"] for e in events]
    assert statuses[0] == "queued" and statuses[-1] == "succeeded" and "running" in statuses
    progress = [e["progress"] for e in events if e["status"] == "running"]
    assert progress == sorted(progress) and len(set(progress)) >= 3

    m = job["metrics"]
    base, res = m["baseline"], m["result"]
    assert res["size_bytes"] < 0.5 * base["size_bytes"]
    assert set(base["latency_ms"]) == set(res["latency_ms"]) == {"1", "32"}
    assert base["accuracy"] > 0.9 and res["accuracy"] >= base["accuracy"] - 0.03
    assert res["agreement"] > 0.9

    art = api.get(f"/v1/artifacts/{job['artifact_id']}").json()
    assert m["provenance"] == {"model_sha256": model["sha256"], "dataset_sha256": dataset["sha256"],
                               "artifact_sha256": art["sha256"]}
    assert {"onnx", "onnxruntime", "numpy"} <= set(m["versions"])
    assert art["job_id"] == job["id"] and art["format"] == "onnx" and art["filename"].endswith(".onnx")
    full = api.get(f"/v1/artifacts/{art['id']}/content")
    assert full.status_code == 200 and len(full.content) == art["size_bytes"] == res["size_bytes"]
    assert hashlib.sha256(full.content).hexdigest() == art["sha256"]
    assert full.headers["etag"] == f'"{art["sha256"]}"' and art["filename"] in full.headers["content-disposition"]
    part = api.get(f"/v1/artifacts/{art['id']}/content", headers={"Range": "bytes=10-99"})
    assert part.status_code == 206 and part.content == full.content[10:100]
    assert part.headers["content-range"] == f"bytes 10-99/{art['size_bytes']}"
    assert api.get(f"/v1/artifacts/{art['id']}/content", headers={"If-None-Match": full.headers["etag"]}).status_code == 304
    assert api.get(f"/v1/artifacts/{art['id']}/content", headers={"Range": "bytes=999999999-"}).status_code == 416

    sess = ort.InferenceSession(full.content, providers=["CPUExecutionProvider"])
    _, _, xt, yt = digits()
    acc = float((sess.run(None, {"x": xt})[0].argmax(1) == yt).mean())
    assert abs(acc - res["accuracy"]) < 1e-6
    assert not (stack.data_dir / "work").exists() or not any((stack.data_dir / "work").iterdir())


def test_dynamic_int8_without_dataset(api, stack, start_worker):
    start_worker(stack, "w1@test")
    model = upload_model(api, mlp_onnx_bytes()).json()
    job = submit(api, model["id"], method="dynamic_int8")
    job, _ = wait_terminal(api, job["id"])
    assert job["status"] == "succeeded", job
    res = job["metrics"]["result"]
    assert "accuracy" not in res and res["cosine"] > 0.99 and res["sqnr_db"] > 15


def test_engine_error_fails_the_job_clearly(api, stack, start_worker):
    """A dataset the API cannot fault (the right names and shapes) but the engine refuses (values that are not
    finite): the job fails at once, with the engine's code, and is not retried."""
    start_worker(stack, "w1@test")
    model = upload_model(api, mlp_onnx_bytes()).json()
    import io

    buf = io.BytesIO()
    np.savez(buf, x=np.full((20, 64), np.nan, np.float32))
    dataset = upload_dataset(api, buf.getvalue()).json()
    job = submit(api, model["id"], dataset["id"])
    job, _ = wait_terminal(api, job["id"])
    assert job["status"] == "failed" and job["attempts"] == 1
    assert job["error"]["code"] in ("invalid_dataset", "invalid_model") and job["error"]["message"]
    assert job["artifact_id"] is None and job["metrics"] is None
