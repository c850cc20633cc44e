"""Webhooks: a real local HTTP receiver verifies the signature and payload; failed attempts are retried with
back-off and bounded; the allow-list is enforced; every way a job ends (worker, reaper, API cancel) calls back."""
from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fastapi.testclient import TestClient

from app.core.db import Database, utcnow
from app.core.tables import WebhookDeliveryRow
from app.jobs.service import job_json
from app.main import create_app
from app.webhooks import repository as outbox
from app.webhooks.delivery import deliver_due
from app.webhooks.policy import AllowList, Refused, parse_target, resolve_checked
from tests.app.test_api_uploads import _error, upload_model
from tests.e2e.conftest import wait_terminal
from tests.helpers import mlp_onnx_bytes

SECRET = "test-webhook-secret-0123456789"
HOOKS = {"webhook_allowed_hosts": "127.0.0.1", "webhook_secret": SECRET, "webhook_backoff_s": 0.3,
         "webhook_max_attempts": 3, "webhook_timeout_s": 2.0}
QUICK = {"batch_sizes": [1], "repeats": 3, "warmup": 1}


class Receiver:
    """A local HTTP server that records every request and answers from a per-path script of status codes."""

    def __init__(self):
        self.requests: list[dict] = []
        self.script: dict[str, list[int]] = {}
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with receiver.lock:
                    receiver.requests.append({"path": self.path, "headers": dict(self.headers), "body": body,
                                              "at": time.monotonic()})
                    codes = receiver.script.get(self.path, [200])
                    code = codes.pop(0) if len(codes) > 1 else codes[0]
                self.send_response(code)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def at(self, path: str) -> list[dict]:
        with self.lock:
            return [r for r in self.requests if r["path"] == path]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def verify_signature(request: dict) -> dict:
    """What a receiver does (docs/api.md): HMAC-SHA256 of "<timestamp>.<raw body>" with the shared secret, compared
    in constant time, and a fresh timestamp."""
    headers = {k.lower(): v for k, v in request["headers"].items()}
    ts = headers["x-distillery-timestamp"]
    expected = "sha256=" + hmac.new(SECRET.encode(), f"{ts}.".encode() + request["body"], hashlib.sha256).hexdigest()
    assert hmac.compare_digest(expected, headers["x-distillery-signature"])
    assert abs(time.time() - int(ts)) < 300
    tampered = request["body"].replace(b'"status"', b'"Status"')
    assert "sha256=" + hmac.new(SECRET.encode(), f"{ts}.".encode() + tampered, hashlib.sha256).hexdigest() != \
        headers["x-distillery-signature"]
    return json.loads(request["body"])


def wait_webhook(api, job_id: str, states: set[str], timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = api.get(f"/v1/jobs/{job_id}").json()
        if job["webhook"]["state"] in states:
            return job
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id}: webhook still {job['webhook']}")


@pytest.fixture
def hooked(stack):
    settings = stack.model_copy(update=HOOKS)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield settings, c


