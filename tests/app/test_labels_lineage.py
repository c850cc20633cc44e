"""Labels on models and jobs (validation, filters with pagination and owner isolation) on SQLite and PostgreSQL;
artifacts as input models and lineage after a real prune -> quantize on a real worker."""
from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from app.auth.keys import create_key
from app.core.db import Database
from app.main import create_app
from tests.app.test_api_uploads import _error, upload_dataset, upload_model
from tests.conftest import make_settings
from tests.e2e.conftest import FAST, start_worker, wait_terminal  # noqa: F401 - start_worker is a fixture
from tests.helpers import digits_npz_bytes, mlp_onnx_bytes

QUICK = {"batch_sizes": [1, 32], "repeats": 5, "warmup": 1}


def upload_labelled(client, labels, name="mlp.onnx", hidden=256):
    files = {"file": ("mlp.onnx", mlp_onnx_bytes(hidden=hidden), "application/octet-stream")}
    data = {"name": name}
    if labels is not None:
        data["labels"] = labels if isinstance(labels, str) else json.dumps(labels)
    return client.post("/v1/models", files=files, data=data)


def submit(client, model_id, labels=None, **extra):
    body = {"kind": "quantize", "model_id": model_id, "config": {"method": "dynamic_int8"}, **extra}
    if labels is not None:
        body["labels"] = labels
    return client.post("/v1/jobs", json=body)


def ids(resp) -> list[str]:
    assert resp.status_code == 200, resp.text
    return [item["id"] for item in resp.json()["items"]]


def test_labels_are_stored_returned_and_patched(client):
    resp = upload_labelled(client, {"team": "search", "run": "r42"})
    assert resp.status_code == 201, resp.text
    model = resp.json()
    assert model["labels"] == {"run": "r42", "team": "search"} and model["source_artifact_id"] is None
    assert client.get(f"/v1/models/{model['id']}").json()["labels"] == model["labels"]
    assert upload_labelled(client, None, hidden=16).json()["labels"] == {}

    job = submit(client, model["id"], {"team": "search", "exp.lr": "3e-4"}).json()
    assert job["labels"] == {"exp.lr": "3e-4", "team": "search"} and job["webhook"] is None
    assert client.get(f"/v1/jobs/{job['id']}").json() == job  # the PostgreSQL fast path renders them too

    patched = client.patch(f"/v1/models/{model['id']}", json={"labels": {"run": None, "stage": "prod"}})
    assert patched.status_code == 200, patched.text
    assert patched.json()["labels"] == {"stage": "prod", "team": "search"}
    assert client.get(f"/v1/models/{model['id']}").json()["labels"] == {"stage": "prod", "team": "search"}
    patched = client.patch(f"/v1/jobs/{job['id']}", json={"labels": {"team": "ads"}}).json()
    assert patched["labels"] == {"exp.lr": "3e-4", "team": "ads"}
    assert client.get(f"/v1/jobs/{job['id']}").json()["labels"] == patched["labels"]
    err = _error(client.patch(f"/v1/jobs/{job['id']}", json={"labels": {f"k{i}": "v" for i in range(19)}}), 422,
                 "invalid_label")
    assert err["detail"]["limit"] == 20
    _error(client.patch("/v1/jobs/" + "0" * 32, json={"labels": {}}), 404, "job_not_found")
    _error(client.patch("/v1/models/" + "0" * 32, json={"labels": {}}), 404, "model_not_found")


@pytest.mark.parametrize("labels,label", [
    ({"Team": "search"}, "Team"),
    ({"team space": "x"}, "team space"),
    ({"": "x"}, ""),
    ({"k" * 64: "x"}, "k" * 64),
    ({"team": "v" * 256}, "team"),
    ({"team\n": "x"}, "team\n"),
    ({"team": "nul\x00"}, "team"),
])
def test_bad_labels_are_422_naming_the_label(client, settings, labels, label):
    err = _error(upload_labelled(client, labels), 422, "invalid_label")
    assert err["detail"]["label"] == label and repr(label) in err["message"]
    assert list((settings.storage_dir / "tmp").iterdir()) == []  # the upload is dropped
    assert client.get("/v1/models").json()["items"] == []
    model_id = upload_labelled(client, None).json()["id"]
    err = _error(submit(client, model_id, labels), 422, "invalid_label")
    assert err["detail"]["label"] == label
    assert client.get("/v1/jobs").json()["items"] == []


