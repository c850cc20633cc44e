"""Dispatch latency: from the 202 response of POST /v1/jobs to the worker's claim of the job (its started_at).

Two stacks, one after the other, in the same run:
  redis:    PostgreSQL + Redis; `distillery api --workers 2` and `distillery worker --queues cpu --concurrency 1`.
  embedded: `distillery serve` (SQLite + kombu's file-system broker, its own local worker); no DB/broker env.
Jobs are real (quantize/dynamic_int8 on a 64-256-10 MLP, benchmark batch 1, 1 repeat) and are submitted one at a
time: each is followed (GET /v1/jobs/{id} every --poll seconds) until it is terminal, then --gap seconds pass, so
every job finds the single worker slot idle (with --concurrency 1 a job submitted while the previous one still
runs would wait for it, and that wait is not dispatch latency). The claim time is the job's `started_at`, written
by the worker's conditional UPDATE (same machine, same clock as the client's time.time()).

Targets: p50 < 25 ms on Redis, p50 < 200 ms on the embedded default.

    .venv/bin/python bench/dispatch.py [--jobs 60] [--warmup 2] [--only redis|embedded]
"""
from __future__ import annotations

import argparse
import datetime as dt
import shutil
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _common as c  # noqa: E402

TARGETS_MS = {"redis": 25.0, "embedded": 200.0}
TERMINAL = {"succeeded", "failed", "cancelled"}


def _epoch(iso: str) -> float:
    return dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def run_one(client: httpx.Client, model_id: str, poll_s: float, timeout_s: float = 180.0) -> dict:
    body = c.quantize_job_body(model_id)
    t_send = time.time()
    r = client.post("/v1/jobs", json=body)
    t_resp = time.time()
    if r.status_code != 202:
        raise RuntimeError(f"submit failed: {r.status_code} {r.text}")
    job_id = r.json()["id"]
    seen_claimed = None
    deadline = time.monotonic() + timeout_s
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if seen_claimed is None and job["status"] != "queued":
            seen_claimed = time.time()
        if job["status"] in TERMINAL:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} not terminal after {timeout_s}s: {job}")
        time.sleep(poll_s)
    if job.get("started_at") is None:
        raise RuntimeError(f"job {job_id} ended without started_at: {job}")
    started = _epoch(job["started_at"])
    return {"id": job_id, "status": job["status"], "attempts": job["attempts"],
            "error": (job.get("error") or {}).get("code"),
            "error_message": ((job.get("error") or {}).get("message") or "")[:300] or None,
            "submit_ms": round((t_resp - t_send) * 1000, 3),
            "claim_after_response_ms": round((started - t_resp) * 1000, 3),
            "claim_after_send_ms": round((started - t_send) * 1000, 3),
            "client_saw_claim_after_response_ms": round((seen_claimed - t_resp) * 1000, 3),
            "run_s": round(_epoch(job["finished_at"]) - started, 3) if job.get("finished_at") else None}


def summarize(samples: list[dict]) -> dict:
    def stats(key):
        v = [s[key] for s in samples]
        return {"p50": round(statistics.median(v), 2), "p95": round(c.pct(v, 95), 2), "max": round(max(v), 2),
                "min": round(min(v), 2), "mean": round(statistics.fmean(v), 2)}

    statuses: dict[str, int] = {}
    for s in samples:
        statuses[s["status"] if not s["error"] else f"{s['status']}:{s['error']}"] = \
            statuses.get(s["status"] if not s["error"] else f"{s['status']}:{s['error']}", 0) + 1
    runs = [s["run_s"] for s in samples if s["run_s"] is not None]
    return {"n": len(samples), "claim_after_response_ms": stats("claim_after_response_ms"),
            "claim_after_send_ms": stats("claim_after_send_ms"), "submit_ms": stats("submit_ms"),
            "claimed_before_response": sum(s["claim_after_response_ms"] < 0 for s in samples),
            "job_run_s_median": round(statistics.median(runs), 3) if runs else None,
            "statuses": statuses, "max_attempts_seen": max(s["attempts"] for s in samples)}


