"""Load: 200 status pollers, 20 uploads and 100 job submissions at once against the production stack.

Stack: `distillery api --workers 2` (API keys required) on a freshly migrated, uniquely named PostgreSQL database
(dropped at the end) and Redis db 15 (flushed before and after), with `--workers` real Celery workers
(`distillery worker --queues cpu --concurrency 1`, 2 by default, so two consumers race for every job). Jobs are
real and tiny: quantize/dynamic_int8 of a 64-256-10 MLP, benchmark batch 1, 1 repeat. One warm-up job runs end to
end first (imports, page cache); then, at the same instant (asyncio + httpx, one client process):
  - `--jobs` (100) `POST /v1/jobs`, each with its own Idempotency-Key;
  - `--uploads` (20) `POST /v1/models` of distinct random ONNX models of `--upload-mb` (4) MB each;
  - `--pollers` (200) clients that `GET /v1/jobs/{id}` one of the submitted jobs (poller i follows job i mod 100,
    from its 202 on) every `--poll-interval` s (0.25: 800 polls/s offered; 0 = back to back), each pause
    jittered by +-`--poll-jitter` (0.5; 0 = fixed pauses, which keeps the pollers in lockstep), until `--duration`
    (30) s after the start.
Then the jobs drain (bounded by `--drain-timeout`), and the database is checked: every 202 is one row (by id and by
Idempotency-Key), no other row exists, every job is terminal (or still queued/running once the drain timed out),
no job was claimed twice (attempts == 1, one queued->running transition in its events, one "claimed" line in all
worker logs together), no poll of an accepted job answered 404 and no poller saw a terminal job change status,
every upload's sha256 is the client's.

Targets: zero 5xx on any request, zero lost or duplicated jobs, p99 of the status polls < 250 ms.
The per-owner limits are raised for the run (one owner sends everything): `DISTILLERY_RATE_LIMIT_PER_MINUTE`
10^9 (as in the other benchmarks) and `DISTILLERY_MAX_CONCURRENT_JOBS_PER_OWNER` above the job count.

    .venv/bin/python bench/load.py [--pollers 200] [--uploads 20] [--upload-mb 4] [--jobs 100] [--duration 30]
                                   [--poll-interval 0.25] [--poll-jitter 0.5] [--workers 2] [--drain-timeout 600] [--no-docs]

Writes bench/results/load.json and the "Load" section of docs/benchmarks.md (between its markers; `--no-docs`
leaves the docs alone).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import ssl
import statistics
import sys
import time
import uuid
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _common as c  # noqa: E402

P99_TARGET_MS = 250.0
# settings a run may vary from the environment (recorded in the results' setup.env)
PASSED_THROUGH = ("DISTILLERY_JOB_NICE", "DISTILLERY_JOB_PRESTART")
TERMINAL = {"succeeded", "failed", "cancelled"}
REDIS_URL = "redis://127.0.0.1:6379/15"  # tests use dbs 1-14, the other benchmarks 9
OWNER = "load"
DOCS = c.ROOT / "docs" / "benchmarks.md"
DOCS_BEGIN, DOCS_END = "<!-- bench/load.py: begin -->", "<!-- bench/load.py: end -->"


# --- setup -------------------------------------------------------------------------------------------------------

def pg_url(db: str, driver: str = "postgresql+psycopg") -> str:
    return c.PG_ADMIN_URL.replace("postgresql", driver, 1).rsplit("/", 1)[0] + f"/{db}"


def create_db(name: str) -> None:
    import psycopg

    with psycopg.connect(c.PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')


def drop_db(name: str) -> None:
    import psycopg

    try:
        with psycopg.connect(c.PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    except Exception as exc:  # noqa: BLE001
        print(f"could not drop database {name}: {exc}", file=sys.stderr)


def flush_redis() -> None:
    import redis

    r = redis.Redis.from_url(REDIS_URL)
    r.flushdb()
    r.close()


def random_onnx_bytes(mb: float, seed: int) -> bytes:
    """A valid ONNX MLP (x[N,64] -> hidden -> 10) with random weights, about `mb` MB, distinct per seed."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    hidden = max(16, int(mb * 1e6 / (4 * (64 + 10))))
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((64, hidden), dtype=np.float32)
    w2 = rng.standard_normal((hidden, 10), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["logits"])], f"load_mlp_{seed}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="distillery-bench")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def cpu_s(procs: list[psutil.Process]) -> dict[int, float]:
    """CPU seconds of each process still alive."""
    out = {}
    for p in procs:
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
        except psutil.Error:
            pass
    return out


