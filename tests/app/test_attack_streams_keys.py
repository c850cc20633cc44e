"""Two floods from the security attack run, built here and refused where they belong (on SQLite and PostgreSQL):

- many Server-Sent-Event streams (`GET /v1/jobs/{id}/events`, each polling the database): at most
  `max_event_streams_per_owner` per owner and `max_event_streams` per API process, 429 with Retry-After past them;
  a stream frees its place when it ends, is closed, or its client goes away (a real uvicorn and a real socket);
- random well-formed API keys: each address has `auth_failures_per_minute` failed attempts, then 429 with
  Retry-After before any database query; only verified keys are cached, in a bounded LRU junk cannot enter or
  flush; the poll fast path and the route agree.
"""
from __future__ import annotations

import contextlib
import secrets
import socket
import struct
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event

from app.auth.keys import KeyVerifier, create_key
from app.auth.throttle import FailedKeyLimiter, client_address, guards
from app.core.db import Database
from app.main import create_app
from tests.app.test_api_uploads import _error, upload_model
from tests.helpers import mlp_onnx_bytes

QUANTIZE = {"kind": "quantize", "config": {"method": "dynamic_int8"}}


def junk_key() -> str:
    """A random key of the real shape (`dk_<16 hex>.<secret>`): it passes the format check and reaches the lookup."""
    return f"dk_{secrets.token_hex(8)}.{secrets.token_urlsafe(32)}"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@contextlib.contextmanager
def key_queries(db_engine):
    """How many statements read the api_keys table while the block runs (an event on the real engine)."""
    count = {"n": 0}

    def on_execute(_conn, _cursor, statement, *_):
        if "api_keys" in statement:
            count["n"] += 1

    event.listen(db_engine, "before_cursor_execute", on_execute)
    try:
        yield count
    finally:
        event.remove(db_engine, "before_cursor_execute", on_execute)


@pytest.fixture
def keyed(settings):
    """The app with keys required; keys for alice, bob and carol, each with a queued job (no worker runs)."""
    settings = settings.model_copy(update={"auth": "required", "auth_cache_s": 60.0, "max_event_streams_per_owner": 3,
                                           "max_event_streams": 5, "auth_failures_per_minute": 2})
    db = Database(settings)
    with db.session() as s:
        keys = {o: create_key(s, o)[1] for o in ("alice", "bob", "carol")}
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        jobs = {}
        for owner, key in keys.items():
            c.headers.update(bearer(key))
            model = upload_model(c, mlp_onnx_bytes())
            del c.headers["Authorization"]
            jobs[owner] = c.post("/v1/jobs", json={**QUANTIZE, "model_id": model.json()["id"]},
                                 headers=bearer(key)).json()["id"]
            assert c.get(f"/v1/jobs/{jobs[owner]}", headers=bearer(key)).json()["status"] == "queued"
        yield c, keys, jobs, db
    db.dispose()


# ---- event streams


def _open(stack: contextlib.ExitStack, client, key: str, job_id: str):
    return stack.enter_context(client.stream("GET", f"/v1/jobs/{job_id}/events", headers=bearer(key)))


def _first_event(resp) -> str:
    """The first `status` event of a live stream (the job's `queued` event), read off the wire."""
    assert resp.status_code == 200, resp.read()
    lines = resp.iter_lines()
    for line in lines:
        if line.startswith("data:"):
            return line
    raise AssertionError("the stream ended without an event")


def _refused(client, key: str, job_id: str, limit: str, value: int) -> dict:
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=bearer(key)) as resp:
        resp.read()
    assert int(resp.headers["retry-after"]) >= 1
    err = _error(resp, 429, "event_streams_limit")
    assert err["detail"]["limit"] == limit and err["detail"]["value"] == value
    assert limit in err["message"] and str(value) in err["message"]
    return err


def test_event_streams_are_capped_per_owner_and_per_process(keyed):
    client, keys, jobs, _ = keyed
    slots = guards(client.app.state.services).event_streams
    with contextlib.ExitStack() as alice_streams, contextlib.ExitStack() as bob_streams:
        alice = [_open(alice_streams, client, keys["alice"], jobs["alice"]) for _ in range(3)]
        assert all('"status":"queued"' in _first_event(r) for r in alice)
        err = _refused(client, keys["alice"], jobs["alice"], "max_event_streams_per_owner", 3)
        assert err["detail"]["open"] == 3
        bob = [_open(bob_streams, client, keys["bob"], jobs["bob"]) for _ in range(2)]
        assert all(_first_event(r) for r in bob)
        # five open in this process: bob (2 of his 3) and carol (none yet) meet the process's limit
        _refused(client, keys["bob"], jobs["bob"], "max_event_streams", 5)
        _refused(client, keys["carol"], jobs["carol"], "max_event_streams", 5)
        assert slots.open_count == 5

        alice[0].close()  # a client closing its stream frees its place at once
        with client.stream("GET", f"/v1/jobs/{jobs['carol']}/events", headers=bearer(keys["carol"])) as carol:
            assert _first_event(carol)
            _refused(client, keys["alice"], jobs["alice"], "max_event_streams", 5)
        assert slots.open_count == 4
    assert slots.open_count == 0
    # the other routes never stopped answering
    assert client.get("/v1/models", headers=bearer(keys["carol"])).status_code == 200


