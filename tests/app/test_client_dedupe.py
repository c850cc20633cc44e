"""The SDK and CLI do not upload a file the service already stores: the file is hashed locally (streamed), the
owner's models (datasets) are asked for with ?sha256=, and an existing record is used. A service without the filter
answers its plain list, whose records are checked: the file is uploaded unless one of them really has the content.

Against a scripted local server (what the client sends and does), and against a real `distillery serve` (the
server's side: `?sha256=` filters, a repeated upload answers 200 with the existing record and
`X-Distillery-Existing: true`)."""
from __future__ import annotations

import hashlib
import json
import subprocess

import pytest

from app.cli import main
from app.client import Client, file_sha256
from app.client.client import ENDPOINTS
from tests.app.test_client import JOB, MODEL, FakeApi, fast_client, start_server
from tests.e2e.test_cli_client import as_json, distillery
from tests.helpers import digits_npz_bytes, write_mlp_onnx

DATASET = {"id": "c" * 32, "name": "d.npz", "size_bytes": 10, "sha256": "1" * 64, "owner": "o",
           "created_at": "2026-01-01T00:00:00Z", "arrays": {}, "inputs": ["x"], "n_samples": 10, "n_test": 0,
           "split": "seeded", "has_labels": True, "num_classes": 10}


@pytest.fixture
def fake():
    f = FakeApi()
    yield f
    f.close()


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"model bytes " * 100_000)  # over one read chunk: hashed in pieces
    return path


def page(*items) -> tuple[int, dict]:
    return 200, {"items": list(items), "next_cursor": None}


def posts(fake: FakeApi, path: str) -> int:
    return sum(r["method"] == "POST" and r["path"] == path for r in fake.requests)


def lookups(fake: FakeApi, path: str) -> list[list[str]]:
    return [r["query"].get("sha256") for r in fake.requests if r["method"] == "GET" and r["path"] == path]


def test_file_sha256_is_the_files_hash(model_file):
    assert file_sha256(model_file) == hashlib.sha256(model_file.read_bytes()).hexdigest()
    with pytest.raises(FileNotFoundError):
        file_sha256(model_file.with_name("missing.onnx"))


def test_a_stored_model_is_used_without_uploading(fake, model_file):
    digest = file_sha256(model_file)
    fake.routes["GET /v1/models"] = [page({**MODEL, "sha256": digest})]
    fake.routes["POST /v1/jobs"] = [(202, JOB)]
    with fast_client(fake.url) as client:
        job = client.quantize(model_file, method="dynamic_int8")
        assert client.ensure_model(model_file) == (client.find_model(digest), True)
    assert posts(fake, "/v1/models") == 0
    assert lookups(fake, "/v1/models")[0] == [digest]
    assert json.loads(next(r for r in fake.requests if r["path"] == "/v1/jobs")["body"])["model_id"] == MODEL["id"]
    assert job.id == JOB["id"]


def test_a_service_without_the_filter_gets_the_upload(fake, model_file):
    # the filter is ignored: the newest models come back, none with this content
    fake.routes["GET /v1/models"] = [page(MODEL, {**MODEL, "id": "e" * 32, "sha256": "f" * 64})]
    fake.routes["POST /v1/models"] = [(201, MODEL)]
    with fast_client(fake.url) as client:
        model, existing = client.ensure_model(model_file, name="m")
    assert model.id == MODEL["id"] and existing is False and posts(fake, "/v1/models") == 1


def test_an_unfiltered_list_that_holds_the_content_is_used(fake, model_file):
    digest = file_sha256(model_file)
    older = {**MODEL, "id": "1" * 32, "sha256": digest.upper(), "created_at": "2025-01-01T00:00:00Z"}
    newer = {**MODEL, "id": "2" * 32, "sha256": digest, "created_at": "2025-06-01T00:00:00Z"}
    fake.routes["GET /v1/models"] = [page(MODEL, newer, older)]
    with fast_client(fake.url) as client:
        model, existing = client.ensure_model(model_file)
    # of several with the content (stored before uploads were deduplicated), the oldest: results gather on one
    assert model.id == older["id"] and existing and posts(fake, "/v1/models") == 0


