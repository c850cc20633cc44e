"""Status polling: `GET /v1/jobs/{id}` on PostgreSQL vs a constant-JSON FastAPI endpoint, same server setup.

Both are served by uvicorn with 2 processes (`distillery api --workers 2`, `uvicorn bench.const_app:app
--workers 2`), both at log level info, on loopback, measured in the same run with wrk (-t2 -c64 -d10s --latency),
alternating const, jobs, const, jobs. No Celery worker runs: the job stays queued, which is what a poller sees.

Targets: jobs req/s >= 0.3x the constant endpoint's, and jobs p99 < 100 ms (in every round).

    .venv/bin/python bench/polling.py [--duration 10] [--connections 64] [--rounds 2]
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _common as c  # noqa: E402

RATIO_TARGET = 0.3
P99_TARGET_MS = 100.0
_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"unparsed wrk latency {text!r}")
    return float(m.group(1)) * _UNIT_MS[m.group(2)]


def parse_wrk(out: str) -> dict:
    res: dict = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}
    for q in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{q}%\s+(\S+)", out, re.M)
        res[f"p{q}_ms"] = round(_ms(m.group(1)), 3) if m else None
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    res["requests"] = int(m.group(1)) if m else None
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    res["socket_errors"] = dict(zip(("connect", "read", "write", "timeout"), map(int, m.groups()))) if m else {}
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["non_2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Latency\s+(\S+)\s+(\S+)\s+(\S+)", out)
    if m:
        res["mean_ms"], res["max_ms"] = round(_ms(m.group(1)), 3), round(_ms(m.group(3)), 3)
    return res


def _cpu_s(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _postgres_procs() -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["name"]):
        if (p.info["name"] or "").startswith("postgres"):
            out.append(p)
    return out


def pg_counters() -> dict:
    """Cumulative counters of the benchmark database: connections opened, transactions."""
    import psycopg

    with psycopg.connect(c.PG_ADMIN_URL, autocommit=True) as conn:
        row = conn.execute("SELECT sessions, xact_commit, xact_rollback FROM pg_stat_database WHERE datname = %s",
                           (c.BENCH_DB,)).fetchone()
    return {"sessions": row[0], "xact_commit": row[1], "xact_rollback": row[2]}


def _busy_s() -> float:
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)


def run_wrk(url: str, duration: int, connections: int, threads: int, server_pid: int, db: bool = False,
            headers: dict | None = None) -> dict:
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency", "--timeout", "10s"]
    for k, v in (headers or {}).items():
        cmd += ["-H", f"{k}: {v}"]
    cmd.append(url)
    load_before = round(os.getloadavg()[0], 2)
    servers = _tree(server_pid)
    pg_start = {p.pid: (p, _cpu_s([p])) for p in _postgres_procs()}
    pg0 = pg_counters() if db else None
    s0, b0 = _cpu_s(servers), _busy_s()
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    wall = time.monotonic() - t0
    s1, b1 = _cpu_s(servers), _busy_s()
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    wrk_cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    pg_cpu = 0.0  # backends alive before and after; connections opened during the run are not counted
    for p in _postgres_procs():
        if p.pid in pg_start:
            pg_cpu += max(0.0, _cpu_s([p]) - pg_start[p.pid][1])
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed: {proc.stderr}")
    res = parse_wrk(proc.stdout)
    res["cpu_cores_busy"] = {"server_processes": round((s1 - s0) / wall, 2),
                             "postgres_backends_alive_throughout": round(pg_cpu / wall, 2),
                             "wrk": round(wrk_cpu / wall, 2),
                             "whole_machine": round((b1 - b0) / wall, 2)}
    res["cpu_cores_busy"]["everything_else"] = round(max(0.0, (b1 - b0) - (s1 - s0) - pg_cpu - wrk_cpu) / wall, 2)
    res["server_cpu_ms_per_request"] = round((s1 - s0) * 1000 / res["requests"], 3) if res["requests"] else None
    res["load_avg_1m_before"] = load_before
    if db:
        pg1 = pg_counters()
        n = max(1, res["requests"] or 1)
        res["postgres_per_request"] = {
            "new_connections": round((pg1["sessions"] - pg0["sessions"]) / n, 4),
            "transactions": round(((pg1["xact_commit"] - pg0["xact_commit"])
                                   + (pg1["xact_rollback"] - pg0["xact_rollback"])) / n, 3),
            "new_connections_total": pg1["sessions"] - pg0["sessions"],
        }
    res["wrk_command"] = re.sub(r"Bearer \S+", "Bearer <key>", " ".join(cmd))
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3, help="seconds of unrecorded load on each server first")
    ap.add_argument("--no-diagnostics", action="store_true",
                    help="skip the extra runs (API /healthz at c=64, jobs at c=16) that locate the cost")
    args = ap.parse_args()
    c.mark_start()
    if not shutil.which("wrk"):
        print("wrk is not installed (Debian package `wrk`)", file=sys.stderr)
        return 2

    tmp = c.temp_dir("polling")
    env = c.prod_env(tmp / "data")
    procs: list[c.Proc] = []
    try:
        c.recreate_pg_db()
        c.flush_redis()
        c.migrate(env)
        key = c.create_key(env)
        auth = c.auth_headers(key)
        api_port, const_port = c.free_port(), c.free_port()
        api = c.Proc("api", [c.DISTILLERY, "api", "--host", "127.0.0.1", "--port", str(api_port), "--workers", "2"],
                     env, tmp)
        procs.append(api)
        const = c.Proc("const", [str(c.VENV_BIN / "uvicorn"), "bench.const_app:app", "--host", "127.0.0.1",
                                 "--port", str(const_port), "--workers", "2", "--log-level", "info",
                                 "--proxy-headers"], c.clean_env(), tmp)
        procs.append(const)
        api_base, const_url = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{const_port}/const"
        api.wait_http(f"{api_base}/readyz")
        const.wait_http(const_url)

        model_id = c.upload_model(api_base, c.tiny_onnx_bytes(), headers=auth)
        r = httpx.post(f"{api_base}/v1/jobs", json=c.quantize_job_body(model_id), timeout=30, headers=auth)
        if r.status_code != 202:
            raise RuntimeError(f"job submit failed: {r.status_code} {r.text}")
        job_id = r.json()["id"]
        jobs_url = f"{api_base}/v1/jobs/{job_id}"
        job_json = httpx.get(jobs_url, timeout=10, headers=auth)
        const_json = httpx.get(const_url, timeout=10)
        assert job_json.status_code == 200 and job_json.json()["status"] == "queued", job_json.text
        sizes = {"jobs_body_bytes": len(job_json.content), "const_body_bytes": len(const_json.content)}

        quiet = c.wait_quiet()
        targets = {"const": (const_url, const.pid, {}), "jobs": (jobs_url, api.pid, auth)}
        for name, (url, pid, hdrs) in targets.items():  # warm both (connection pools, imports, caches)
            run_wrk(url, args.warmup, args.connections, args.threads, pid, headers=hdrs)

        rounds = []
        for i in range(args.rounds):
            rnd = {}
            for name in ("const", "jobs"):
                url, pid, hdrs = targets[name]
                rnd[name] = run_wrk(url, args.duration, args.connections, args.threads, pid, db=name == "jobs",
                                    headers=hdrs)
                print(f"round {i + 1} {name}: {rnd[name]['rps']:.0f} req/s, p50 {rnd[name]['p50_ms']} ms, "
                      f"p99 {rnd[name]['p99_ms']} ms", flush=True)
            rnd["ratio"] = round(rnd["jobs"]["rps"] / rnd["const"]["rps"], 4)
            rounds.append(rnd)

        diagnostics = {}
        if not args.no_diagnostics:
            diagnostics["api_healthz_c64"] = run_wrk(f"{api_base}/healthz", args.duration, args.connections,
                                                     args.threads, api.pid)
            diagnostics["jobs_c16"] = run_wrk(jobs_url, args.duration, 16, args.threads, api.pid, db=True,
                                              headers=auth)

        mean_const = sum(r["const"]["rps"] for r in rounds) / len(rounds)
        mean_jobs = sum(r["jobs"]["rps"] for r in rounds) / len(rounds)
        ratio = mean_jobs / mean_const
        worst_p99 = max(r["jobs"]["p99_ms"] for r in rounds)
        errors = sum(r[n]["non_2xx"] + sum(r[n]["socket_errors"].values()) for r in rounds for n in ("const", "jobs"))
        verdict = {
            "ratio_mean": round(ratio, 4), "ratio_target": RATIO_TARGET, "ratio_pass": ratio >= RATIO_TARGET,
            "ratio_pass_every_round": all(r["ratio"] >= RATIO_TARGET for r in rounds),
            "jobs_p99_worst_ms": worst_p99, "p99_target_ms": P99_TARGET_MS, "p99_pass": worst_p99 < P99_TARGET_MS,
            "errors_total": errors,
            "informational_cpu_normalized_ratio": round(
                sum(r["const"]["server_cpu_ms_per_request"] for r in rounds)
                / sum(r["jobs"]["server_cpu_ms_per_request"] for r in rounds), 4),
        }
        def row(label, name, x, ratio=""):
            pgr = x.get("postgres_per_request", {})
            return [label, name, f"{x['rps']:.0f}", x["p50_ms"], x["p99_ms"], x["non_2xx"] + sum(x["socket_errors"].values()),
                    x["cpu_cores_busy"]["server_processes"], x["cpu_cores_busy"]["everything_else"],
                    x["server_cpu_ms_per_request"], pgr.get("new_connections", ""), pgr.get("transactions", ""), ratio]

        rows = []
        for i, r in enumerate(rounds, 1):
            rows += [row(i, "const", r["const"]), row(i, "jobs", r["jobs"], r["ratio"])]
        rows += [row("diag", name, x) for name, x in diagnostics.items()]
        print()
        print(c.table(rows, ["round", "endpoint", "req/s", "p50 ms", "p99 ms", "errors", "server cores",
                             "rest cores", "server cpu ms/req", "pg conn/req", "pg tx/req", "jobs/const"]))
        print()
        print(f"jobs/const req/s (mean of rounds): {ratio:.3f}  target >= {RATIO_TARGET}: "
              f"{'PASS' if verdict['ratio_pass'] else 'FAIL'}")
        print(f"(informational) const CPU per request / jobs CPU per request: "
              f"{verdict['informational_cpu_normalized_ratio']:.3f} -- the ratio if both got the same CPU")
        print(f"jobs p99 (worst round): {worst_p99} ms  target < {P99_TARGET_MS:.0f} ms: "
              f"{'PASS' if verdict['p99_pass'] else 'FAIL'}")
        out = c.write_results("polling", {
            "setup": {"api": " ".join(api.cmd), "const": " ".join(const.cmd), "database": "PostgreSQL (" + c.PG_URL + ")",
                      "broker": c.REDIS_URL, "connections": args.connections, "threads": args.threads,
                      "duration_s": args.duration, "api_key": bool(key),
                      "rate_limit_per_minute": c.RATE_LIMIT_PER_MINUTE, "warmup_s": args.warmup, "order": "const, jobs per round",
                      **sizes},
            "machine_quiet_check": quiet, "rounds": rounds, "diagnostics": diagnostics, "verdict": verdict,
        })
        print(f"wrote {out.relative_to(c.ROOT)}")
        return 0
    finally:
        for p in reversed(procs):
            p.stop()
        c.drop_pg_db()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