def run_queue_wait_s(procs: list[psutil.Process]) -> dict[int, float]:
    """Seconds each process's threads spent runnable but waiting for a CPU (Linux /proc/PID/task/*/schedstat)."""
    out = {}
    for p in procs:
        total = 0.0
        try:
            for task in Path(f"/proc/{p.pid}/task").iterdir():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    total += int((task / "schedstat").read_text().split()[1]) / 1e9
        except OSError:
            continue
        out[p.pid] = total
    return out


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU used between two samples by the processes alive at both (job processes that came and went are missed)."""
    return sum(max(0.0, after[pid] - before[pid]) for pid in before.keys() & after.keys())


def db_query(url: str, sql: str, params: tuple = ()) -> list[tuple]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def wait_workers(url: str, n: int, timeout: float, procs: list[c.Proc]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.proc.poll() is not None:
                raise RuntimeError(f"{p.name} exited ({p.proc.returncode}):\n{p.log_tail()}")
        try:
            if db_query(url, "SELECT count(*) FROM workers")[0][0] >= n:
                return
        except Exception:  # noqa: BLE001 - the table appears with the first registration's transaction
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{n} workers did not register in {timeout}s")


def wait_jobs_terminal(url: str, ids: list[str], timeout: float) -> tuple[bool, float]:
    t0 = time.monotonic()
    while True:
        rows = db_query(url, "SELECT count(*) FROM jobs WHERE id = ANY(%s) AND status NOT IN "
                             "('succeeded', 'failed', 'cancelled')", (ids,))
        if rows[0][0] == 0:
            return True, time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            return False, time.monotonic() - t0
        time.sleep(1.0)


# --- the burst ---------------------------------------------------------------------------------------------------

class RawResponse:
    def __init__(self, status_code: int, content: bytes):
        self.status_code, self.content = status_code, content

    def json(self):
        return json.loads(self.content)


class PollerConnection:
    """One poller's keep-alive HTTP/1.1 connection, spoken directly on asyncio streams.

    httpx costs ~1-3 ms of client CPU per request here; 800 polls/s through it would take most of a core of the
    2 that the servers need, and the client's own queueing would be measured as server latency. This costs a
    tenth of that. A connection the server closed while idle is reopened once (counted in `reconnects`)."""

    def __init__(self, host: str, port: int, headers: dict[str, str]):
        self.host, self.port = host, port
        self.head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": f"{host}:{port}", **headers}.items())
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.reconnects = 0

    async def get(self, path: str) -> RawResponse:
        for attempt in (0, 1):
            fresh = self.writer is None
            if fresh:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            try:
                self.writer.write(f"GET {path} HTTP/1.1\r\n{self.head}\r\n".encode())
                return await self._read()
            except (ConnectionError, asyncio.IncompleteReadError):
                self.close()
                if fresh or attempt:
                    raise
                self.reconnects += 1
        raise AssertionError("unreachable")

    async def _read(self) -> RawResponse:
        line = await self.reader.readline()
        if not line:
            raise ConnectionResetError("closed before the status line")
        status = int(line.split(b" ", 2)[1])
        length, chunked, close = None, False, False
        while (h := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = h.partition(b":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value:
                chunked = True
            elif name == b"connection" and value == b"close":
                close = True
        if chunked:
            body = bytearray()
            while size := int((await self.reader.readline()).split(b";")[0], 16):
                body += await self.reader.readexactly(size)
                await self.reader.readexactly(2)
            await self.reader.readline()
            body = bytes(body)
        else:
            body = await self.reader.readexactly(length or 0)
        if close:
            self.close()
        return RawResponse(status, body)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


class Recorder:
    def __init__(self, t0: float):
        self.t0 = t0
        self.rows: list[tuple[str, float, float, int, str]] = []  # kind, start offset s, latency ms, status, error

    async def call(self, kind: str, coro_fn):
        start = time.perf_counter()
        try:
            r = await coro_fn()
            status, err = r.status_code, ""
        except (httpx.HTTPError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
            r, status, err = None, 0, type(exc).__name__
        self.rows.append((kind, start - self.t0, (time.perf_counter() - start) * 1000, status, err))
        return r


async def burst(base: str, headers: dict, model_id: str, uploads: list[bytes], args) -> dict:
    timeout = httpx.Timeout(120.0, connect=30.0)
    tls = ssl.create_default_context()  # unused on http://, but each client would build its own: ~0.1 s of CPU

    def own_client() -> httpx.AsyncClient:
        # one client and connection per simulated user (one shared pool of ~120 connections is scanned by httpcore
        # on every request), all made before the clock starts
        return httpx.AsyncClient(base_url=base, headers=headers, timeout=timeout, verify=tls,
                                 limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))

    spare = [own_client() for _ in range(len(uploads) + args.jobs)]
    host, port = httpx.URL(base).host, httpx.URL(base).port
    reconnects: list[int] = []

    @contextlib.asynccontextmanager
    async def client_of_one_user():
        client = spare.pop()
        try:
            yield client
        finally:
            await client.aclose()

    digests = [hashlib.sha256(d).hexdigest() for d in uploads]  # not on the event loop during the burst
    n_jobs = args.jobs
    submitted: list[str | None] = [None] * n_jobs
    ready = [asyncio.Event() for _ in range(n_jobs)]
    keys = [f"load-{uuid.uuid4().hex}" for _ in range(n_jobs)]
    submit_out: list[dict] = []
    upload_out: list[dict] = []
    seen: dict[str, list[str]] = collections.defaultdict(list)  # job id -> distinct statuses in the order seen
    regressions: list[dict] = []
    body = c.quantize_job_body(model_id)

    t0 = time.perf_counter()
    rec = Recorder(t0)
    end = t0 + args.duration
    lags: list[float] = []

    async def watch_loop():
        """How late the client's own event loop wakes up: its delay is in every latency measured."""
        while time.perf_counter() < end:
            before = time.perf_counter()
            await asyncio.sleep(0.05)
            lags.append((time.perf_counter() - before - 0.05) * 1000)

    async def submit(i: int):
        async with client_of_one_user() as client:
            r = await rec.call("submit", lambda: client.post("/v1/jobs", json=body,
                                                             headers={"Idempotency-Key": keys[i]}))
        out = {"i": i, "key": keys[i], "status": r.status_code if r is not None else 0}
        if r is not None and r.status_code == 202:
            submitted[i] = out["id"] = r.json()["id"]
        elif r is not None:
            out["body"] = r.text[:300]
        submit_out.append(out)
        ready[i].set()

    async def upload(i: int, data: bytes):
        files = {"file": (f"load-{i}.onnx", data, "application/octet-stream")}
        async with client_of_one_user() as client:
            r = await rec.call("upload", lambda: client.post("/v1/models", files=files,
                                                             data={"name": f"load-{i}"}))
        out = {"i": i, "bytes": len(data), "status": r.status_code if r is not None else 0,
               "sha256_ok": r is not None and r.status_code == 201
               and r.json().get("sha256") == digests[i]}
        if r is not None and r.status_code == 201:
            out["id"] = r.json()["id"]
        elif r is not None:
            out["body"] = r.text[:300]
        upload_out.append(out)

    async def poll(i: int):
        j = i % n_jobs
        rng = random.Random(i)
        try:
            await asyncio.wait_for(ready[j].wait(), timeout=max(0.0, end - time.perf_counter()))
        except asyncio.TimeoutError:
            return
        job_id = submitted[j]
        if job_id is None:
            return
        conn = PollerConnection(host, port, headers)
        try:
            while time.perf_counter() < end:
                r = await rec.call("poll", lambda: conn.get(f"/v1/jobs/{job_id}"))
                if r is not None and r.status_code == 200:
                    st = r.json()["status"]
                    hist = seen[job_id]
                    if not hist or hist[-1] != st:
                        if hist and hist[-1] in TERMINAL:  # a terminal job must stay terminal
                            regressions.append({"job": job_id, "after": hist[-1], "saw": st})
                        hist.append(st)
                if args.poll_interval > 0:  # a pause of interval x (1 +- jitter), uniform: mean interval
                    await asyncio.sleep(args.poll_interval * rng.uniform(1 - args.poll_jitter, 1 + args.poll_jitter))
        finally:
            conn.close()
            reconnects.append(conn.reconnects)

    me = psutil.Process()
    cpu0 = me.cpu_times()
    tasks = [asyncio.create_task(submit(i)) for i in range(n_jobs)]
    tasks += [asyncio.create_task(upload(i, d)) for i, d in enumerate(uploads)]
    tasks += [asyncio.create_task(poll(i)) for i in range(args.pollers)]
    tasks.append(asyncio.create_task(watch_loop()))
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    cpu1 = me.cpu_times()
    for client in spare:
        await client.aclose()
    return {"rows": rec.rows, "submits": sorted(submit_out, key=lambda x: x["i"]),
            "uploads": sorted(upload_out, key=lambda x: x["i"]), "seen": dict(seen), "regressions": regressions,
            "wall_s": wall, "client_cpu_cores": round((cpu1.user + cpu1.system - cpu0.user - cpu0.system) / wall, 2),
            "client_loop_lag_ms": stats(lags), "poller_reconnects": sum(reconnects)}


