"""The job process is untrusted: its sandbox, and a supervisor that believes nothing it says.

End to end through the API and a real worker on PostgreSQL and Redis, with keys for two owners. The job process is
put under an attacker's control by a job plugin (tests/e2e/hostile_job.py) that does what a TorchScript model does
once it runs code: the sandbox must hold, the forged results of the attack run must fail the job `result_invalid`
with a security event, nothing may be written outside the job's folder, and the other owner's next job on the same
worker must run clean.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import REQUIRE_SERVICES
from tests.e2e import hostile_job
from tests.e2e.conftest import production_settings, wait_terminal
from tests.helpers import mlp_onnx_bytes

pytestmark = pytest.mark.slow
HOSTILE = Path(hostile_job.__file__).resolve()


def _marked(marker: bytes) -> bytes:
    import onnx

    model = onnx.load_from_string(mlp_onnx_bytes(hidden=32))
    model.doc_string = marker.decode()
    return model.SerializeToString()


def _upload(api, key: str, data: bytes, name: str) -> str:
    resp = api.post("/v1/models", files={"file": (name, data)}, headers={"Authorization": f"Bearer {key}"})
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def _run(api, key: str, model_id: str) -> dict:
    resp = api.post("/v1/jobs", json={"kind": "quantize", "model_id": model_id, "config": {
        "method": "dynamic_int8", "benchmark": {"batch_sizes": [1], "repeats": 3, "warmup": 1}}},
        headers={"Authorization": f"Bearer {key}"})
    assert resp.status_code == 202, resp.text
    job, _ = wait_terminal(_Authed(api, key), resp.json()["id"], timeout=240)
    return job


class _Authed:
    """The test client with one owner's key on every request (wait_terminal's calls included)."""

    def __init__(self, api, key: str):
        self.api, self.headers = api, {"Authorization": f"Bearer {key}"}

    def get(self, url, **kw):
        return self.api.get(url, headers=self.headers, **kw)

    def stream(self, method, url, headers=None, **kw):
        return self.api.stream(method, url, headers={**self.headers, **(headers or {})}, **kw)


def _canaries(settings) -> list[Path]:
    """Every place hostile_job tried to write, that exists."""
    import torch

    code = Path(__file__).resolve().parents[2]
    places = [settings.data_dir, code / "worker", Path(json.__file__).resolve().parent.parent,
              Path(torch.__file__).parents[1]]
    places += [p for p in (settings.data_dir / "jobs").glob("*") if p.is_dir()]
    names = [hostile_job.CANARY, f"{hostile_job.CANARY}.from_file", f"{hostile_job.CANARY}.save"]
    return [p / n for p in places for n in names if (p / n).exists()]


@pytest.fixture(params=["all-layers", "without-bubblewrap"])
def layers(request, tmp_path, monkeypatch):
    """The worker with every layer, and with bubblewrap out of its PATH (as in a container that cannot create user
    namespaces): Landlock and seccomp alone must hold the same line."""
    if request.param == "without-bubblewrap":
        bare = tmp_path / "bin"
        bare.mkdir()
        monkeypatch.setenv("PATH", str(bare))
    return request.param


def test_a_job_process_under_attack_gets_nothing_out(request, tmp_path, start_worker, monkeypatch, layers):
    from fastapi.testclient import TestClient

    from app.auth.keys import create_key
    from app.core.db import Database
    from app.main import create_app

    settings = production_settings(request, tmp_path, auth="required", job_plugins=str(HOSTILE))
    db = Database(settings)
    with db.session() as session:
        _, alice = create_key(session, "alice")
        _, bob = create_key(session, "bob")
        session.commit()
    db.dispose()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", hostile_job.SECRET)  # a credential in the worker's environment
    worker = start_worker(settings, "w1@test")
    try:
        with TestClient(create_app(settings), raise_server_exceptions=False) as api:
            # 1. Every way out, tried from inside the job process.
            probe = _run(api, alice, _upload(api, alice, _marked(hostile_job.PROBE), "probe.onnx"))
            assert probe["status"] == "failed" and probe["error"]["message"].startswith("probe:"), probe
            attempts = json.loads(probe["error"]["message"].removeprefix("probe:"))
            assert attempts.pop("control_write_own_work") is True
            assert len(attempts) >= 15 and not any(attempts.values()), attempts
            sandbox = api.get("/v1/capabilities", headers={"Authorization": f"Bearer {alice}"}).json()
            layers_on = sandbox["workers"][0]["sandbox"]["layers"]
            assert layers_on["namespaces"] is (layers == "all-layers") and layers_on["landlock"], layers_on

            # 2. The attack run's forged result: the worker's environment named as the artifact, then a crash.
            forged = _run(api, alice, _upload(api, alice, _marked(hostile_job.FORGE_PATH), "forge.onnx"))
            assert forged["status"] == "failed" and forged["error"]["code"] == "result_invalid", forged
            assert forged["artifact_id"] is None

            # 3. A well-formed result whose artifact is a link to the worker's environment.
            linked = _run(api, alice, _upload(api, alice, _marked(hostile_job.FORGE_LINK), "link.onnx"))
            assert linked["status"] == "failed" and linked["error"]["code"] == "result_invalid", linked
            assert "link" in linked["error"]["message"]

            # Nothing of it was stored or is served.
            assert linked["artifact_id"] is None
            stored = [p for p in (settings.data_dir / "storage" / "objects").rglob("*") if p.is_file()]
            assert stored and not any(hostile_job.SECRET.encode() in p.read_bytes() for p in stored)

            # 4. The other owner's next job on the same worker runs clean.
            clean = _run(api, bob, _upload(api, bob, mlp_onnx_bytes(hidden=32), "clean.onnx"))
            assert clean["status"] == "succeeded", clean
            content = api.get(f"/v1/artifacts/{clean['artifact_id']}/content",
                              headers={"Authorization": f"Bearer {bob}"})
            assert content.status_code == 200
            import onnx

            onnx.load_from_string(content.content)  # an ONNX model, not anybody's environment
            assert hostile_job.SECRET.encode() not in content.content
    finally:
        worker.stop()
    assert _canaries(settings) == []
    log = worker.log.read_text()
    events = [line for line in log.splitlines() if "security event" in line]
    assert len(events) >= 2 and all("alice" in line for line in events), events
    assert hostile_job.SECRET not in log


def test_a_job_that_fills_its_work_folder_is_stopped_at_the_disk_limit(tmp_path, start_worker):
    from fastapi.testclient import TestClient

    from app.main import create_app
    from tests.app.test_api_uploads import upload_model
    from tests.conftest import make_settings
    from tests.e2e.conftest import FAST

    settings = make_settings(tmp_path, "sqlite", "filesystem", job_plugins=str(HOSTILE),
                             job_disk_limit_bytes=8 * 1024 * 1024, **FAST)
    start_worker(settings)
    with TestClient(create_app(settings), raise_server_exceptions=False) as api:
        model = upload_model(api, _marked(hostile_job.DISK)).json()
        resp = api.post("/v1/jobs", json={"kind": "quantize", "model_id": model["id"],
                                          "config": {"method": "dynamic_int8"}})
        job, _ = wait_terminal(api, resp.json()["id"], timeout=120)
    assert job["status"] == "failed" and job["error"]["code"] == "disk_limit", job
    assert "disk limit of 8388608 bytes" in job["error"]["message"]
    assert not list((settings.data_dir / "jobs").glob("*/*/work/fill-*"))  # the job's folder is gone


def test_the_sandbox_self_test_holds_with_each_layer_alone():
    """Each layer confines a job process by itself where the machine has it: namespaces (bubblewrap) and Landlock
    each keep files, the network, the worker's environment and signals out of reach; seccomp stops new processes.
    With no layer at all the same checks fail, so they test something."""
    from worker import sandbox

    found = sandbox.support()
    if not found.namespaces and REQUIRE_SERVICES:
        pytest.fail(f"bubblewrap is required in CI: {found.namespaces_reason}")
    if found.landlock_abi == 0 or not found.seccomp:
        pytest.skip("this kernel lacks Landlock or seccomp")
    assert found.confined and all(found.checks.values()), found.checks
    variants = {"landlock + seccomp": replace(found, namespaces=False)}
    if found.namespaces:
        variants["namespaces + seccomp"] = replace(found, landlock_abi=0)
    for name, variant in variants.items():
        checks = sandbox.self_test(variant)
        assert checks and all(checks.values()), (name, checks)
    bare = sandbox.self_test(replace(found, namespaces=False, landlock_abi=0, seccomp=False))
    assert not any(bare[k] for k in ("read_outside", "write_outside", "network", "new_process")), bare


def test_strict_mode_refuses_torchscript_where_a_layer_is_missing():
    from worker import sandbox

    found = sandbox.support()
    weak = replace(found, namespaces=False, landlock_abi=0)
    assert weak.refusal("torchscript") is not None and "landlock" in weak.refusal("torchscript")
    assert weak.refusal("onnx") is None
    assert replace(weak, mode="permissive").refusal("torchscript") is None
    if found.confined:
        assert found.refusal("torchscript") is None


def _hostile_torchscript(path: Path, canary: Path) -> bytes:
    """The attack run's model: a TorchScript forward that writes a file outside the job folder with
    torch.from_file(shared=True) and opens a path with torch.save (which reaches /proc/self/fd/N)."""
    import io

    import torch

    class Hostile(torch.nn.Module):
        def __init__(self, target: str):
            super().__init__()
            self.target = target
            self.fc = torch.nn.Linear(64, 10)

        def forward(self, x):
            written = torch.from_file(self.target, shared=True, size=8)
            written.fill_(1.0)
            torch.save(x, self.target + ".save")
            return self.fc(x)

    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(Hostile(str(canary))), buf)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def test_a_hostile_torchscript_model_is_refused_at_upload_and_again_by_the_worker(tmp_path, start_worker):
    """Through the API: the upload is refused (its code calls a file operator). Stored behind the API's back (as if
    the upload check missed it), the worker's check of the loaded graph refuses it before it runs: the canary file is
    never written, the job fails, nothing is served, and the next job on the worker runs clean."""
    from fastapi.testclient import TestClient

    from app.core.db import Database
    from app.core.storage import make_storage
    from app.core.tables import ModelRow
    from app.main import create_app
    from tests.app.test_api_uploads import upload_dataset, upload_model
    from tests.conftest import make_settings
    from tests.e2e.conftest import FAST
    from tests.helpers import digits_npz_bytes

    settings = make_settings(tmp_path, "sqlite", "filesystem", **FAST)
    canary = tmp_path / "canary-written-by-model"
    data = _hostile_torchscript(tmp_path / "hostile.pt", canary)
    start_worker(settings)
    with TestClient(create_app(settings), raise_server_exceptions=False) as api:
        refused = upload_model(api, data, name="hostile.pt")
        assert refused.status_code == 422 and refused.json()["error"]["code"] == "unsafe_torchscript", refused.text
        assert "aten::save" in refused.json()["error"]["message"] or "from_file" in refused.json()["error"]["message"]

        sha, size = make_storage(settings).put_file(tmp_path / "hostile.pt")
        db = Database(settings)
        with db.session() as session:
            row = ModelRow(owner=settings.default_owner, name="hostile.pt", format="torchscript", size_bytes=size,
                           sha256=sha, info={})
            session.add(row)
            session.commit()
            model_id = row.id
        db.dispose()
        dataset = upload_dataset(api, digits_npz_bytes()).json()
        resp = api.post("/v1/jobs", json={"kind": "quantize", "model_id": model_id, "dataset_id": dataset["id"],
                                          "config": {"method": "dynamic_int8"}})
        assert resp.status_code == 202, resp.text
        job, _ = wait_terminal(api, resp.json()["id"], timeout=120)
        assert job["status"] == "failed" and job["error"]["code"] == "invalid_model", job
        assert "aten::from_file" in job["error"]["message"] or "aten::save" in job["error"]["message"]
        assert job["artifact_id"] is None

        clean = upload_model(api, mlp_onnx_bytes(hidden=32)).json()
        resp = api.post("/v1/jobs", json={"kind": "quantize", "model_id": clean["id"],
                                          "config": {"method": "dynamic_int8"}})
        after, _ = wait_terminal(api, resp.json()["id"], timeout=120)
        assert after["status"] == "succeeded", after
    assert not canary.exists() and not Path(f"{canary}.save").exists()
