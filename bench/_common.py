"""Shared pieces of the benchmarks: machine facts, starting/stopping servers, PostgreSQL/Redis setup, results.

Only loopback, only processes this module started (each in its own session, stopped by its own group id).
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
VENV_BIN = Path(sys.executable).parent
DISTILLERY = str(VENV_BIN / "distillery")
PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"
BENCH_DB = "distillery_bench"
PG_URL = f"postgresql+psycopg://postgres@127.0.0.1:5432/{BENCH_DB}"
REDIS_URL = "redis://127.0.0.1:6379/9"
PACKAGES = ["fastapi", "starlette", "uvicorn", "uvloop", "httptools", "pydantic", "sqlalchemy", "psycopg",
            "psycopg-binary", "celery", "kombu", "redis", "python-multipart", "httpx", "onnx", "onnxruntime",
            "psutil", "orjson"]


_SCRIPT = os.path.abspath(sys.argv[0])  # taken at import: some benchmarks chdir into a temp folder later


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable, ROOT), *map(str, [
        os.path.relpath(_SCRIPT, ROOT), *sys.argv[1:]])])


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


_START = {}


def mark_start() -> None:
    """Record the commit and tree state the servers are started from (others may commit during a run)."""
    _START.update(git_commit_at_start=_git("rev-parse", "HEAD"),
                  git_dirty_paths_at_start=[l.split(maxsplit=1)[-1] for l in _git("status", "--porcelain").splitlines()
                                            if l.strip()],
                  started_utc=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))


VECTOR_FLAGS = {"sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                "avx512_bf16", "avx_vnni", "amx_int8", "amx_bf16"}


def machine_facts() -> dict:
    cpu, flags = "", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not cpu:
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    mem_kib = 0
    with contextlib.suppress(OSError):
        m = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        mem_kib = int(m.group(1)) if m else 0
    versions = {}
    for p in PACKAGES:
        try:
            versions[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            versions[p] = None
    tools = {}
    for tool, args in (("wrk", ["wrk", "--version"]), ("curl", ["curl", "--version"]),
                       ("postgres", ["psql", "--version"]), ("redis", ["redis-server", "--version"])):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(args, capture_output=True, text=True, timeout=5)
            tools[tool] = (out.stdout or out.stderr).strip().splitlines()[0]
    return {
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu,
        # what decides int8/bf16 speed on a CPU: ONNX Runtime's int8 kernels use VNNI where the CPU has it
        "cpu_vector_flags": sorted(f for f in flags if f in VECTOR_FLAGS),
        "nproc": os.cpu_count(),
        "memory_gib": round(mem_kib / 1024**2, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": versions,
        "tools": tools,
        "git_commit_at_end": _git("rev-parse", "HEAD"),
        **_START,
    }


def write_results(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "command": command_line(), "machine": machine_facts(), **payload}
    out.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return out


def table(rows: list[list], header: list[str]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any DISTILLERY_* variable, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILLERY_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def recreate_pg_db() -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {BENCH_DB}")


def drop_pg_db() -> None:
    import psycopg

    with contextlib.suppress(Exception), psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)")


def flush_redis() -> None:
    import redis

    r = redis.Redis.from_url(REDIS_URL)
    r.flushdb()
    r.close()


# One benchmarking owner sends thousands of requests a second; the per-owner limit (default 1200/min per API
# process) would turn most of them into 429s. It is raised, not removed: the limiter's bookkeeping still runs.
RATE_LIMIT_PER_MINUTE = "1000000000"


def prod_env(data_dir: Path) -> dict[str, str]:
    return clean_env(DISTILLERY_DATABASE_URL=PG_URL, DISTILLERY_BROKER_URL=REDIS_URL,
                     DISTILLERY_DATA_DIR=str(data_dir), DISTILLERY_RATE_LIMIT_PER_MINUTE=RATE_LIMIT_PER_MINUTE)


def create_key(env: dict[str, str], owner: str = "bench") -> str | None:
    """An API key for `distillery api` (which needs one on every /v1 request); None if this tree has no keys."""
    out = subprocess.run([DISTILLERY, "keys", "create", "--owner", owner, "--label", "benchmark"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        if "invalid choice" in out.stderr:
            return None
        raise RuntimeError(f"distillery keys create failed:\n{out.stdout}\n{out.stderr}")
    return out.stdout.strip().splitlines()[0].strip()


def auth_headers(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def migrate(env: dict[str, str]) -> None:
    out = subprocess.run([DISTILLERY, "migrate"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"distillery migrate failed:\n{out.stdout}\n{out.stderr}")


class Proc:
    """A server or worker process in its own session; output to a log file (never a pipe nobody reads)."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_dir: Path):
        self.name, self.cmd = name, cmd
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.pid = self.proc.pid

    def log_tail(self, n: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-n:]
        return ""

    def wait_http(self, url: str, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{self.name}: {url} not up after {timeout}s:\n{self.log_tail()}")

    def stop(self, grace_s: float = 20.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait()
        else:
            # the leader is gone; make sure nothing of its group is left
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
        self._log.close()


def temp_dir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"distillery-bench-{prefix}-"))


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(-(-q * len(s) // 100)) - 1))
    return s[k]


def tiny_onnx_bytes() -> bytes:
    sys.path.insert(0, str(ROOT))
    from tests.helpers import mlp_onnx_bytes

    return mlp_onnx_bytes()


def upload_model(base: str, data: bytes, name: str = "bench-mlp.onnx", headers: dict | None = None) -> str:
    r = httpx.post(f"{base}/v1/models", files={"file": (name, data, "application/octet-stream")}, timeout=60,
                   headers=headers or {})
    if r.status_code != 201:
        raise RuntimeError(f"upload failed: {r.status_code} {r.text[:500]}")
    return r.json()["id"]


def quantize_job_body(model_id: str) -> dict:
    return {"kind": "quantize", "model_id": model_id,
            "config": {"method": "dynamic_int8", "benchmark": {"batch_sizes": [1], "repeats": 1, "warmup": 0}}}


def sha256_file(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def machine_busy_cores(seconds: float = 2.0) -> float:
    import psutil

    def busy():
        t = psutil.cpu_times()
        return t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)

    b0, t0 = busy(), time.monotonic()
    time.sleep(seconds)
    return (busy() - b0) / (time.monotonic() - t0)


def wait_quiet(max_wait_s: float | None = None, threshold_cores: float = 0.3) -> dict:
    """Wait (bounded) until the machine is nearly idle, so other people's work does not land in the figures.

    Returns what was seen; the benchmark goes on anyway after max_wait_s (env BENCH_QUIET_WAIT_S, default 180)
    and the JSON says so."""
    if max_wait_s is None:
        max_wait_s = float(os.environ.get("BENCH_QUIET_WAIT_S", "180"))
    t0 = time.monotonic()
    seen = machine_busy_cores()
    while seen > threshold_cores and time.monotonic() - t0 < max_wait_s:
        print(f"  machine busy ({seen:.2f} cores in use by other processes); waiting for it to calm down", flush=True)
        time.sleep(5)
        seen = machine_busy_cores()
    return {"busy_cores_before_start": round(seen, 2), "waited_s": round(time.monotonic() - t0, 1),
            "quiet": seen <= threshold_cores, "threshold_cores": threshold_cores}