def test_a_service_that_refuses_the_filter_gets_the_upload(fake, model_file):
    fake.routes["GET /v1/models"] = [(422, {"error": {"code": "validation_error", "message": "sha256?"}})]
    fake.routes["POST /v1/models"] = [(201, MODEL)]
    with fast_client(fake.url) as client:
        assert client.ensure_model(model_file)[1] is False
    assert posts(fake, "/v1/models") == 1


def test_the_services_own_dedupe_answer_is_reported(fake, model_file):
    def existing(handler):  # 200 (not 201) and the header: the service already had this content
        data = json.dumps(MODEL).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("X-Distillery-Existing", "true")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    fake.routes["GET /v1/models"] = [page()]
    fake.routes["POST /v1/models"] = [existing]
    with fast_client(fake.url) as client:
        model, existing = client.ensure_model(model_file)
    assert model.id == MODEL["id"] and existing is True and posts(fake, "/v1/models") == 1


def test_labels_asked_for_are_merged_into_a_reused_model(fake, model_file):
    digest = file_sha256(model_file)
    fake.routes["GET /v1/models"] = [page({**MODEL, "sha256": digest})]
    fake.routes[f"PATCH /v1/models/{MODEL['id']}"] = [(200, {**MODEL, "sha256": digest, "labels": {"team": "a"}})]
    with fast_client(fake.url) as client:
        model, existing = client.ensure_model(model_file, labels={"team": "a"})
    assert existing and model.labels == {"team": "a"} and posts(fake, "/v1/models") == 0
    patch = next(r for r in fake.requests if r["method"] == "PATCH")
    assert json.loads(patch["body"]) == {"labels": {"team": "a"}}


def test_a_stored_dataset_is_used_without_uploading(fake, tmp_path):
    data = tmp_path / "d.npz"
    data.write_bytes(digits_npz_bytes())
    digest = file_sha256(data)
    fake.routes["GET /v1/datasets"] = [page({**DATASET, "sha256": digest})]
    fake.routes["POST /v1/jobs"] = [(202, JOB)]
    with fast_client(fake.url) as client:
        client.submit_job("quantize", MODEL["id"], {"method": "static_int8"}, dataset=data)
    assert posts(fake, "/v1/datasets") == 0 and lookups(fake, "/v1/datasets") == [[digest]]
    assert json.loads(next(r for r in fake.requests if r["path"] == "/v1/jobs")["body"])["dataset_id"] == "c" * 32