def test_refused_and_ended_streams_hold_no_place(keyed):
    """A 404 (another owner's job), a 429, and streams that end with their job all leave every place free."""
    client, keys, jobs, _ = keyed
    slots = guards(client.app.state.services).event_streams
    for _ in range(10):  # more than both limits: a stream refused with 404 never kept its place
        _error(client.get(f"/v1/jobs/{jobs['alice']}/events", headers=bearer(keys["bob"])), 404, "job_not_found")
    assert slots.open_count == 0
    with contextlib.ExitStack() as stack:
        streams = [_open(stack, client, keys["alice"], jobs["alice"]).iter_lines() for _ in range(3)]
        for lines in streams:
            assert '"status":"queued"' in next(line for line in lines if line.startswith("data:"))
        for _ in range(5):
            _refused(client, keys["alice"], jobs["alice"], "max_event_streams_per_owner", 3)
        assert client.post(f"/v1/jobs/{jobs['alice']}/cancel", headers=bearer(keys["alice"])).status_code == 200
        for lines in streams:  # each stream sends the cancellation and ends by itself
            rest = "\n".join(lines)
            assert '"status":"cancelled"' in rest
    assert slots.open_count == 0
    # the job has ended: a new stream replays its events and ends, as many times as asked
    for _ in range(5):
        with client.stream("GET", f"/v1/jobs/{jobs['alice']}/events", headers=bearer(keys["alice"])) as r:
            assert r.status_code == 200 and '"status":"cancelled"' in r.read().decode()
    assert slots.open_count == 0