def bench_stack(name: str, base: str, model_bytes: bytes, jobs: int, warmup: int, poll_s: float, gap_s: float,
                headers: dict) -> dict:
    with httpx.Client(base_url=base, timeout=30, headers=headers) as client:
        model_id = c.upload_model(base, model_bytes, headers=headers)
        warm = []
        for _ in range(warmup):  # waits for the worker to be up and warm (imports, page cache)
            warm.append(run_one(client, model_id, poll_s, timeout_s=240))
            time.sleep(gap_s)
        quiet = c.wait_quiet()
        t0 = time.monotonic()
        samples = []
        for i in range(jobs):
            samples.append(run_one(client, model_id, poll_s))
            if (i + 1) % 20 == 0:
                v = [s["claim_after_response_ms"] for s in samples]
                print(f"  {name}: {i + 1}/{jobs} jobs, claim p50 so far {statistics.median(v):.1f} ms", flush=True)
            time.sleep(gap_s)
    out = summarize(samples)
    out["wall_s"] = round(time.monotonic() - t0, 1)
    out["machine_quiet_check"] = quiet
    out["warmup"] = warm
    out["samples"] = samples
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=60, help="measured jobs per stack (each runs ~2 s)")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured jobs per stack first")
    ap.add_argument("--poll", type=float, default=0.05, help="seconds between GETs while a job is followed")
    ap.add_argument("--gap", type=float, default=0.3, help="seconds between a job's end and the next submission")
    ap.add_argument("--only", choices=["redis", "embedded"], default=None)
    args = ap.parse_args()
    c.mark_start()

    model_bytes = c.tiny_onnx_bytes()
    results: dict = {}
    stacks = [s for s in ("redis", "embedded") if args.only in (None, s)]
    for stack in stacks:
        tmp = c.temp_dir(f"dispatch-{stack}")
        procs: list[c.Proc] = []
        try:
            port = c.free_port()
            auth: dict = {}
            base = f"http://127.0.0.1:{port}"
            if stack == "redis":
                env = c.prod_env(tmp / "data")
                c.recreate_pg_db()
                c.flush_redis()
                c.migrate(env)
                auth = c.auth_headers(c.create_key(env))
                procs.append(c.Proc("api", [c.DISTILLERY, "api", "--host", "127.0.0.1", "--port", str(port),
                                            "--workers", "2"], env, tmp))
                procs.append(c.Proc("worker", [c.DISTILLERY, "worker", "--queues", "cpu", "--concurrency", "1"],
                                    env, tmp))
            else:
                env = c.clean_env(DISTILLERY_DATA_DIR=str(tmp / "data"))
                procs.append(c.Proc("serve", [c.DISTILLERY, "serve", "--port", str(port)], env, tmp))
            procs[0].wait_http(f"{base}/readyz")
            print(f"{stack}: up; {args.warmup} warm-up + {args.jobs} measured jobs", flush=True)
            res = bench_stack(stack, base, model_bytes, args.jobs, args.warmup, args.poll, args.gap, auth)
            res["setup"] = {"commands": [" ".join(p.cmd) for p in procs],
                            "env": {k: v for k, v in env.items() if k.startswith("DISTILLERY_")}}
            for p in procs:
                if p.proc.poll() is not None:
                    res.setdefault("problems", []).append(f"{p.name} exited early: {p.log_tail(1500)}")
            results[stack] = res
        finally:
            for p in reversed(procs):
                p.stop()
            if stack == "redis":
                c.drop_pg_db()
            shutil.rmtree(tmp, ignore_errors=True)

    verdict = {}
    rows = []
    for stack, res in results.items():
        lat = res["claim_after_response_ms"]
        verdict[stack] = {"p50_ms": lat["p50"], "target_p50_ms": TARGETS_MS[stack],
                          "pass": lat["p50"] < TARGETS_MS[stack]}
        rows.append([stack, res["n"], lat["p50"], lat["p95"], lat["max"], lat["min"], res["claimed_before_response"],
                     res["claim_after_send_ms"]["p50"], res["submit_ms"]["p50"], res["job_run_s_median"],
                     f"< {TARGETS_MS[stack]:.0f}", "PASS" if verdict[stack]["pass"] else "FAIL"])
    print()
    print(c.table(rows, ["stack", "jobs", "p50 ms", "p95 ms", "max ms", "min ms", "claimed<resp",
                         "p50 from send ms", "POST p50 ms", "job run s", "target p50", "verdict"]))
    out = c.write_results("dispatch", {
        "setup": {"jobs_per_stack": args.jobs, "warmup_jobs": args.warmup, "poll_s": args.poll, "gap_s": args.gap,
                  "job_body": c.quantize_job_body("<model id>"),
                  "latency": "job.started_at (worker's claim) - client time.time() after the 202 response"},
        "results": results, "verdict": verdict})
    print(f"wrote {out.relative_to(c.ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