def stats(latencies: list[float]) -> dict:
    if not latencies:
        return {"n": 0}
    return {"n": len(latencies), "p50_ms": round(c.pct(latencies, 50), 2), "p95_ms": round(c.pct(latencies, 95), 2),
            "p99_ms": round(c.pct(latencies, 99), 2), "max_ms": round(max(latencies), 2),
            "mean_ms": round(statistics.fmean(latencies), 2)}


def summarize_requests(rows: list[tuple], duration: float, burst_end: float) -> dict:
    out: dict = {}
    for kind in ("poll", "submit", "upload"):
        mine = [r for r in rows if r[0] == kind]
        codes = collections.Counter(str(r[3]) if r[3] else f"error:{r[4]}" for r in mine)
        out[kind] = {**stats([r[2] for r in mine if r[3]]), "status_codes": dict(sorted(codes.items()))}
    polls = [r for r in rows if r[0] == "poll" and r[3]]
    out["poll"]["during_burst"] = stats([r[2] for r in polls if r[1] < burst_end])
    out["poll"]["after_burst"] = stats([r[2] for r in polls if r[1] >= burst_end])
    out["poll"]["throughput_rps"] = round(len(polls) / duration, 1) if duration else None
    out["all_requests_rps"] = round(len(rows) / duration, 1) if duration else None
    out["http_5xx"] = sum(1 for r in rows if r[3] >= 500)
    out["transport_errors"] = sum(1 for r in rows if r[3] == 0)
    return out


