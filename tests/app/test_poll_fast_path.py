"""`GET /v1/jobs/{id}` below the router (app/jobs/poll_middleware.py): it answers exactly as the route does, and only when
it may (PostgreSQL, a caller known without a query, under the rate limit); the route answers everything else."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app.auth.keys import create_key
from app.core.db import Database
from app.jobs.poll_middleware import JobPollFastPath
from app.main import create_app
from tests.app.test_api_uploads import _error, upload_model
from tests.conftest import make_settings
from tests.helpers import mlp_onnx_bytes

QUANTIZE = {"kind": "quantize", "config": {"method": "dynamic_int8"}}


@pytest.fixture
def served(monkeypatch):
    """How many requests the fast path answered itself."""
    count = {"n": 0}
    real = JobPollFastPath._serve

    async def counting(self, *args):
        answered = await real(self, *args)
        count["n"] += answered
        return answered

    monkeypatch.setattr(JobPollFastPath, "_serve", counting)
    return count


def _same(fast, route) -> None:
    """Same status, body bytes and headers (but the per-request id)."""
    assert fast.status_code == route.status_code
    assert fast.content == route.content
    strip = {"x-request-id"}
    assert [(k, v) for k, v in fast.headers.items() if k not in strip] == \
        [(k, v) for k, v in route.headers.items() if k not in strip]


def test_answers_like_the_route(client, settings, served):
    model = upload_model(client, mlp_onnx_bytes()).json()
    job = client.post("/v1/jobs", json={**QUANTIZE, "model_id": model["id"], "labels": {"team": "a"}}).json()
    before = served["n"]
    fast = client.get(f"/v1/jobs/{job['id']}")
    route = client.get(f"/v1/jobs/{job['id']}?via=route")  # a query string always goes to the route
    _same(fast, route)
    assert fast.json() == job and fast.headers["x-request-id"]
    unknown = "0" * 32
    _same(client.get(f"/v1/jobs/{unknown}"), client.get(f"/v1/jobs/{unknown}?via=route"))
    _error(client.get(f"/v1/jobs/{unknown}"), 404, "job_not_found")
    _error(client.get("/v1/jobs/NOT-AN-ID"), 422)  # not the id's shape: the route's validation answers
    # PostgreSQL: the fast path answered the three plain GETs; SQLite has no job reader, the route answers all
    assert served["n"] - before == (3 if not settings.is_sqlite else 0)


@pytest.fixture
def keyed(pg_url, tmp_path):
    """PostgreSQL with keys required and cached (as in production), a rate limit, keys for alice, bob and an admin."""
    settings = make_settings(tmp_path, pg_url, "filesystem", auth="required", auth_cache_s=60.0,
                             rate_limit_per_minute=30)
    db = Database(settings)
    with db.session() as s:
        keys = {o: create_key(s, o, admin=o == "ops") for o in ("alice", "bob", "ops")}
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c, {o: {"Authorization": f"Bearer {k}"} for o, (_, k) in keys.items()}, keys, db
    db.dispose()


def test_owners_keys_and_rate_limit_hold_on_the_fast_path(keyed, served):
    client, h, _, _ = keyed
    client.headers.update(h["alice"])
    model = upload_model(client, mlp_onnx_bytes()).json()
    job = client.post("/v1/jobs", json={**QUANTIZE, "model_id": model["id"]}).json()
    del client.headers["Authorization"]
    path = f"/v1/jobs/{job['id']}"
    _error(client.get(path), 401, "unauthorized")  # no key: never served by the fast path
    _error(client.get(path, headers={"Authorization": "Bearer dk_0123456789abcdef.nope"}), 401)
    for _ in range(2):  # the first GET verifies bob's key on the route, the second is served from its cache
        _error(client.get(path, headers=h["bob"]), 404, "job_not_found")  # another owner's job: 404, not 403
    assert client.get(path, headers=h["alice"]).json()["status"] == "queued"
    assert client.get(path, headers=h["ops"]).json()["owner"] == "alice"  # the admin reads any owner's job
    n = served["n"]
    assert n >= 2  # bob's second GET and at least one of alice's/the admin's came through the fast path

    codes = [client.get(path, headers=h["alice"]).status_code for _ in range(40)]
    assert codes.count(200) < 40 and set(codes) == {200, 429}
    assert codes.index(429) == codes.count(200)  # refused from the first request over the limit on
    err = _error(client.get(path, headers=h["alice"]), 429, "rate_limited")
    assert err["detail"]["value"] == 30
    assert served["n"] > n


def test_a_burst_of_submissions_waits_at_the_gate_and_every_one_lands(pg_url, tmp_path):
    """`api_submit_concurrency` 1: twelve submissions at once (two of them with the same Idempotency-Key) all get
    their 202; eleven jobs exist, each once."""
    from concurrent.futures import ThreadPoolExecutor

    settings = make_settings(tmp_path, pg_url, "filesystem", api_submit_concurrency=1)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        model = upload_model(client, mlp_onnx_bytes()).json()
        body = {**QUANTIZE, "model_id": model["id"]}
        keys = [f"k{i}" for i in range(11)] + ["k0"]
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda k: client.post("/v1/jobs", json=body, headers={"Idempotency-Key": k}), keys))
        assert [a.status_code for a in answers] == [202] * 12
        assert answers[0].json()["id"] == answers[-1].json()["id"]
        listed = client.get("/v1/jobs?limit=100").json()["items"]
        assert sorted(j["id"] for j in listed) == sorted({a.json()["id"] for a in answers}) and len(listed) == 11


def test_an_unreachable_database_is_a_503_from_the_fast_path_too(tmp_path, served):
    """The reader's pool cannot connect: the poll gets the route's 503, answered once (one rate-limit token)."""
    from app.core.config import Settings

    settings = Settings(data_dir=tmp_path, database_url="postgresql+psycopg://postgres@127.0.0.1:1/none",
                        broker_url="redis://127.0.0.1:1/0", auth="open", database_wait_s=0.5)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        fast, route = client.get("/v1/jobs/" + "0" * 32), client.get("/v1/jobs/" + "0" * 32 + "?via=route")
    _same(fast, route)
    _error(fast, 503, "database_unavailable")
    assert fast.headers["retry-after"] == "2" and served["n"] == 1