@pytest.fixture
def live(settings):
    """uvicorn serving the app on a free port, in a thread of this process; keys required."""
    import uvicorn

    settings = settings.model_copy(update={"auth": "required", "auth_cache_s": 60.0, "max_event_streams_per_owner": 1,
                                           "auth_failures_per_minute": 2})
    db = Database(settings)
    with db.session() as s:
        key = create_key(s, "alice")[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    _wait_until(lambda: server.started or not thread.is_alive(), "uvicorn did not start")
    assert thread.is_alive()
    try:
        yield app, port, key
    finally:
        server.should_exit = True
        thread.join(30)
        db.dispose()


def _wait_until(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@pytest.mark.parametrize("close", ["fin", "reset"])
def test_a_client_that_goes_away_frees_its_stream(live, close):
    """A real socket reads the start of its stream and goes away (a FIN, or a reset); its owner's only place is
    free again, and the server serves a new stream, without the job changing."""
    app, port, key = live
    base = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=base, headers=bearer(key), timeout=30) as http:
        job = http.post("/v1/jobs", json={**QUANTIZE, "model_id": upload_model(http, mlp_onnx_bytes()).json()["id"]})
        job_id = job.json()["id"]
        sock = socket.create_connection(("127.0.0.1", port))
        try:
            sock.sendall((f"GET /v1/jobs/{job_id}/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                          f"Authorization: Bearer {key}\r\nAccept: text/event-stream\r\n\r\n").encode())
            got = b""
            while b'"status":"queued"' not in got:
                chunk = sock.recv(65536)
                assert chunk, got
                got += chunk
            assert got.startswith(b"HTTP/1.1 200")
            with http.stream("GET", f"/v1/jobs/{job_id}/events") as second:
                second.read()
            err = _error(second, 429, "event_streams_limit")
            assert err["detail"]["limit"] == "max_event_streams_per_owner" and second.headers["retry-after"]
            if close == "reset":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        finally:
            sock.close()
        slots = guards(app.state.services).event_streams
        _wait_until(lambda: slots.open_count == 0, "the stream of a client that went away still holds its place")
        with http.stream("GET", f"/v1/jobs/{job_id}/events") as third:
            assert third.status_code == 200
            assert '"status":"queued"' in next(line for line in third.iter_lines() if line.startswith("data:"))
        assert http.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"


# ---- random API keys


def test_junk_keys_are_refused_before_any_query_once_an_address_failed_too_often(keyed, settings):
    client, keys, jobs, db = keyed
    services = client.app.state.services
    good = bearer(keys["alice"])
    assert client.get("/v1/models", headers=good).status_code == 200  # verified now: cached
    with key_queries(services.db.engine) as queries:
        for _ in range(2):  # the address's budget: 2 failures, each one query
            _error(client.get("/v1/models", headers=bearer(junk_key())), 401, "unauthorized")
        assert queries["n"] == 2
        for _ in range(60):  # the flood goes on: refused without a query, and without filling the cache
            resp = client.get("/v1/models", headers=bearer(junk_key()))
            err = _error(resp, 429, "auth_rate_limited")
            assert int(resp.headers["retry-after"]) >= 1
        assert "auth_failures_per_minute" in err["message"] and "2 per minute" in err["message"]
        assert queries["n"] == 2
        # X-Forwarded-For is not believed: the address is the peer's
        _error(client.get("/v1/models", headers={**bearer(junk_key()), "X-Forwarded-For": "198.51.100.7"}), 429)
        assert queries["n"] == 2
        # a key verified before the flood needs no query, so it keeps working from this address, on every path
        assert client.get("/v1/models", headers=good).status_code == 200
        assert client.get(f"/v1/jobs/{jobs['alice']}", headers=good).json()["status"] == "queued"
        assert client.get(f"/v1/jobs/{jobs['alice']}?via=route", headers=good).json()["status"] == "queued"
        # a key that would need a query (not verified in this process yet) waits like the junk does
        with db.session() as s:
            fresh = create_key(s, "dave")[1]
        _error(client.get("/v1/models", headers=bearer(fresh)), 429)
        assert queries["n"] == 2
        # malformed headers never cost a query: they stay a plain 401 that says what is wrong
        _error(client.get("/v1/models", headers={"Authorization": "Basic abc"}), 401, "unauthorized")
        _error(client.get("/v1/models", headers=bearer("dk_nothex.short")), 401, "unauthorized")
        assert queries["n"] == 2
    assert len(services.keys) == 3  # the three keys the fixture used, all verified; none of the 63 junk keys
    assert all(services.keys.cached(k) is not None for k in keys.values())


def test_the_poll_fast_path_and_the_route_refuse_alike(keyed, settings):
    """GET /v1/jobs/{id}: answered below the router on PostgreSQL (app/jobs/poll_middleware.py), by the route otherwise or
    with a query string. A spent address gets the same 429 from both for an unverified key, the same 200 for a
    verified one."""
    client, keys, jobs, db = keyed
    with db.session() as s:
        fresh = create_key(s, "dave")[1]  # valid, never verified by this process
    path = f"/v1/jobs/{jobs['alice']}"
    good = bearer(keys["alice"])
    assert client.get(path, headers=good).status_code == 200
    for _ in range(2):
        _error(client.get(path, headers=bearer(junk_key())), 401)
    for headers in (bearer(junk_key()), bearer(fresh)):
        fast, route = client.get(path, headers=headers), client.get(path + "?via=route", headers=headers)
        assert fast.status_code == route.status_code == 429
        assert fast.json()["error"]["message"] == route.json()["error"]["message"]
        assert fast.headers["retry-after"] and route.headers["retry-after"]
    fast, route = client.get(path, headers=good), client.get(path + "?via=route", headers=good)
    assert fast.status_code == route.status_code == 200 and fast.content == route.content


def test_verified_keys_do_not_spend_the_budget(settings):
    """Every request verifies its key (no cache): a good key spends nothing, however often; junk spends the
    address's 2 failures, then 429."""
    settings = settings.model_copy(update={"auth": "required", "auth_cache_s": 0.0, "auth_failures_per_minute": 2})
    db = Database(settings)
    with db.session() as s:
        key = create_key(s, "alice")[1]
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        _error(client.get("/v1/models", headers=bearer(junk_key())), 401)
        assert [client.get("/v1/models", headers=bearer(key)).status_code for _ in range(20)] == [200] * 20
        _error(client.get("/v1/models", headers=bearer(junk_key())), 401)
        _error(client.get("/v1/models", headers=bearer(junk_key())), 429)
        assert len(client.app.state.services.keys) == 0  # auth_cache_s 0: nothing kept
    db.dispose()


def test_another_address_keeps_its_own_budget(live):
    """Real sockets from two loopback addresses: 127.0.0.2 spends its budget (claiming, in vain, to forward for
    someone else), 127.0.0.3 still verifies keys."""
    for addr in ("127.0.0.2", "127.0.0.3"):
        try:
            socket.create_server((addr, 0)).close()
        except OSError:
            pytest.skip(f"{addr} is not a loopback address here (only 127.0.0.1 is, as on macOS)")
    app, port, key = live
    base = f"http://127.0.0.1:{port}"

    def from_address(addr: str) -> httpx.Client:
        return httpx.Client(base_url=base, timeout=30, transport=httpx.HTTPTransport(local_address=addr))

    with from_address("127.0.0.2") as attacker, from_address("127.0.0.3") as other:
        codes = [attacker.get("/v1/models", headers={**bearer(junk_key()), "X-Forwarded-For": f"203.0.113.{i}"})
                 .status_code for i in range(30)]
        assert codes == [401, 401] + [429] * 28
        assert other.get("/v1/models", headers=bearer(key)).status_code == 200
        _error(other.get("/v1/models", headers=bearer(junk_key())), 401)
    failed = guards(app.state.services).failed_keys
    assert len(failed) == 2  # 127.0.0.2 (spent) and 127.0.0.3 (one failure); nobody else


def test_only_verified_keys_enter_the_bounded_cache(settings):
    """KeyVerifier on the real database: an LRU of at most 2 verified keys; 500 junk keys neither enter nor push a
    verified key out; a cached key costs no query."""
    db = Database(settings)
    with db.session() as s:
        k1, k2, k3 = (create_key(s, o)[1] for o in ("alice", "bob", "carol"))
    verifier = KeyVerifier(ttl_s=3600.0, max_entries=2)
    with key_queries(db.engine) as queries:
        assert verifier.verify(db.sessionmaker, k1).owner == "alice"
        assert verifier.verify(db.sessionmaker, k2).owner == "bob"
        assert queries["n"] == 2
        assert all(verifier.verify(db.sessionmaker, junk_key()) is None for _ in range(500))
        assert queries["n"] == 502 and len(verifier) == 2
        assert verifier.cached(k1).owner == "alice" and verifier.cached(k2).owner == "bob"
        assert verifier.verify(db.sessionmaker, k1).owner == "alice" and queries["n"] == 502  # from the cache
        assert verifier.verify(db.sessionmaker, k3).owner == "carol"  # the least recently used (bob) leaves
    assert len(verifier) == 2 and verifier.cached(k2) is None
    assert verifier.cached(k1) is not None and verifier.cached(k3) is not None
    db.dispose()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_address_table_is_bounded_and_cannot_be_flushed():
    """3 addresses at most: a spent address stays spent while 1,000 others fail; addresses that find no room share
    one budget; only a refilled address leaves. The clock is the test's, so no wall time is involved."""
    clock = Clock()
    limiter = FailedKeyLimiter(per_minute=2, max_addresses=3, clock=clock)
    assert [limiter.take("10.0.0.1")[0] for _ in range(3)] == ["10.0.0.1", "10.0.0.1", None]
    bucket, wait = limiter.take("10.0.0.1")
    assert bucket is None and wait == pytest.approx(30.0)
    # 1,000 other addresses fail twice each: two find room in the table, the rest share one bucket of 2 tokens
    allowed = [limiter.take(f"10.1.{i // 256}.{i % 256}")[0] for i in range(1000) for _ in range(2)]
    assert allowed[:6] == ["10.1.0.0", "10.1.0.0", "10.1.0.1", "10.1.0.1", "*", "*"]
    assert allowed[6:] == [None] * 1994
    assert len(limiter) == 3
    assert limiter.take("10.0.0.1")[0] is None  # not flushed out
    clock.now += 30.0  # one token back everywhere
    assert limiter.take("10.0.0.1")[0] == "10.0.0.1"
    assert limiter.take("10.9.9.9")[0] == "*"  # no room: the shared bucket
    clock.now += 3600.0  # every bucket refilled: the oldest give their places up to new addresses
    assert limiter.take("10.9.9.9")[0] == "10.9.9.9" and len(limiter) == 3
    bucket, _ = limiter.take("10.7.7.7")
    limiter.refund(bucket)  # a verified key: the token comes back, and a full bucket leaves the table
    assert "10.7.7.7" not in limiter._buckets


def test_client_addresses():
    assert client_address({"client": ("192.0.2.1", 5)}) == "192.0.2.1"
    assert client_address({"client": ("2001:db8:1:2:3:4:5:6", 5)}) == "2001:db8:1:2::/64"
    assert client_address({"client": ("2001:db8:1:2:ffff::9", 5)}) == "2001:db8:1:2::/64"  # one /64, one budget
    assert client_address({"client": ("::ffff:192.0.2.1", 5)}) == "192.0.2.1"
    assert client_address({"client": None}) == "unknown"
    assert client_address({"client": ("testclient", 50000)}) == "testclient"