# --- after: what the database says ------------------------------------------------------------------------------

def check_jobs(url: str, submits: list[dict], warmup_ids: list[str], logs: list[Path]) -> dict:
    accepted = {s["id"]: s["key"] for s in submits if s.get("id")}
    rows = db_query(url, "SELECT id, status, attempts, idempotency_key, error_code FROM jobs WHERE owner = %s",
                    (OWNER,))
    by_id = collections.Counter(r[0] for r in rows)
    by_key = collections.Counter(r[3] for r in rows if r[3])
    in_db = {r[0]: r for r in rows}
    lost = sorted(set(accepted) - set(in_db))
    unexpected = sorted(set(in_db) - set(accepted) - set(warmup_ids))
    dup_ids = sorted(k for k, n in by_id.items() if n > 1)
    dup_keys = sorted(k for k, n in by_key.items() if n > 1)
    key_mismatch = sorted(i for i, k in accepted.items() if i in in_db and in_db[i][3] != k)
    status_counts = collections.Counter(r[1] for r in rows if r[0] in accepted)
    outcomes = collections.Counter(f"{r[1]}:{r[4]}" if r[4] else r[1] for r in rows if r[0] in accepted)
    not_terminal = sorted(i for i in accepted if i in in_db and in_db[i][1] not in TERMINAL)
    attempts_not_1 = sorted(i for i in accepted if i in in_db and in_db[i][1] in TERMINAL and in_db[i][2] != 1)
    # claims per job from its event history: each queued -> running transition is one claim
    events = db_query(url, "SELECT job_id, seq, status FROM job_events WHERE job_id = ANY(%s) ORDER BY job_id, seq",
                      (list(accepted),))
    claims_ev: dict[str, int] = collections.Counter()
    seqs: dict[str, list[int]] = collections.defaultdict(list)
    prev: dict[str, str] = {}
    for job_id, seq, status in events:
        seqs[job_id].append(seq)
        if status == "running" and prev.get(job_id) != "running":
            claims_ev[job_id] += 1
        prev[job_id] = status
    seq_gaps = sorted(j for j, s in seqs.items() if s != list(range(1, len(s) + 1)))
    multi_claim_ev = sorted(j for j, n in claims_ev.items() if n > 1)
    # and from the workers' own logs: "job <id>: claimed (attempt n/m)", over all workers
    claims_log: dict[str, int] = collections.Counter()
    for log in logs:
        text = log.read_text(errors="replace") if log.exists() else ""
        for m in re.finditer(r"job ([0-9a-f]{32}): claimed \(attempt", text):
            claims_log[m.group(1)] += 1
    multi_claim_log = sorted(j for j in accepted if claims_log.get(j, 0) > 1)
    return {
        "accepted_202": len(accepted), "rows_of_owner": len(rows), "warmup_jobs": len(warmup_ids),
        "lost": lost, "unexpected_rows": unexpected, "duplicate_ids": dup_ids, "duplicate_idempotency_keys": dup_keys,
        "idempotency_key_mismatch": key_mismatch, "statuses": dict(status_counts), "outcomes": dict(outcomes),
        "not_terminal": not_terminal, "terminal_with_attempts_not_1": attempts_not_1,
        "claimed_more_than_once_by_events": multi_claim_ev, "event_seq_gaps": seq_gaps,
        "claimed_more_than_once_by_worker_logs": multi_claim_log,
        "claims_in_worker_logs": sum(claims_log.get(j, 0) for j in accepted),
    }