@pytest.mark.slow
def test_succeeded_job_calls_back_signed_after_retries(hooked, start_worker, receiver):
    settings, api = hooked
    start_worker(settings, "hooks@test")
    receiver.script["/hook"] = [500, 500, 200]
    model = upload_model(api, mlp_onnx_bytes()).json()
    resp = api.post("/v1/jobs", json={"kind": "quantize", "model_id": model["id"], "callback_url": receiver.url("/hook"),
                                      "labels": {"team": "search"},
                                      "config": {"method": "dynamic_int8", "benchmark": QUICK}})
    assert resp.status_code == 202, resp.text
    assert resp.json()["webhook"] == {"url": receiver.url("/hook"), "state": "waiting", "event": None, "attempts": 0,
                                      "last_status_code": None, "last_error": None, "last_attempt_at": None,
                                      "next_attempt_at": None, "delivered_at": None}
    job, _ = wait_terminal(api, resp.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    job = wait_webhook(api, job["id"], {"delivered", "failed"})
    hook = job["webhook"]
    assert hook["state"] == "delivered" and hook["event"] == "job.succeeded" and hook["attempts"] == 3
    assert hook["last_status_code"] == 200 and hook["last_error"] is None and hook["delivered_at"]

    calls = receiver.at("/hook")
    assert len(calls) == 3
    payloads = [verify_signature(c) for c in calls]
    for payload in payloads:
        assert payload["id"] == job["id"] and payload["status"] == "succeeded"
        assert payload["artifact_id"] == job["artifact_id"] and payload["labels"] == {"team": "search"}
        assert payload["metrics"] == job["metrics"]
    assert [p["webhook"]["attempts"] for p in payloads] == [1, 2, 3]
    headers = [{k.lower(): v for k, v in c["headers"].items()} for c in calls]
    assert {h["x-distillery-event"] for h in headers} == {"job.succeeded"}
    assert len({h["x-distillery-delivery"] for h in headers}) == 1  # one delivery, three attempts
    assert all(h["content-type"] == "application/json" for h in headers)
    # exponential back-off: each retry waited at least its delay (0.3 s, then 0.6 s)
    assert calls[1]["at"] - calls[0]["at"] >= 0.3 and calls[2]["at"] - calls[1]["at"] >= 0.6


@pytest.mark.slow
def test_cancelled_queued_job_calls_back_and_attempts_are_bounded(hooked, start_worker, receiver):
    settings, api = hooked
    start_worker(settings, "hooks@test", queues="cpu")  # the job below waits for a GPU worker: it stays queued
    receiver.script["/down"] = [500]
    model = upload_model(api, mlp_onnx_bytes()).json()
    job = api.post("/v1/jobs", json={"kind": "quantize", "model_id": model["id"], "device": "cuda",
                                     "callback_url": receiver.url("/down"), "config": {"method": "fp16"}}).json()
    cancelled = api.post(f"/v1/jobs/{job['id']}/cancel").json()
    assert cancelled["status"] == "cancelled"
    assert cancelled["webhook"]["state"] == "pending" and cancelled["webhook"]["event"] == "job.cancelled"
    job = wait_webhook(api, job["id"], {"failed", "delivered"})
    hook = job["webhook"]
    assert hook["state"] == "failed" and hook["attempts"] == 3 and hook["last_status_code"] == 500
    assert "HTTP 500" in hook["last_error"] and hook["delivered_at"] is None and hook["next_attempt_at"] is None
    calls = receiver.at("/down")
    assert len(calls) == 3  # webhook_max_attempts, then no more (the row is no longer pending)
    assert {verify_signature(c)["status"] for c in calls} == {"cancelled"}


@pytest.fixture
def hooks_client(settings):
    settings = settings.model_copy(update=HOOKS)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield settings, c


def test_callback_url_is_checked_against_the_allow_list(client, hooks_client):
    model_id = upload_model(client, mlp_onnx_bytes()).json()["id"]
    body = {"kind": "quantize", "model_id": model_id, "config": {"method": "dynamic_int8"}}
    err = _error(client.post("/v1/jobs", json={**body, "callback_url": "https://hooks.example.com/x"}), 422,
                 "webhooks_disabled")
    assert "DISTILLERY_WEBHOOK_ALLOWED_HOSTS" in err["message"] and err["detail"]["field"] == "callback_url"

    _, api = hooks_client
    model_id = upload_model(api, mlp_onnx_bytes()).json()["id"]
    body["model_id"] = model_id
    for url, code in [("http://10.0.0.1/hook", "callback_url_not_allowed"),
                      ("http://169.254.169.254/latest/meta-data", "callback_url_not_allowed"),
                      ("http://localhost:8080/hook", "callback_url_not_allowed"),
                      ("https://evil.example.com/hook", "callback_url_not_allowed"),
                      ("ftp://127.0.0.1/hook", "invalid_callback_url"),
                      ("http://user:pw@127.0.0.1/hook", "invalid_callback_url"),
                      ("http:///hook", "invalid_callback_url"),
                      ("http://127.0.0.1:99999/hook", "invalid_callback_url")]:
        err = _error(api.post("/v1/jobs", json={**body, "callback_url": url}), 422, code)
        assert err["detail"]["field"] == "callback_url", url
    _error(api.post("/v1/jobs", json={**body, "callback_url": "http://127.0.0.1/" + "x" * 2100}), 422)
    assert api.get("/v1/jobs").json()["items"] == []
    ok = api.post("/v1/jobs", json={**body, "callback_url": "http://127.0.0.1:9/hook"})
    assert ok.status_code == 202, ok.text
    assert api.get(f"/v1/jobs/{ok.json()['id']}").json() == ok.json()  # the PostgreSQL fast path too


def test_allow_list_rules_at_resolve_time():
    allow = AllowList.parse("hooks.example.com, *.corp.example, 10.1.0.0/16, ::1, localhost")
    assert allow.host_allowed("hooks.example.com") and allow.host_allowed("a.b.corp.example")
    assert not allow.host_allowed("corp.example") and not allow.host_allowed("hooks.example.com.evil.net")
    assert allow.host_allowed("10.1.2.3") and not allow.host_allowed("10.2.0.1") and allow.host_allowed("::1")
    # a name on the list may not resolve to an internal address that is not itself listed (no SSRF via DNS)
    with pytest.raises(Refused, match="non-public"):
        resolve_checked(parse_target("http://localhost:8080/x"), AllowList.parse("localhost"))
    assert str(resolve_checked(parse_target("http://localhost:8080/x"), AllowList.parse("localhost,127.0.0.1"))) \
        == "127.0.0.1"
    assert str(resolve_checked(parse_target("http://[::1]:8080/x"), allow)) == "::1"
    with pytest.raises(Refused, match="not on the webhook allow-list"):
        resolve_checked(parse_target("http://127.0.0.1/x"), allow)
    with pytest.raises(Refused, match="disabled"):
        resolve_checked(parse_target("http://127.0.0.1/x"), AllowList.parse(""))


def _job_with_callback(api, url: str) -> dict:
    model_id = upload_model(api, mlp_onnx_bytes()).json()["id"]
    return api.post("/v1/jobs", json={"kind": "quantize", "model_id": model_id, "callback_url": url,
                                      "config": {"method": "dynamic_int8"}}).json()


def test_outbox_row_is_written_in_the_transaction_that_ends_the_job(hooks_client):
    """The reaper's and the supervisor's `fail`, like the API's cancel, record the delivery atomically."""
    from app.jobs import repository as repo
    from app.jobs.states import ErrorCode

    settings, api = hooks_client
    job = _job_with_callback(api, "http://127.0.0.1:9/hook")
    db = Database(settings)
    try:
        with db.session() as s:
            assert repo.fail(s, job["id"], ErrorCode.worker_lost, "gave up") is not None
            assert s.query(WebhookDeliveryRow).filter_by(job_id=job["id"]).count() == 1
            s.rollback()  # the transition did not happen: neither did the delivery
        with db.session() as s:
            assert s.query(WebhookDeliveryRow).filter_by(job_id=job["id"]).count() == 0
            repo.fail(s, job["id"], ErrorCode.worker_lost, "gave up")
            s.commit()
        hook = api.get(f"/v1/jobs/{job['id']}").json()["webhook"]
        assert hook["state"] == "pending" and hook["event"] == "job.failed" and hook["attempts"] == 0
        # a job without a callback_url records nothing
        plain = api.post("/v1/jobs", json={"kind": "quantize", "model_id": job["model_id"],
                                           "config": {"method": "dynamic_int8"}}).json()
        api.post(f"/v1/jobs/{plain['id']}/cancel")
        with db.session() as s:
            assert s.query(WebhookDeliveryRow).count() == 1
    finally:
        db.dispose()


def test_two_processes_never_claim_the_same_delivery(hooks_client, receiver):
    settings, api = hooks_client
    job = _job_with_callback(api, receiver.url("/race"))
    api.post(f"/v1/jobs/{job['id']}/cancel")
    db = Database(settings)
    try:
        with db.session() as s:
            (delivery_id,) = outbox.due(s, utcnow(), 10)
        barrier = threading.Barrier(4)
        won: list[object] = []

        def race():
            with db.session() as s:
                barrier.wait()
                row = outbox.claim(s, delivery_id, utcnow(), 60)
                s.commit()
                if row is not None:
                    won.append(row)

        threads = [threading.Thread(target=race) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1 and won[0].attempts == 1
        assert deliver_due(db, settings, job_json) == 0  # leased: not due for anyone
        with db.session() as s:  # the lease expires (its holder died): another process delivers it
            s.query(WebhookDeliveryRow).filter_by(id=delivery_id).update({"claimed_until": utcnow()})
            s.commit()
        assert deliver_due(db, settings, job_json) == 1
        hook = api.get(f"/v1/jobs/{job['id']}").json()["webhook"]
        assert hook["state"] == "delivered" and hook["attempts"] == 2
        assert verify_signature(receiver.at("/race")[0])["id"] == job["id"]
    finally:
        db.dispose()


def test_webhooks_need_a_secret(tmp_path):
    from pydantic import ValidationError

    from app.core.config import Settings

    with pytest.raises(ValidationError, match="WEBHOOK_SECRET"):
        Settings(data_dir=tmp_path, webhook_allowed_hosts="hooks.example.com")
    with pytest.raises(ValidationError, match="WEBHOOK_SECRET"):
        Settings(data_dir=tmp_path, webhook_allowed_hosts="hooks.example.com", webhook_secret="short")
    assert Settings(data_dir=tmp_path, webhook_allowed_hosts="hooks.example.com", webhook_secret="x" * 16)
