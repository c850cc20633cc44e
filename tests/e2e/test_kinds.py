"""One job of each kind, and a TorchScript upload, through the API on a real worker (embedded default)."""
from __future__ import annotations

import io

import numpy as np
import pytest

from tests.app.test_api_uploads import upload_dataset, upload_model
from tests.conftest import make_settings
from tests.e2e.conftest import FAST, WorkerProc, wait_terminal
from tests.helpers import digits, digits_npz_bytes, fit_mlp, mlp_onnx_bytes

pytestmark = pytest.mark.slow
QUICK = {"batch_sizes": [1, 32], "repeats": 5, "warmup": 1}


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    """One service and worker for the module: each test uploads its own model and runs its own jobs."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    folder = tmp_path_factory.mktemp("kinds")
    settings = make_settings(folder, "sqlite", "filesystem", **FAST)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        worker = WorkerProc(settings, "kinds@test", folder / "worker.log", "cpu,gpu")
        try:
            yield client
        finally:
            worker.discard()


def run(api, body) -> dict:
    resp = api.post("/v1/jobs", json=body)
    assert resp.status_code == 202, resp.text
    job, _ = wait_terminal(api, resp.json()["id"], timeout=300)
    assert job["status"] == "succeeded", job["error"]
    return job


def test_prune_channels_with_fine_tune(api):
    model = upload_model(api, mlp_onnx_bytes()).json()
    data = upload_dataset(api, digits_npz_bytes()).json()
    job = run(api, {"kind": "prune", "model_id": model["id"], "dataset_id": data["id"], "config": {
        "method": "channels", "ratio": 0.5, "fine_tune": {"epochs": 2, "lr": 0.003}, "benchmark": QUICK}})
    m = job["metrics"]
    assert m["result"]["params"] < 0.6 * m["baseline"]["params"]
    assert m["ratios"]["macs"] < 0.6
    assert m["result"]["accuracy"] > 0.9
    art = api.get(f"/v1/artifacts/{job['artifact_id']}").json()
    assert art["format"] == "onnx"


def test_prune_magnitude_reports_sparsity(api):
    model = upload_model(api, mlp_onnx_bytes()).json()
    data = upload_dataset(api, digits_npz_bytes()).json()
    job = run(api, {"kind": "prune", "model_id": model["id"], "dataset_id": data["id"], "config": {
        "method": "magnitude", "sparsity": 0.5, "scope": "layer", "benchmark": QUICK}})
    facts = job["metrics"]["method"]
    assert facts["name"] == "magnitude" and abs(facts["sparsity"] - 0.5) < 0.02
    assert all(abs(layer["sparsity"] - 0.5) < 0.02 for layer in facts["layers"])
    # the same pruning done by hand in numpy gives the same accuracy (this random-feature MLP is fragile)
    x, y, xt, yt = digits()
    w1, b1, w2, b2 = fit_mlp(x, y, 256, 0)

    def prune(w):
        return np.where(np.abs(w) < np.quantile(np.abs(w), 0.5), 0, w)

    by_hand = float(((np.maximum(xt @ prune(w1) + b1, 0) @ prune(w2) + b2).argmax(1) == yt).mean())
    assert job["metrics"]["result"]["accuracy"] == pytest.approx(by_hand, abs=1e-6)
    tuned = run(api, {"kind": "prune", "model_id": model["id"], "dataset_id": data["id"], "config": {
        "method": "magnitude", "sparsity": 0.5, "scope": "layer", "fine_tune": {"epochs": 3, "lr": 0.003},
        "benchmark": QUICK}})
    assert abs(tuned["metrics"]["method"]["sparsity"] - 0.5) < 0.02
    assert tuned["metrics"]["result"]["accuracy"] > by_hand + 0.3


def test_distill_into_a_small_mlp_on_a_builtin_dataset(api):
    model = upload_model(api, mlp_onnx_bytes()).json()
    job = run(api, {"kind": "distill", "model_id": model["id"], "dataset_id": "builtin:digits", "config": {
        "student": {"arch": "mlp", "hidden": [32]}, "epochs": 20, "lr": 0.01, "compare_baseline": True,
        "benchmark": QUICK}})
    m = job["metrics"]
    assert m["result"]["params"] * 4 < m["baseline"]["params"]
    assert m["result"]["accuracy"] > 0.9
    comparison = m["method"]["comparison"]
    assert {"kd", "labels_only", "delta", "split", "kept", "kept_reason", "chosen_on"} <= set(comparison)
    assert comparison["split"] == "test" and comparison["chosen_on"] == "validation"
    assert comparison["kept"] in ("kd", "labels_only") and "validation rows" in comparison["kept_reason"]
    # the artifact is the student that was kept: its measured test accuracy is that student's
    assert m["result"]["accuracy"] == pytest.approx(comparison[comparison["kept"]], abs=1e-6)
    # 20 epochs of 1,293 rows at batch 128 are 220 steps: the default min_steps trains on to 1,001
    assert m["method"]["min_steps"] == 1000 and m["method"]["steps"] >= 1000
    assert job["dataset_id"] == "builtin:digits"


def test_torchscript_upload_quantized_back_to_torchscript(api, tmp_path):
    import torch

    x, y, _, _ = digits()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        opt.step()
    buf = io.BytesIO()
    torch.jit.save(torch.jit.trace(net.eval(), torch.from_numpy(x[:2])), buf)
    model = upload_model(api, buf.getvalue(), name="mlp.pt").json()
    assert model["format"] == "torchscript" and model["inspection"]["params"] == sum(p.numel() for p in net.parameters())
    no_data = api.post("/v1/jobs", json={"kind": "quantize", "model_id": model["id"],
                                         "config": {"method": "dynamic_int8"}})
    assert no_data.status_code == 422 and no_data.json()["error"]["code"] == "dataset_required"
    data = upload_dataset(api, digits_npz_bytes()).json()
    job = run(api, {"kind": "quantize", "model_id": model["id"], "dataset_id": data["id"], "config": {
        "method": "dynamic_int8", "benchmark": QUICK}})
    art = api.get(f"/v1/artifacts/{job['artifact_id']}").json()
    assert art["format"] == "torchscript" and art["filename"].endswith(".pt")
    content = api.get(f"/v1/artifacts/{art['id']}/content").content
    loaded = torch.jit.load(io.BytesIO(content))
    out = loaded(torch.from_numpy(x[:5])).detach().numpy()
    assert out.shape == (5, 10) and np.isfinite(out).all()
    assert job["metrics"]["result"]["accuracy"] > 0.85


def test_capabilities_come_from_the_live_worker(api):
    caps = api.get("/v1/capabilities").json()
    methods = {(m["kind"], m["method"]): m for m in caps["methods"]}
    assert {("quantize", "static_int8"), ("quantize", "auto"), ("prune", "channels"), ("distill", "kd")} <= set(methods)
    assert methods[("quantize", "static_int8")]["output_formats"] == ["onnx"]
    assert methods[("prune", "channels")]["devices"] == ["cpu"]
    assert caps["builtin_datasets"]["digits"] is True
    assert [w["name"] for w in caps["workers"] if w["live"]] == ["kinds@test"]
