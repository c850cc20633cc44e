"""`distillery`: serve (embedded default), api, worker, migrate, example.

The CLI never imports worker/ or torch: it starts them as processes by module name.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys

from app.core.config import Settings, get_settings
from app.core.procs import die_with_parent

log = logging.getLogger("distillery.cli")


def _setup_logging(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")


def cmd_migrate(settings: Settings, _args) -> int:
    from app.core.migrate import upgrade

    upgrade(settings)
    print(f"database at head: {_redact(settings.database_url)}")
    return 0


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def worker_command(settings: Settings, name: str | None, queues: str | None, concurrency: int | None) -> list[str]:
    cmd = [sys.executable, "-m", "celery", "-A", "worker.celery_app:celery", "worker", "--pool", "threads",
           "--concurrency", str(concurrency or settings.worker_concurrency), "--without-gossip", "--without-mingle",
           "--loglevel", settings.log_level.upper(), "--hostname", name or f"worker-{socket.gethostname()}@%h"]
    if queues:
        cmd += ["--queues", queues]
    return cmd


def _worker_queues(settings: Settings, explicit: str | None) -> str:
    if explicit:
        return explicit
    if settings.worker_queues != "auto":
        return settings.worker_queues
    out = subprocess.run([sys.executable, "-c", "from worker.maintenance import resolve_queues;"
                          "print(','.join(resolve_queues('auto')))"], capture_output=True, text=True)
    return out.stdout.strip() or "cpu"


def cmd_worker(settings: Settings, args) -> int:
    queues = _worker_queues(settings, args.queues)
    env = {**os.environ, "DISTILLERY_WORKER_QUEUES": queues}
    cmd = worker_command(settings, args.name, queues, args.concurrency)
    os.execvpe(cmd[0], cmd, env)
    return 0  # not reached


def cmd_api(settings: Settings, args) -> int:
    import uvicorn

    uvicorn.run("app.main:create_app", factory=True, host=args.host, port=args.port,
                workers=args.workers or settings.api_workers, log_level=settings.log_level.lower(),
                proxy_headers=True, timeout_graceful_shutdown=10)
    return 0


def cmd_serve(settings: Settings, args) -> int:
    """Embedded default: migrations, one local worker and the API, everything under DISTILLERY_DATA_DIR."""
    import uvicorn

    from app.core.migrate import upgrade

    if not args.host.startswith("127.") and args.host not in ("localhost", "::1"):
        log.warning("serving on %s: reachable from other machines, and there is no authentication yet", args.host)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings)
    env = {**os.environ, "DISTILLERY_DATA_DIR": str(settings.data_dir), "DISTILLERY_WORKER_QUEUES": "cpu,gpu"
           if args.queues is None else args.queues}
    # One fixed name: a restarted embedded worker re-queues at once what its previous life left running.
    worker_cmd = worker_command(settings, "embedded@%h", env["DISTILLERY_WORKER_QUEUES"], None)
    worker = subprocess.Popen(worker_cmd, env=env, preexec_fn=die_with_parent(signal.SIGTERM))
    log.info("data in %s; database %s; broker %s", settings.data_dir, _redact(settings.database_url),
             settings.broker_url)
    try:
        uvicorn.run("app.main:create_app", factory=True, host=args.host, port=args.port, workers=1,
                    log_level=settings.log_level.lower(), timeout_graceful_shutdown=5)
    finally:
        _stop(worker)
    return 0


def _stop(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        log.warning("worker did not stop in %.0fs; killing it (its job is re-queued on the next start)", grace_s)
        proc.kill()
        proc.wait()


def cmd_example(settings: Settings, args) -> int:
    """Train a small CNN on scikit-learn's digits and write ONNX, TorchScript and an .npz (needs the engine extra)."""
    return subprocess.call([sys.executable, "-m", "worker.examples", "--out", args.out, "--seed", str(args.seed)])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distillery", description="Model compression as a service.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="Embedded default: API + local worker on SQLite and a file-system broker.")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--queues", default=None, help="Queues the local worker consumes (default: cpu,gpu).")
    s.set_defaults(func=cmd_serve)

    a = sub.add_parser("api", help="Production API (uvicorn, several processes). Run `distillery migrate` first.")
    a.add_argument("--host", default="0.0.0.0")
    a.add_argument("--port", type=int, default=8000)
    a.add_argument("--workers", type=int, default=None, help="Processes (default: DISTILLERY_API_WORKERS).")
    a.set_defaults(func=cmd_api)

    w = sub.add_parser("worker", help="A Celery worker: consumes 'gpu' when CUDA is present, else 'cpu'.")
    w.add_argument("--queues", default=None, help="Comma list of queues (default: DISTILLERY_WORKER_QUEUES).")
    w.add_argument("--name", default=None, help="Worker node name (default: worker-HOST@HOST).")
    w.add_argument("--concurrency", type=int, default=None, help="Jobs at once (default: DISTILLERY_WORKER_CONCURRENCY).")
    w.set_defaults(func=cmd_worker)

    m = sub.add_parser("migrate", help="Upgrade the database schema to the latest revision.")
    m.set_defaults(func=cmd_migrate)

    e = sub.add_parser("example", help="Write an example model (ONNX + TorchScript) and dataset (.npz).")
    e.add_argument("--out", default="example", help="Folder to write into (default: ./example).")
    e.add_argument("--seed", type=int, default=0)
    e.set_defaults(func=cmd_example)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = get_settings()
    _setup_logging(settings)
    return args.func(settings, args) or 0


if __name__ == "__main__":
    sys.exit(main())
