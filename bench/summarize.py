"""Print the figures of bench/results/*.json as Markdown tables (what docs/benchmarks.md quotes).

    .venv/bin/python bench/summarize.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def md(rows: list[list], header: list[str]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def load(name: str) -> dict | None:
    p = RESULTS / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def machine(d: dict) -> str:
    m = d["machine"]
    return (f"{m['cpu_model']}, {m['nproc']} CPUs, {m['memory_gib']} GiB, Linux {m['kernel']}, Python {m['python']}; "
            f"run {m.get('started_utc', m['date_utc'])} on commit {m.get('git_commit_at_start', '?')[:7]}"
            + (f" (tree changed during the run: end commit {m['git_commit_at_end'][:7]})"
               if m.get("git_commit_at_end") and m.get("git_commit_at_start") != m.get("git_commit_at_end") else ""))


def polling(d: dict) -> None:
    print("### polling\n")
    print(f"`{d['command']}` -- {machine(d)}\n")
    q = d.get("machine_quiet_check", {})
    if q:
        print(f"Other processes' CPU just before: {q['busy_cores_before_start']} cores (waited {q['waited_s']} s).\n")
    rows = []
    for i, r in enumerate(d["rounds"], 1):
        for n in ("const", "jobs"):
            x = r[n]
            cb = x["cpu_cores_busy"]
            rows.append([i, n, f"{x['rps']:.0f}", x["p50_ms"], x["p99_ms"], x["non_2xx"] + sum(x["socket_errors"].values()),
                         x["server_cpu_ms_per_request"], cb["server_processes"], cb.get("everything_else", ""),
                         r["ratio"] if n == "jobs" else ""])
    for name, x in d.get("diagnostics", {}).items():
        cb = x["cpu_cores_busy"]
        rows.append(["diag", name, f"{x['rps']:.0f}", x["p50_ms"], x["p99_ms"],
                     x["non_2xx"] + sum(x["socket_errors"].values()), x["server_cpu_ms_per_request"],
                     cb["server_processes"], cb.get("everything_else", ""), ""])
    print(md(rows, ["round", "endpoint", "req/s", "p50 ms", "p99 ms", "errors", "server CPU ms/req",
                    "server cores", "other cores", "jobs/const"]))
    v = d["verdict"]
    print(f"\nratio (mean of rounds) {v['ratio_mean']} vs >= {v['ratio_target']}: "
          f"{'PASS' if v['ratio_pass'] else 'FAIL'}; worst p99 {v['jobs_p99_worst_ms']} ms vs < {v['p99_target_ms']:.0f}: "
          f"{'PASS' if v['p99_pass'] else 'FAIL'}; CPU-normalized ratio {v.get('informational_cpu_normalized_ratio')}\n")


def upload(d: dict) -> None:
    print("### upload\n")
    print(f"`{d['command']}` -- {machine(d)}\n")
    q = d.get("machine_quiet_check", {})
    if q:
        print(f"Other processes' CPU just before: {q['busy_cores_before_start']} cores (waited {q['waited_s']} s).\n")
    rows = []
    for i, r in enumerate(d["rounds"], 1):
        for n in r.get("order", ["baseline", "subject"]):
            x = r[n]
            rows.append([i, n, x["http_code"], f"{x['time_s']:.2f}", x["mb_per_s"], x["server_cpu_s_per_gib"],
                         x["rss_before_mib"], x["rss_peak_mib"], x["rss_growth_mib"],
                         r["ratio"] if n == "subject" else ""])
    print(md(rows, ["round", "server", "HTTP", "s", "MB/s", "server CPU s/GiB", "RSS before MiB", "RSS peak MiB",
                    "RSS growth MiB", "subject/baseline"]))
    v = d["verdict"]
    print(f"\nmedians {v['subject_mb_per_s_median']} / {v['baseline_mb_per_s_median']} MB/s = {v['ratio_median']} vs >= "
          f"{v['ratio_target']}: {'PASS' if v['ratio_pass'] else 'FAIL'}; RSS growth worst {v['rss_growth_worst_mib']} MiB "
          f"vs < {v['rss_target_mib']:.0f}: {'PASS' if v['rss_pass'] else 'FAIL'}; CPU ratio "
          f"{v.get('informational_cpu_ratio_median')}\n")
    b = d.get("cpu_breakdown_in_process")
    if b:
        print("In-process per-byte CPU (s/GiB): " + ", ".join(f"{k} {v2}" for k, v2 in b.items() if k != "unit") + "\n")


def dispatch(d: dict) -> None:
    print("### dispatch\n")
    print(f"`{d['command']}` -- {machine(d)}\n")
    rows = []
    for stack, r in d["results"].items():
        lat = r["claim_after_response_ms"]
        v = d["verdict"][stack]
        q = r.get("machine_quiet_check", {})
        rows.append([stack, r["n"], lat["p50"], lat["p95"], lat["max"], lat["min"], r["claimed_before_response"],
                     r["claim_after_send_ms"]["p50"], r["submit_ms"]["p50"], r["job_run_s_median"],
                     ", ".join(f"{k} {n}" for k, n in r["statuses"].items()), q.get("busy_cores_before_start", ""),
                     f"< {v['target_p50_ms']:.0f}", "PASS" if v["pass"] else "FAIL"])
    print(md(rows, ["stack", "jobs", "p50 ms", "p95 ms", "max ms", "min ms", "claimed before 202", "p50 from send ms",
                    "POST p50 ms", "job run s (median)", "job outcomes", "other cores before", "target p50",
                    "verdict"]))
    print()


def load_md(d: dict) -> str:
    """The Load section's figures (bench/load.py writes them into docs/benchmarks.md between its markers)."""
    s, rq, v, j, dr = d["setup"], d["requests"], d["verdict"], d["jobs"], d["drain"]
    q, b = d.get("machine_quiet_check", {}), d["burst"]
    lines = [f"`{d['command']}` -- {machine(d)}", ""]
    jitter = f" +-{s['poll_jitter'] * 100:.0f}%" if s.get("poll_jitter") else ""
    if q and not q.get("quiet", True):
        lines += [f"**The machine was not quiet** (other processes used {q['busy_cores_before_start']} of its cores "
                  "before the start): the latencies below measure that contention more than the service; rerun on an "
                  "idle machine.", ""]
    lines += [
             f"{s['pollers']} pollers (every {s['poll_interval_s']} s{jitter}, {s['duration_s']:.0f} s), {s['uploads']} uploads "
             f"of {s['upload_mb']} MB and {s['jobs']} job submissions at once; `distillery api --workers 2`, "
             f"{len(s['workers'])} workers. Other processes' CPU just before: {q.get('busy_cores_before_start', '?')} "
             f"cores; during the burst the machine used {b['machine_busy_cores']} cores (the API processes "
             f"{b.get('api_processes_cores', '?')}, {b.get('api_cpu_ms_per_request', '?')} ms of CPU per request; "
             f"the workers without their job processes {b.get('worker_processes_cores_without_job_processes', '?')}), "
             f"the client "
             f"{b['client_cpu_cores']} (its event loop woke up late by p99 "
             f"{b.get('client_loop_lag_ms', {}).get('p99_ms', '?')} ms: that delay is inside every latency below).", ""]
    rows = []
    for kind, label in (("poll", "status poll `GET /v1/jobs/{id}`"), ("submit", "submit `POST /v1/jobs`"),
                        ("upload", "upload `POST /v1/models`")):
        x = rq[kind]
        rows.append([label, x.get("n", 0), x.get("p50_ms", ""), x.get("p95_ms", ""), x.get("p99_ms", ""),
                     x.get("max_ms", ""), ", ".join(f"{k}: {n}" for k, n in x["status_codes"].items())])
    p = rq["poll"]
    for phase in ("during_burst", "after_burst"):
        x = p.get(phase, {})
        if x.get("n"):
            rows.append([f"status poll, {phase.replace('_', ' ')}", x["n"], x["p50_ms"], x["p95_ms"], x["p99_ms"],
                         x["max_ms"], ""])
    lines.append(md(rows, ["requests", "n", "p50 ms", "p95 ms", "p99 ms", "max ms", "status codes"]))
    lost = len(j["lost"]) + len(j["unexpected_rows"]) + len(j["duplicate_ids"]) + len(j["duplicate_idempotency_keys"])
    twice = len(set(j["claimed_more_than_once_by_events"]) | set(j["claimed_more_than_once_by_worker_logs"])
                | set(j["terminal_with_attempts_not_1"]))
    lines += ["", md([
        ["5xx responses (all requests)", rq["http_5xx"], "0", "PASS" if v["no_5xx"] else "FAIL"],
        ["transport errors (connect, read, timeouts)", rq["transport_errors"], "0",
         "PASS" if v["transport_errors"] == 0 else "FAIL"],
        ["status poll p99", f"{v['poll_p99_ms']} ms", f"< {v['p99_target_ms']:.0f} ms",
         "PASS" if v["p99_pass"] else "FAIL"],
        ["jobs accepted (202) / rows in the database", f"{j['accepted_202']} / {j['rows_of_owner'] - j['warmup_jobs']}",
         f"{s['jobs']} / {s['jobs']}", ""],
        ["lost, unexpected or duplicated jobs", lost, "0", ""],
        ["jobs claimed more than once (attempts, events, worker logs)", twice, "0",
         "PASS" if v["jobs_exactly_once"] else "FAIL"],
        ["jobs terminal after the drain", f"{j['accepted_202'] - len(j['not_terminal'])} of {j['accepted_202']} "
         f"({', '.join(f'{k} {n}' for k, n in j['outcomes'].items())})", "all", "PASS" if v["all_jobs_terminal"]
         else "not all (see JSON)"],
        ["uploads stored with the client's sha256", f"{d['uploads']['sha256_ok']} of {s['uploads']}",
         f"{s['uploads']}", "PASS" if v["uploads_ok"] else "FAIL"],
    ], ["check", "result", "target", ""])]
    lines += ["", f"Throughput: {p.get('throughput_rps')} status polls/s ({rq['all_requests_rps']} requests/s in "
                  f"all) over {b['wall_s']} s; submissions and uploads all answered {b['submissions_and_uploads_done_s']} s "
                  f"after the start; uploads {d['uploads']['mb_per_s_aggregate']} MB/s together; the jobs ran "
                  f"{dr.get('jobs_per_minute')} per minute ({dr.get('first_start_to_last_finish_s')} s from the first "
                  f"start to the last finish). Overall: **{'PASS' if v['pass'] else 'FAIL'}**."]
    return "\n".join(lines)


def load_bench(d: dict) -> None:
    print("### load\n")
    print(load_md(d) + "\n")


def main() -> int:
    for name, fn in (("polling", polling), ("upload", upload), ("dispatch", dispatch), ("load", load_bench)):
        d = load(name)
        if d:
            fn(d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
