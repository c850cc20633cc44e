"""Where the time of `GET /v1/jobs/{id}` goes (diagnostics for bench/polling.py; measures, changes nothing).

1. In process (PostgreSQL + Redis settings, the real create_app, httpx ASGITransport, one request at a time):
   per request, the thread-pool hops (anyio.to_thread.run_sync calls), PostgreSQL transactions and new
   connections (pg_stat_database), SQLAlchemy statements/pre-pings; the CPU per request vs the same app's async
   `/healthz` and vs the same GET sent on to FastAPI's route (`?via=route`, which the fast path leaves alone); the cost of one thread hop by itself; and a cProfile (event-loop thread) of the GETs.
2. Under load (needs py-spy: `.venv/bin/pip install py-spy`): `distillery api --workers 2` under wrk -c64, both
   workers sampled with `py-spy record --gil --nonblocking --subprocesses` (who holds each process's GIL, i.e. its CPU), then
   the samples grouped by the package of the innermost frame, plus inclusive shares of chosen functions.

    .venv/bin/python bench/profile_polling.py [--requests 1000] [--duration 10]
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import cProfile
import io
import os
import pstats
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _common as c  # noqa: E402
from bench.polling import pg_counters  # noqa: E402


# ----------------------------------------------------------------------------- 1. in process

async def in_process(tmp: Path, n: int, headers: dict) -> dict:
    import anyio.to_thread

    from app.core.config import Settings
    from app.main import create_app

    settings = Settings(database_url=c.PG_URL, broker_url=c.REDIS_URL, data_dir=tmp / "data", log_level="WARNING",
                        rate_limit_per_minute=int(c.RATE_LIMIT_PER_MINUTE))
    app = create_app(settings)
    counts = collections.Counter()
    real_run_sync = anyio.to_thread.run_sync

    async def counting_run_sync(*a, **kw):
        counts["thread_hops"] += 1
        return await real_run_sync(*a, **kw)

    out: dict = {}
    try:
        return await _in_process_body(app, counts, counting_run_sync, real_run_sync, out, n, headers)
    except BaseException:
        services = getattr(app.state, "services", None)
        if services is not None:  # the lifespan's own close is skipped on an exception
            result = services.close()
            if asyncio.iscoroutine(result):
                await result
        raise


async def _in_process_body(app, counts, counting_run_sync, real_run_sync, out, n, headers) -> dict:
    import anyio.to_thread
    from sqlalchemy import event

    async with app.router.lifespan_context(app):
        engine = app.state.services.db.engine

        @event.listens_for(engine, "before_cursor_execute")
        def _sql(*_a, **_k):
            counts["sqlalchemy_statements"] += 1

        @event.listens_for(engine, "checkout")
        def _checkout(*_a, **_k):
            counts["sqlalchemy_pool_checkouts"] += 1

        @event.listens_for(engine, "connect")
        def _connect(*_a, **_k):
            counts["sqlalchemy_new_connections"] += 1

        dialect = engine.dialect
        real_ping = dialect.do_ping

        def counting_ping(conn):
            counts["sqlalchemy_pre_pings"] += 1
            return real_ping(conn)

        dialect.do_ping = counting_ping
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench", headers=headers) as client:
            files = {"file": ("m.onnx", c.tiny_onnx_bytes(), "application/octet-stream")}
            model_id = (await client.post("/v1/models", files=files)).json()["id"]
            job_id = (await client.post("/v1/jobs", json=c.quantize_job_body(model_id))).json()["id"]
            for path in ("/healthz", f"/v1/jobs/{job_id}"):  # warm
                for _ in range(50):
                    assert (await client.get(path)).status_code == 200

            anyio.to_thread.run_sync = counting_run_sync
            try:
                per = {}
                # get_job is answered by JobPollFastPath; a query string sends the same GET on to FastAPI's route
                for label, path in (("healthz", "/healthz"), ("get_job", f"/v1/jobs/{job_id}"),
                                    ("get_job_via_route", f"/v1/jobs/{job_id}?via=route")):
                    counts.clear()
                    pg0 = pg_counters()
                    t_cpu, t_wall = time.process_time(), time.perf_counter()
                    for _ in range(n):
                        r = await client.get(path)
                        assert r.status_code == 200
                    cpu, wall = time.process_time() - t_cpu, time.perf_counter() - t_wall
                    time.sleep(11)  # an idle PostgreSQL backend publishes its counters only after 10 s
                    pg1 = pg_counters()
                    per[label] = {"cpu_ms_per_request": round(cpu * 1000 / n, 3),
                                  "wall_ms_per_request": round(wall * 1000 / n, 3),
                                  "pg_transactions": round((pg1["xact_commit"] + pg1["xact_rollback"]
                                                            - pg0["xact_commit"] - pg0["xact_rollback"]) / n, 3),
                                  "pg_new_connections": round((pg1["sessions"] - pg0["sessions"]) / n, 3),
                                  **{k: round(v / n, 3) for k, v in sorted(counts.items())}}
            finally:
                anyio.to_thread.run_sync = real_run_sync
            out["per_request"] = per

            prof = cProfile.Profile()
            prof.enable()
            for _ in range(n):
                await client.get(f"/v1/jobs/{job_id}")
            prof.disable()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
            out["cprofile_get_job_tottime_top25"] = _trim_pstats(buf.getvalue())

        # one thread-pool hop by itself (what each sync dependency/endpoint/response validation costs)
        t = time.perf_counter()
        for _ in range(2000):
            await real_run_sync(lambda: None)
        out["one_thread_hop_wall_ms"] = round((time.perf_counter() - t) * 1000 / 2000, 4)
    return out


def _trim_pstats(text: str) -> list[str]:
    lines = [l.rstrip() for l in text.splitlines() if l.strip()]
    start = next((i for i, l in enumerate(lines) if l.lstrip().startswith("ncalls")), 0)
    return [re.sub(r"/\S*/site-packages/", "", l.replace(str(c.ROOT) + "/", "")) for l in lines[start:]]


# ----------------------------------------------------------------------------- 2. under load

GROUPS = [  # (group, regex on the innermost frame's "function (file)") -- first match wins
    ("thread-pool hand-offs (anyio worker threads, queue/Condition, GIL hand-over)",
     r"\((anyio/|threading\.py|queue\.py|concurrent/)"),
    ("SQLAlchemy (ORM, Core, pool, pre-ping)", r"\(sqlalchemy/"),
    ("psycopg (driver, socket waits)", r"\(psycopg"),
    ("uvicorn access log (logging)", r"\((logging/|uvicorn/logging\.py)"),
    ("pydantic validation / serialization", r"\((pydantic|fastapi/_compat|fastapi/encoders)"),
    ("FastAPI/Starlette routing, dependency injection, middleware", r"\((fastapi|starlette)/"),
    ("uvicorn HTTP + asyncio event loop", r"\((uvicorn/|httptools|asyncio/|uvloop|selectors\.py)"),
    ("application code (app/)", r"\(app/"),
]
KEY_FUNCTIONS = {
    "JobPollFastPath (below the router, app/jobs/poll_middleware.py)": r"^JobPollFastPath\.__call__ ",
    "get_job endpoint (app/jobs/endpoints.py)": r"^get_job \(app/jobs/endpoints\.py",
    "JobReader.job_json (async pool + query, app/jobs/poll_reader.py)": r"^JobReader\.job_json ",
    "render (JSON assembly, app/jobs/poll_reader.py)": r"^render \(app/jobs/poll_reader\.py",
    "solve_dependencies (FastAPI DI, incl. their thread hops)": r"^solve_dependencies ",
    "anyio run_sync_in_worker_thread (submitting hops)": r"^AsyncIOBackend\.run_sync_in_worker_thread ",
    "WorkerThread.run (anyio pool threads, all work in them)": r"^WorkerThread\.run ",
    "SQLAlchemy pre-ping (_do_ping_w_event)": r"^DefaultDialect\._do_ping_w_event ",
    "new PG connection (Pool._create_connection)": r"^Pool\._create_connection ",
    "connection returned to the pool (_finalize_fairy)": r"^_finalize_fairy ",
    "Session.scalars (the SELECT, ORM load)": r"^Session\.scalars ",
    "serialize_response (response_model validate + dump)": r"^serialize_response ",
    "uvicorn access log (Logger.info)": r"^Logger\.info ",
}


def _frame_key(frame: str) -> str:
    return re.sub(r":\d+\)$", ")", frame)


def analyse_raw(path: Path) -> dict:
    total = 0
    groups = collections.Counter()
    incl = collections.Counter()
    selfs = collections.Counter()
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        stack, n = line.rsplit(" ", 1)
        n = int(n)
        total += n
        frames = [_frame_key(f) for f in stack.split(";")]
        leaf = frames[-1]
        selfs[leaf] += n
        for g, rx in GROUPS:
            if re.search(rx, leaf):
                groups[g] += n
                break
        else:
            groups["other"] += n
        for name, rx in KEY_FUNCTIONS.items():
            if any(re.search(rx, f) for f in frames):
                incl[name] += n
    pc = lambda v: round(100 * v / total, 1) if total else 0.0  # noqa: E731
    return {"samples": total,
            "self_time_by_group_pct": {g: pc(v) for g, v in groups.most_common()},
            "inclusive_pct": {k: pc(incl[k]) for k in KEY_FUNCTIONS},
            "top_self_frames_pct": {k: pc(v) for k, v in selfs.most_common(20)}}


def under_load(tmp: Path, duration: int, connections: int) -> dict:
    pyspy = shutil.which("py-spy") or str(c.VENV_BIN / "py-spy")
    if not Path(pyspy).exists():
        return {"skipped": "py-spy is not installed (.venv/bin/pip install py-spy)"}
    env = c.prod_env(tmp / "data")
    c.recreate_pg_db()
    c.flush_redis()
    c.migrate(env)
    auth = c.auth_headers(c.create_key(env))
    wrk_h = [a for k, v in auth.items() for a in ("-H", f"{k}: {v}")]
    port = c.free_port()
    base = f"http://127.0.0.1:{port}"
    api = c.Proc("api", [c.DISTILLERY, "api", "--host", "127.0.0.1", "--port", str(port), "--workers", "2"], env, tmp)
    try:
        api.wait_http(f"{base}/readyz")
        model_id = c.upload_model(base, c.tiny_onnx_bytes(), headers=auth)
        job_id = httpx.post(f"{base}/v1/jobs", json=c.quantize_job_body(model_id), timeout=30,
                            headers=auth).json()["id"]
        url = f"{base}/v1/jobs/{job_id}"
        subprocess.run(["wrk", "-t2", f"-c{connections}", "-d3s", *wrk_h, url], capture_output=True, timeout=60)
        quiet = c.wait_quiet()
        raw = tmp / "pyspy.txt"
        spy = subprocess.Popen([pyspy, "record", "--pid", str(api.pid), "--subprocesses", "--gil", "--nonblocking", "--format", "raw",
                                "--rate", "100", "--duration", str(duration), "--output", str(raw)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(1.0)
        wrk = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--latency", *wrk_h, url],
                             capture_output=True, text=True, timeout=duration + 60)
        spy_out = spy.communicate(timeout=duration + 60)[0]
        if not raw.exists():
            return {"skipped": f"py-spy wrote nothing: {spy_out[-800:]}"}
        res = analyse_raw(raw)
        res["machine_quiet_check"] = quiet
        res["py_spy"] = spy_out.strip().splitlines()[-2:] if spy_out.strip() else []
        m = re.search(r"Requests/sec:\s+([\d.]+)", wrk.stdout)
        res["wrk_rps_while_sampled"] = float(m.group(1)) if m else None
        res["wrk_p99_while_sampled"] = (re.search(r"99%\s+(\S+)", wrk.stdout) or [None, None])[1]
        return res
    finally:
        api.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--connections", type=int, default=64)
    args = ap.parse_args()
    c.mark_start()
    tmp = c.temp_dir("profile")
    try:
        c.recreate_pg_db()
        c.flush_redis()
        c.migrate(c.prod_env(tmp / "data"))
        key = c.create_key(c.prod_env(tmp / "data"))
        inproc = asyncio.run(in_process(tmp, args.requests, c.auth_headers(key)))
        load = under_load(tmp, args.duration, args.connections)
    finally:
        c.drop_pg_db()
        shutil.rmtree(tmp, ignore_errors=True)
    pr = inproc["per_request"]
    print(c.table([[k, v["cpu_ms_per_request"], v["wall_ms_per_request"], v.get("thread_hops", 0),
                    v["pg_transactions"], v["pg_new_connections"], v.get("sqlalchemy_statements", 0),
                    v.get("sqlalchemy_pre_pings", 0)] for k, v in pr.items()],
                  ["in process, 1 at a time", "CPU ms/req", "wall ms/req", "thread hops", "PG tx", "PG new conns",
                   "SQLAlchemy stmts", "pre-pings"]))
    print(f"\none thread-pool hop by itself: {inproc['one_thread_hop_wall_ms']} ms wall")
    if "self_time_by_group_pct" in load:
        print(f"\nunder load (wrk -c{args.connections}, {load['wrk_rps_while_sampled']} req/s while sampled), "
              f"GIL-holding samples by innermost frame ({load['samples']} samples):")
        print(c.table([[g, v] for g, v in load["self_time_by_group_pct"].items()], ["group", "% of GIL time"]))
        print(c.table([[g, v] for g, v in load["inclusive_pct"].items()], ["function (inclusive)", "% of GIL time"]))
    else:
        print("\nunder load:", load)
    out = c.write_results("polling_profile", {"in_process": inproc, "under_load": load})
    print(f"wrote {out.relative_to(c.ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