def check_uploads(url: str, uploads: list[dict]) -> dict:
    ok = [u for u in uploads if u.get("id")]
    rows = db_query(url, "SELECT id FROM models WHERE id = ANY(%s)", ([u["id"] for u in ok],))
    return {"accepted_201": len(ok), "rows": len(rows), "sha256_ok": sum(u["sha256_ok"] for u in uploads),
            "missing_rows": sorted({u["id"] for u in ok} - {r[0] for r in rows})}


# --- docs -------------------------------------------------------------------------------------------------------

def write_docs(result: dict) -> bool:
    from bench.summarize import load_md

    text = DOCS.read_text()
    if DOCS_BEGIN not in text or DOCS_END not in text:
        print(f"{DOCS.relative_to(c.ROOT)} has no {DOCS_BEGIN} ... {DOCS_END} markers; not updated", file=sys.stderr)
        return False
    head, rest = text.split(DOCS_BEGIN, 1)
    _, tail = rest.split(DOCS_END, 1)
    DOCS.write_text(f"{head}{DOCS_BEGIN}\n{load_md(result)}\n{DOCS_END}{tail}")
    return True


# --- main -------------------------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pollers", type=int, default=200)
    ap.add_argument("--uploads", type=int, default=20)
    ap.add_argument("--upload-mb", type=float, default=4.0)
    ap.add_argument("--jobs", type=int, default=100)
    ap.add_argument("--duration", type=float, default=30.0, help="seconds the pollers poll, from the start")
    ap.add_argument("--poll-interval", type=float, default=0.25, help="pause after each poll (0: back to back)")
    ap.add_argument("--poll-jitter", type=float, default=0.5,
                    help="each pause is interval x uniform(1 - j, 1 + j), so that pollers do not stay in lockstep "
                         "(0: fixed pauses)")
    ap.add_argument("--workers", type=int, default=2, help="Celery worker processes (concurrency 1 each)")
    ap.add_argument("--drain-timeout", type=float, default=600.0, help="seconds to wait for the jobs to end")
    ap.add_argument("--dump-rows", help="write every request (kind, start s, latency ms, status, error) here")
    ap.add_argument("--no-docs", action="store_true", help="do not rewrite the Load section of docs/benchmarks.md")
    args = ap.parse_args()
    c.mark_start()

    db = f"distillery_load_{uuid.uuid4().hex[:10]}"
    url_sa, url_pg = pg_url(db), pg_url(db, "postgresql")
    tmp = c.temp_dir("load")
    env = c.clean_env(DISTILLERY_DATABASE_URL=url_sa, DISTILLERY_BROKER_URL=REDIS_URL,
                      DISTILLERY_DATA_DIR=str(tmp / "data"), DISTILLERY_RATE_LIMIT_PER_MINUTE=c.RATE_LIMIT_PER_MINUTE,
                      DISTILLERY_MAX_CONCURRENT_JOBS_PER_OWNER=str(args.jobs + 10),
                      **{k: v for k, v in os.environ.items() if k in PASSED_THROUGH})
    procs: list[c.Proc] = []
    try:
        create_db(db)
        flush_redis()
        c.migrate(env)
        key = c.create_key(env, owner=OWNER)
        if not key:
            raise RuntimeError("this tree has no `distillery keys create`")
        auth = c.auth_headers(key)
        port = c.free_port()
        base = f"http://127.0.0.1:{port}"
        api = c.Proc("api", [c.DISTILLERY, "api", "--host", "127.0.0.1", "--port", str(port), "--workers", "2"],
                      env, tmp)
        procs.append(api)
        workers = [c.Proc(f"worker{i + 1}", [c.DISTILLERY, "worker", "--queues", "cpu", "--concurrency", "1",
                                             "--name", f"load{i + 1}@%h"], env, tmp) for i in range(args.workers)]
        procs += workers
        api.wait_http(f"{base}/readyz")
        wait_workers(url_pg, args.workers, 120, procs)
        print(f"up: api (2 processes) + {args.workers} workers on {db}; building {args.uploads} uploads of "
              f"{args.upload_mb} MB", flush=True)

        model_id = c.upload_model(base, c.tiny_onnx_bytes(), headers=auth)
        uploads = [random_onnx_bytes(args.upload_mb, seed) for seed in range(args.uploads)]
        warm = httpx.post(f"{base}/v1/jobs", json=c.quantize_job_body(model_id), headers=auth, timeout=60)
        if warm.status_code != 202:
            raise RuntimeError(f"warm-up submit failed: {warm.status_code} {warm.text}")
        warm_ok, warm_s = wait_jobs_terminal(url_pg, [warm.json()["id"]], 300)
        warm_status = db_query(url_pg, "SELECT status, error_code FROM jobs WHERE id = %s", (warm.json()["id"],))[0]
        print(f"warm-up job: {warm_status[0]} in {warm_s:.1f} s", flush=True)

        quiet = c.wait_quiet()
        api_tree, worker_trees = tree(api.pid), [p for w in workers for p in tree(w.pid)]
        api_cpu0, workers_cpu0 = cpu_s(api_tree), cpu_s(worker_trees)
        api_wait0 = run_queue_wait_s(api_tree)
        machine_busy0 = psutil.cpu_times()
        t_wall0 = time.monotonic()
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:
            runner = asyncio.run
        out = runner(burst(base, auth, model_id, uploads, args))
        busy1 = psutil.cpu_times()
        window = time.monotonic() - t_wall0
        api_cpu1 = cpu_s(api_tree)
        api_wait = cpu_delta(api_wait0, run_queue_wait_s(api_tree))
        api_cpu = cpu_delta(api_cpu0, api_cpu1)
        api_per_process = sorted((round(max(0.0, api_cpu1[pid] - api_cpu0[pid]) / window, 2)
                                  for pid in api_cpu0.keys() & api_cpu1.keys()), reverse=True)
        workers_cpu = cpu_delta(workers_cpu0, cpu_s(worker_trees))

        def busy(t):
            return t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)

        rows = out["rows"]
        if args.dump_rows:  # every request: kind, start offset s, latency ms, status, error
            Path(args.dump_rows).write_text(json.dumps(rows))
        burst_end = max([r[1] + r[2] / 1000 for r in rows if r[0] in ("submit", "upload")], default=0.0)
        requests = summarize_requests(rows, out["wall_s"], burst_end)
        ids = [s["id"] for s in out["submits"] if s.get("id")]
        print(f"burst done in {out['wall_s']:.1f} s (submissions and uploads done after {burst_end:.1f} s); "
              f"{requests['poll']['n']} polls, p99 {requests['poll'].get('p99_ms')} ms; draining {len(ids)} jobs",
              flush=True)
        drained, drain_s = wait_jobs_terminal(url_pg, ids, args.drain_timeout) if ids else (True, 0.0)
        finished = db_query(url_pg, "SELECT min(started_at), max(finished_at), count(*) FROM jobs WHERE id = ANY(%s) "
                                    "AND finished_at IS NOT NULL", (ids,))[0] if ids else (None, None, 0)
        jobs = check_jobs(url_pg, out["submits"], [warm.json()["id"]], [w.log_path for w in workers])
        uploads_check = check_uploads(url_pg, out["uploads"])
        problems = [f"{p.name} exited early ({p.proc.returncode}): {p.log_tail(1500)}" for p in procs
                    if p.proc.poll() is not None]
        api_tracebacks = api.log_tail(10**7).count("Traceback")

        jobs_ok = not (jobs["lost"] or jobs["unexpected_rows"] or jobs["duplicate_ids"]
                       or jobs["duplicate_idempotency_keys"] or jobs["idempotency_key_mismatch"]
                       or jobs["terminal_with_attempts_not_1"] or jobs["claimed_more_than_once_by_events"]
                       or jobs["claimed_more_than_once_by_worker_logs"] or jobs["event_seq_gaps"]
                       or out["regressions"] or requests["poll"]["status_codes"].get("404")) \
            and jobs["accepted_202"] == args.jobs
        p99 = requests["poll"].get("p99_ms")
        verdict = {
            "no_5xx": requests["http_5xx"] == 0, "http_5xx": requests["http_5xx"],
            "transport_errors": requests["transport_errors"],
            "jobs_exactly_once": jobs_ok, "all_jobs_terminal": drained and not jobs["not_terminal"],
            "uploads_ok": uploads_check["accepted_201"] == args.uploads == uploads_check["sha256_ok"]
            and not uploads_check["missing_rows"],
            "poll_p99_ms": p99, "p99_target_ms": P99_TARGET_MS, "p99_pass": p99 is not None and p99 < P99_TARGET_MS,
        }
        verdict["pass"] = all(verdict[k] for k in ("no_5xx", "jobs_exactly_once", "uploads_ok", "p99_pass")) \
            and verdict["transport_errors"] == 0
        result = {
            "setup": {"api": " ".join(api.cmd), "workers": [" ".join(w.cmd) for w in workers],
                      "database": f"PostgreSQL, fresh database {db} (dropped after)", "broker": REDIS_URL,
                      "pollers": args.pollers, "poll_interval_s": args.poll_interval,
                      "poll_jitter": args.poll_jitter, "duration_s": args.duration,
                      "uploads": args.uploads, "upload_bytes_min_max": [min(map(len, uploads), default=0), max(map(len, uploads), default=0)],
                      "upload_mb": args.upload_mb, "jobs": args.jobs, "job_body": c.quantize_job_body("<model id>"),
                      "client": "one process, asyncio" + (" (uvloop)" if runner is not asyncio.run else "")
                                + f", httpx {httpx.__version__}, one AsyncClient, keep-alive",
                      "env": {k: v for k, v in env.items() if k.startswith("DISTILLERY_")
                              and k not in ("DISTILLERY_DATA_DIR",)}},
            "warmup_job": {"status": warm_status[0], "error": warm_status[1], "s": round(warm_s, 1)},
            "machine_quiet_check": quiet,
            "burst": {"wall_s": round(out["wall_s"], 2), "submissions_and_uploads_done_s": round(burst_end, 2),
                      "client_cpu_cores": out["client_cpu_cores"], "client_loop_lag_ms": out["client_loop_lag_ms"],
                      "poller_reconnects_after_idle_close": out["poller_reconnects"],
                      "machine_busy_cores": round((busy(busy1) - busy(machine_busy0)) / window, 2),
                      "api_processes_cores": round(api_cpu / window, 2),
                      "api_cores_per_process": api_per_process,
                      "api_run_queue_wait_s_per_s": round(api_wait / window, 3),
                      "api_cpu_ms_per_request": round(api_cpu * 1000 / max(1, len(rows)), 3),
                      "worker_processes_cores_without_job_processes": round(workers_cpu / window, 2)},
            "requests": requests,
            "uploads": {**uploads_check, "mb_per_s_aggregate": round(
                sum(u["bytes"] for u in out["uploads"] if u.get("id")) / 1e6
                / max(1e-9, max((r[1] + r[2] / 1000 for r in rows if r[0] == "upload"), default=0.0)), 1)},
            "drain": {"all_terminal": drained, "waited_after_burst_s": round(drain_s, 1),
                      "first_start_to_last_finish_s": round((finished[1] - finished[0]).total_seconds(), 1)
                      if finished[0] and finished[1] else None,
                      "jobs_per_minute": round(finished[2] / ((finished[1] - finished[0]).total_seconds() / 60), 1)
                      if finished[0] and finished[1] and finished[1] > finished[0] else None},
            "jobs": jobs, "status_regressions_seen_by_pollers": out["regressions"],
            "api_log_tracebacks": api_tracebacks, "problems": problems, "verdict": verdict,
        }
        path = c.write_results("load", result)
        saved = json.loads(path.read_text())
        from bench.summarize import load_md

        print()
        print(load_md(saved))
        print(f"\nwrote {path.relative_to(c.ROOT)}")
        if not args.no_docs and write_docs(saved):
            print(f"updated the Load section of {DOCS.relative_to(c.ROOT)}")
        return 0 if verdict["pass"] else 1
    finally:
        for p in reversed(procs):
            p.stop()
        drop_db(db)
        flush_redis()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