def test_the_cli_says_it_used_the_stored_model(capsys, monkeypatch, fake, model_file):
    monkeypatch.delenv("DISTILLERY_URL", raising=False)
    digest = file_sha256(model_file)
    fake.routes["GET /v1/models"] = [page({**MODEL, "sha256": digest})]
    fake.routes["POST /v1/jobs"] = [(202, JOB)]
    code = main(["jobs", "submit", "--kind", "quantize", "--model", str(model_file), "--config",
                 '{"method": "fp16"}', "--url", fake.url])
    out, err = capsys.readouterr()
    assert code == 0 and f"using model {MODEL['id']} (already uploaded)" in err and "submitted" in err
    code = main(["jobs", "submit", "--kind", "quantize", "--model", str(model_file), "--config",
                 '{"method": "fp16"}', "--url", fake.url, "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["id"] == JOB["id"]
    assert doc["uploads"]["model"]["id"] == MODEL["id"] and doc["uploads"]["model"]["existing"] is True
    code = main(["models", "upload", str(model_file), "--name", "other", "--url", fake.url, "--json"])
    out, err = capsys.readouterr()
    assert code == 0 and json.loads(out)["existing"] is True and json.loads(out)["name"] == MODEL["name"]
    assert err == ""  # --json: no notes
    code = main(["models", "upload", str(model_file), "--name", "other", "--url", fake.url])
    out, err = capsys.readouterr()
    assert code == 0 and f"id        {MODEL['id']}" in out
    assert f"using model {MODEL['id']} (already uploaded; stored as 'm', --name not applied)" in err
    assert posts(fake, "/v1/models") == 0


def test_the_lookups_are_not_endpoints_of_their_own():
    assert "find_model" not in ENDPOINTS.values() and ENDPOINTS[("GET", "/v1/models")] == "list_models"


# -- against a real service ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from start_server(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    (root / "digits.npz").write_bytes(digits_npz_bytes())
    return {"model": write_mlp_onnx(root / "mlp.onnx"), "other": write_mlp_onnx(root / "mlp2.onnx", seed=1),
            "data": root / "digits.npz"}


def _counting(server) -> tuple[Client, list]:
    sent: list = []
    return Client(server.url, server.api_key, event_hooks={"request": [sent.append]}), sent


@pytest.mark.slow
def test_sdk_runs_on_one_file_gather_on_one_model(server, files):
    client, sent = _counting(server)
    with client:
        jobs = [client.quantize(files["model"], method="fp16", dataset=files["data"],
                                benchmark={"batch_sizes": [1], "repeats": 2, "warmup": 1}) for _ in range(3)]
        assert len({j.model_id for j in jobs}) == 1 and len({j.dataset_id for j in jobs}) == 1
        uploads = [r for r in sent if r.method == "POST" and r.url.path in ("/v1/models", "/v1/datasets")]
        assert len(uploads) == 2  # the first run's model and dataset, nothing after
        assert {j.id for j in client.list_model_jobs(jobs[0].model_id).items} >= {j.id for j in jobs}


@pytest.mark.slow
def test_server_filters_the_list_by_content(server, files):
    """Needs the server side: GET /v1/models?sha256= and /v1/datasets?sha256= filter by content."""
    with server.client() as client:
        mine, _ = client.ensure_model(files["model"])
        other, _ = client.ensure_model(files["other"])
        listed = client.list_models(sha256=file_sha256(files["other"])).items
        assert [m.id for m in listed] == [other.id] and mine.id != other.id
        assert client.list_models(sha256="0" * 64).items == []
        data, _ = client.ensure_dataset(files["data"])
        assert [d.id for d in client.list_datasets(sha256=file_sha256(files["data"])).items] == [data.id]
        assert client.list_datasets(sha256="0" * 64).items == []


@pytest.mark.slow
def test_server_answers_a_repeated_upload_with_the_stored_record(server, files):
    """Needs the server side: a POST of stored content answers 200 with the record and X-Distillery-Existing."""
    answers: list = []
    with Client(server.url, server.api_key, event_hooks={"response": [answers.append]}) as client:
        first = client.upload_model(files["other"], name="first")
        again = client.upload_model(files["other"], name="again")
        assert again.id == first.id and again.name == first.name
        assert answers[-1].status_code == 200 and answers[-1].headers.get("x-distillery-existing") == "true"
        data = client.upload_dataset(files["data"])
        assert client.upload_dataset(files["data"]).id == data.id


@pytest.mark.slow
def test_cli_runs_on_one_file_gather_on_one_model(server, files, tmp_path):
    def submit(*extra: str) -> subprocess.CompletedProcess:
        proc = distillery(server, "jobs", "submit", "--kind", "quantize", "--model", str(files["model"]),
                          "--dataset", str(files["data"]), "--config", '{"method": "fp16"}', *extra, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        return proc

    first = as_json(submit("--json"))
    text = submit()
    again = as_json(submit("--json"))
    assert again["model_id"] == first["model_id"] and again["dataset_id"] == first["dataset_id"]
    assert f"using model {first['model_id']} (already uploaded)" in text.stderr
    assert f"using dataset {first['dataset_id']} (already uploaded)" in text.stderr
    assert again["uploads"]["model"]["existing"] is True and again["uploads"]["dataset"]["existing"] is True
    shown = as_json(distillery(server, "models", "upload", str(files["model"]), "--json", cwd=tmp_path))
    assert shown["id"] == first["model_id"] and shown["existing"] is True