def test_label_set_bounds_and_shapes(client):
    err = _error(upload_labelled(client, {f"k{i}": "v" for i in range(21)}), 422, "invalid_label")
    assert err["detail"] == {"field": "labels", "limit": 20, "count": 21}
    assert upload_labelled(client, {f"k{i}": "v" * 255 for i in range(20)}).status_code == 201
    _error(upload_labelled(client, "{not json"), 422, "invalid_label")
    _error(upload_labelled(client, '["a", "list"]'), 422, "invalid_label")
    err = _error(upload_labelled(client, '{"team": 5}'), 422, "invalid_label")
    assert err["detail"]["label"] == "team"
    model_id = upload_labelled(client, None).json()["id"]
    err = _error(submit(client, model_id, {"team": 5}), 422, "validation_error")
    assert err["detail"]["errors"][0]["field"] == "labels.team"


def test_label_filters_and_pagination(client):
    model_a = upload_labelled(client, {"team": "search"}, name="a").json()["id"]
    model_b = upload_labelled(client, {"team": "ads"}, name="b", hidden=32).json()["id"]
    upload_labelled(client, {"team": "search", "run": "r1"}, name="c", hidden=48)
    assert ids(client.get("/v1/models", params={"label": "team:search"})) == ids(client.get("/v1/models"))[::2]
    assert len(ids(client.get("/v1/models", params=[("label", "team:search"), ("label", "run")]))) == 1

    jobs = []
    for i in range(7):
        labels = {"team": "search" if i % 2 == 0 else "ads", "run": f"r{i % 3}"}
        jobs.append((submit(client, model_a if i < 5 else model_b, labels).json()["id"], labels))
    newest_first = jobs[::-1]
    search = [j for j, lab in newest_first if lab["team"] == "search"]
    assert len(search) == 4

    # filtered pages follow the cursor and end with next_cursor null
    got, cursor = [], None
    while True:
        params = [("label", "team:search"), ("limit", "3")] + ([("cursor", cursor)] if cursor else [])
        page = client.get("/v1/jobs", params=params).json()
        got += [j["id"] for j in page["items"]]
        assert all(j["labels"]["team"] == "search" for j in page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert got == search

    both = [j for j, lab in newest_first if lab == {"team": "search", "run": "r0"}]
    assert ids(client.get("/v1/jobs", params=[("label", "team:search"), ("label", "run:r0")])) == both
    assert ids(client.get("/v1/jobs", params={"label": "team"})) == [j for j, _ in newest_first]
    assert ids(client.get("/v1/jobs", params={"label": "nope"})) == []
    assert ids(client.get("/v1/jobs", params={"label": "team:search:x"})) == []  # the value is "search:x"
    # with the other filters, and on a model's jobs
    client.post(f"/v1/jobs/{search[0]}/cancel")
    assert ids(client.get("/v1/jobs", params={"label": "team:search", "status": "queued"})) == search[1:]
    a_jobs = [j for j, _ in newest_first[2:]]
    assert ids(client.get(f"/v1/models/{model_a}/jobs")) == a_jobs
    assert ids(client.get(f"/v1/models/{model_a}/jobs", params={"label": "team:ads"})) == \
        [j for j, lab in newest_first[2:] if lab["team"] == "ads"]
    page = client.get(f"/v1/models/{model_a}/jobs", params={"limit": 2}).json()
    assert [j["id"] for j in page["items"]] == a_jobs[:2]
    rest = client.get(f"/v1/models/{model_a}/jobs", params={"limit": 10, "cursor": page["next_cursor"]})
    assert ids(rest) == a_jobs[2:]
    _error(client.get("/v1/models/" + "0" * 32 + "/jobs"), 404, "model_not_found")

    err = _error(client.get("/v1/jobs", params={"label": "Bad Key:x"}), 422, "invalid_label_filter")
    assert err["detail"]["label"] == "Bad Key:x"
    _error(client.get("/v1/models", params={"label": ":x"}), 422, "invalid_label_filter")
    _error(client.get("/v1/jobs", params=[("label", f"k{i}") for i in range(21)]), 422)


@pytest.fixture
def secured(settings):
    settings = settings.model_copy(update={"auth": "required", "auth_cache_s": 0.0})
    db = Database(settings)
    with db.session() as s:
        keys = {owner: create_key(s, owner, admin=admin)[1] for owner, admin in (("alice", False), ("bob", False),
                                                                                  ("ops", True))}
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c, {o: {"Authorization": f"Bearer {k}"} for o, k in keys.items()}
    db.dispose()


def test_label_filters_keep_owners_apart(secured):
    client, h = secured
    mine = {}
    _error(client.get("/v1/jobs", params={"label": "team:search"}), 401)
    for owner in ("alice", "bob"):
        files = {"file": ("mlp.onnx", mlp_onnx_bytes(), "application/octet-stream")}
        model = client.post("/v1/models", files=files, data={"labels": '{"team": "search"}'}, headers=h[owner])
        job = client.post("/v1/jobs", headers=h[owner], json={
            "kind": "quantize", "model_id": model.json()["id"], "config": {"method": "dynamic_int8"},
            "labels": {"team": "search"}})
        mine[owner] = (model.json()["id"], job.json()["id"])
    for owner in ("alice", "bob"):
        model_id, job_id = mine[owner]
        assert ids(client.get("/v1/jobs", params={"label": "team:search"}, headers=h[owner])) == [job_id]
        assert ids(client.get("/v1/models", params={"label": "team:search"}, headers=h[owner])) == [model_id]
    alice_model, alice_job = mine["alice"]
    _error(client.get(f"/v1/models/{alice_model}/jobs", headers=h["bob"]), 404, "model_not_found")
    _error(client.patch(f"/v1/jobs/{alice_job}", json={"labels": {"x": "y"}}, headers=h["bob"]), 404)
    _error(client.patch(f"/v1/models/{alice_model}", json={"labels": {"x": "y"}}, headers=h["bob"]), 404)
    everyone = ids(client.get("/v1/jobs", params={"label": "team:search"}, headers=h["ops"]))
    assert sorted(everyone) == sorted([mine["alice"][1], mine["bob"][1]])


def test_input_model_is_exactly_one_of_model_id_and_artifact_id(client):
    model_id = upload_labelled(client, None).json()["id"]
    body = {"kind": "quantize", "config": {"method": "dynamic_int8"}}
    _error(client.post("/v1/jobs", json=body), 422, "input_model_required")
    _error(client.post("/v1/jobs", json={**body, "model_id": model_id, "artifact_id": "a" * 32}), 422,
           "input_model_required")
    _error(client.post("/v1/jobs", json={**body, "artifact_id": "a" * 32}), 404, "artifact_not_found")
    _error(client.post("/v1/models/from-artifact", json={"artifact_id": "a" * 32}), 404, "artifact_not_found")
    _error(client.get("/v1/artifacts/" + "a" * 32 + "/lineage"), 404, "artifact_not_found")
    _error(client.post("/v1/models/from-artifact", json={"artifact_id": "nope"}), 422, "validation_error")


@pytest.mark.slow
def test_lineage_after_prune_then_quantize_on_a_real_worker(tmp_path, start_worker):  # noqa: F811
    from app.models import repository as models_repo

    settings = make_settings(tmp_path, "sqlite", "filesystem", **FAST)
    with TestClient(create_app(settings), raise_server_exceptions=False) as api:
        start_worker(settings, "lineage@test")
        teacher = upload_labelled(api, {"team": "search"}, name="teacher.onnx").json()
        data = upload_dataset(api, digits_npz_bytes()).json()
        prune = api.post("/v1/jobs", json={"kind": "prune", "model_id": teacher["id"], "dataset_id": data["id"],
                                           "labels": {"step": "prune"},
                                           "config": {"method": "channels", "ratio": 0.5, "benchmark": QUICK}})
        assert prune.status_code == 202, prune.text
        pruned, _ = wait_terminal(api, prune.json()["id"], timeout=300)
        assert pruned["status"] == "succeeded", pruned["error"]
        art1 = api.get(f"/v1/artifacts/{pruned['artifact_id']}").json()

        db = Database(settings)
        with db.session() as s:
            stored_before = models_repo.stored_bytes(s, "default")
        objects_before = sorted(p.name for p in (settings.storage_dir / "objects").rglob("*") if p.is_file())

        # the artifact is the input of the next job: no download, no copy
        quant = api.post("/v1/jobs", json={"kind": "quantize", "artifact_id": art1["id"], "dataset_id": data["id"],
                                           "labels": {"step": "quantize"},
                                           "config": {"method": "static_int8", "benchmark": QUICK}})
        assert quant.status_code == 202, quant.text
        derived = api.get(f"/v1/models/{quant.json()['model_id']}").json()
        assert derived["source_artifact_id"] == art1["id"] and derived["sha256"] == art1["sha256"]
        assert derived["format"] == "onnx" and derived["inspection"]["inputs"][0]["name"] == "x"
        assert derived["size_bytes"] == art1["size_bytes"]
        with db.session() as s:
            assert models_repo.stored_bytes(s, "default") == stored_before  # counted once, as the artifact
        assert sorted(p.name for p in (settings.storage_dir / "objects").rglob("*") if p.is_file()) == \
            objects_before
        quantized, _ = wait_terminal(api, quant.json()["id"], timeout=300)
        assert quantized["status"] == "succeeded", quantized["error"]
        assert quantized["metrics"]["provenance"]["model_sha256"] == art1["sha256"]
        assert quantized["metrics"]["result"]["size_bytes"] < 0.5 * quantized["metrics"]["baseline"]["size_bytes"]

        lineage = api.get(f"/v1/artifacts/{quantized['artifact_id']}/lineage").json()
        assert lineage["complete"] is True and lineage["artifact_id"] == quantized["artifact_id"]
        steps = lineage["steps"]
        assert [s["artifact"]["id"] for s in steps] == [quantized["artifact_id"], art1["id"]]
        assert [s["job"]["id"] for s in steps] == [quantized["id"], pruned["id"]]
        assert [(s["job"]["kind"], s["job"]["method"]) for s in steps] == [("quantize", "static_int8"),
                                                                          ("prune", "channels")]
        assert [s["job"]["labels"] for s in steps] == [{"step": "quantize"}, {"step": "prune"}]
        assert [s["input_model"]["id"] for s in steps] == [derived["id"], teacher["id"]]
        assert lineage["teacher"]["id"] == teacher["id"] and lineage["teacher"]["source_artifact_id"] is None
        assert lineage["teacher"]["labels"] == {"team": "search"}
        one = api.get(f"/v1/artifacts/{art1['id']}/lineage").json()
        assert [s["job"]["id"] for s in one["steps"]] == [pruned["id"]] and one["teacher"]["id"] == teacher["id"]

        assert ids(api.get(f"/v1/models/{teacher['id']}/jobs")) == [pruned["id"]]
        assert ids(api.get(f"/v1/models/{derived['id']}/jobs")) == [quantized["id"]]
        # a further job on the same artifact reuses the derived model; an explicit one can be made too
        again = api.post("/v1/jobs", json={"kind": "quantize", "artifact_id": art1["id"], "device": "cuda",
                                           "config": {"method": "fp16"}}).json()
        assert again["model_id"] == derived["id"]
        api.post(f"/v1/jobs/{again['id']}/cancel")
        named = api.post("/v1/models/from-artifact", json={"artifact_id": art1["id"], "name": "pruned",
                                                           "labels": {"stage": "candidate"}})
        assert named.status_code == 201, named.text
        named = named.json()
        assert named["name"] == "pruned" and named["labels"] == {"stage": "candidate"}
        assert named["sha256"] == art1["sha256"] and named["source_artifact_id"] == art1["id"]
        assert ids(api.get("/v1/models", params={"label": "stage:candidate"})) == [named["id"]]
        # deleting a model made from an artifact leaves the artifact's file in place
        assert api.delete(f"/v1/models/{named['id']}").status_code == 204
        assert api.get(f"/v1/artifacts/{art1['id']}/content").content
        db.dispose()
