"""A/B of the upload path of two commits, side by side (diagnostic for bench/upload.py).

Exports both commits' trees with `git archive` into a temp folder (the working tree is not touched), runs each as
`distillery api --workers 1` (same venv, same PostgreSQL/Redis, one API key), and uploads the same 1 GiB ONNX model
to each in alternating order with curl. Per upload: MB/s, the server's user and system CPU seconds, its minor page
faults (/proc/PID/stat, all threads) and RSS growth.

    .venv/bin/python bench/upload_ab.py --old f0b6f54 --new HEAD [--rounds 4]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _common as c  # noqa: E402
from bench.upload import MIB, measure, write_matmul_onnx  # noqa: E402


def _minflt(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True)
    ap.add_argument("--new", default="HEAD")
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    c.mark_start()
    commits = {"old": c._git("rev-parse", args.old), "new": c._git("rev-parse", args.new)}
    tmp = c.temp_dir("upload-ab")
    env = c.prod_env(tmp / "data")
    procs: dict[str, c.Proc] = {}
    try:
        for name, commit in commits.items():
            (tmp / name).mkdir()
            archive = subprocess.run(["git", "archive", commit], cwd=c.ROOT, capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(tmp / name)], input=archive, check=True)
        c.recreate_pg_db()
        c.flush_redis()
        c.migrate(env)
        auth = c.auth_headers(c.create_key(env))
        ports = {}
        for name in commits:
            ports[name] = c.free_port()
            root = tmp / name
            code = (f"import sys; sys.path.insert(0, {str(root)!r}); import app.cli; "
                    f"assert app.cli.__file__.startswith({str(root)!r}); "
                    f"sys.exit(app.cli.main(['api', '--host', '127.0.0.1', '--port', '{ports[name]}', '--workers', '1']))")
            procs[name] = c.Proc(f"api-{name}", [sys.executable, "-c", code], {**env, "PYTHONPATH": str(root)}, tmp)
        for name, p in procs.items():
            p.wait_http(f"http://127.0.0.1:{ports[name]}/readyz")
        model = tmp / "big.onnx"
        write_matmul_onnx(model, 16384, 16384)
        quiet = c.wait_quiet()
        results: dict[str, list] = {"old": [], "new": []}
        for i in range(args.rounds + 1):  # round 0 is a warm-up
            for name in (("old", "new") if i % 2 == 0 else ("new", "old")):
                p = procs[name]
                ps = psutil.Process(p.pid)
                t0, f0 = ps.cpu_times(), _minflt(p.pid)
                x = measure(name, f"http://127.0.0.1:{ports[name]}/v1/models", p.pid, model, tmp / "r.json",
                            headers=auth)
                t1, f1 = ps.cpu_times(), _minflt(p.pid)
                x.update(user_s=round(t1.user - t0.user, 2), sys_s=round(t1.system - t0.system, 2),
                         minor_faults=f1 - f0)
                if x["http_code"] == 201:
                    httpx.delete(f"http://127.0.0.1:{ports[name]}/v1/models/{x['response']['id']}", headers=auth,
                                 timeout=60)
                x.pop("response", None)
                x.pop("curl", None)
                print(f"round {i}{' (warm-up)' if i == 0 else ''} {name}: HTTP {x['http_code']} {x['mb_per_s']} MB/s, "
                      f"user {x['user_s']} s, sys {x['sys_s']} s, minor faults {x['minor_faults']}, "
                      f"RSS +{x['rss_growth_mib']} MiB", flush=True)
                if i > 0:
                    results[name].append(x)
        summary = {}
        for name, xs in results.items():
            summary[name] = {k: round(statistics.median(x[k] for x in xs), 3)
                             for k in ("mb_per_s", "server_cpu_s_per_gib", "user_s", "sys_s", "minor_faults",
                                       "rss_growth_mib")}
        rows = [[name, commits[name][:7], *summary[name].values()] for name in summary]
        print()
        print(c.table(rows, ["tree", "commit", "MB/s", "CPU s/GiB", "user s", "sys s", "minor faults",
                             "RSS growth MiB"]))
        out = c.write_results("upload_ab", {"commits": commits, "file_bytes": model.stat().st_size,
                                            "machine_quiet_check": quiet, "medians": summary, "uploads": results,
                                            "unit_note": f"MB = 10^6 bytes; 1 GiB = {1024 * MIB} bytes"})
        print(f"wrote {out.relative_to(c.ROOT)}")
        return 0
    finally:
        for p in procs.values():
            p.stop()
        c.drop_pg_db()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
