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
from pathlib import Path

from app.core.config import Settings, get_settings
from app.core.procs import die_with_parent

log = logging.getLogger("distillery.cli")


def _setup_logging(settings: Settings) -> None:
    from app.core.logs import setup_logging

    setup_logging(settings.log_format, settings.log_level)


def _uvicorn_log_config(settings: Settings) -> dict:
    from app.core.logs import logging_config

    return logging_config(settings.log_format, settings.log_level)


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


def _auto_queues() -> list[str]:
    """What `DISTILLERY_WORKER_QUEUES=auto` means on this machine (`gpu` when nvidia-smi sees a GPU, else `cpu`),
    asked of a child process: this one never imports worker/ (nor, through it, anything that touches CUDA)."""
    out = subprocess.run([sys.executable, "-c", "from worker.maintenance import resolve_queues;"
                          "print(','.join(resolve_queues('auto')))"], capture_output=True, text=True)
    return [q for q in out.stdout.strip().split(",") if q] or ["cpu"]


def _worker_queues(settings: Settings, explicit: str | None) -> str:
    if explicit:
        return explicit
    if settings.worker_queues != "auto":
        return settings.worker_queues
    return ",".join(_auto_queues())


def serve_queues(settings: Settings, explicit: str | None) -> str:
    """The embedded worker's queues: --queues, else DISTILLERY_WORKER_QUEUES when not `auto`, else `cpu`, plus
    `gpu` only where a GPU worker would consume it (`auto` resolves to `gpu`): as the only worker it takes `device:
    cpu` jobs too, but it never claims the GPU queue on a machine without one, so `auto` jobs go to `cpu` there
    (the API routes them to `gpu` only while a live worker consumes it) and `cuda` jobs wait for a real GPU worker."""
    if explicit:
        return explicit
    if settings.worker_queues != "auto":
        return settings.worker_queues
    return "cpu,gpu" if "gpu" in _auto_queues() else "cpu"


def cmd_worker(settings: Settings, args) -> int:
    queues = _worker_queues(settings, args.queues)
    env = {**os.environ, "DISTILLERY_WORKER_QUEUES": queues}
    cmd = worker_command(settings, args.name, queues, args.concurrency)
    os.execvpe(cmd[0], cmd, env)
    return 0  # not reached


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _is_loopback(host: str) -> bool:
    return host in LOOPBACK or host.startswith("127.")


def cmd_api(settings: Settings, args) -> int:
    import uvicorn

    if settings.auth != "required":
        print("refusing to start: `distillery api` is the production server and needs DISTILLERY_AUTH=required "
              "(create keys with `distillery keys create --owner NAME`); for an open local server use "
              "`distillery serve` on 127.0.0.1", file=sys.stderr)
        return 2

    uvicorn.run("app.main:create_app", factory=True, host=args.host, port=args.port,
                workers=args.workers or settings.api_workers, log_level=settings.log_level.lower(),
                log_config=_uvicorn_log_config(settings), proxy_headers=True, timeout_graceful_shutdown=10)
    return 0


def cmd_serve(settings: Settings, args) -> int:
    """Embedded default: migrations, one local worker and the API, everything under DISTILLERY_DATA_DIR."""
    import uvicorn

    from app.core.migrate import upgrade

    if "auth" not in settings.model_fields_set:  # not chosen explicitly: open on loopback, keys elsewhere
        settings = settings.model_copy(update={"auth": "open" if _is_loopback(args.host) else "required"})
    if settings.auth == "open" and not _is_loopback(args.host):
        print(f"refusing to serve {args.host} without authentication: listen on 127.0.0.1, or set "
              "DISTILLERY_AUTH=required and use API keys", file=sys.stderr)
        return 2
    if settings.auth == "open":
        log.warning("running OPEN on %s (no API key needed; everything belongs to owner %r): loopback only",
                    args.host, settings.default_owner)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings)
    queues = serve_queues(settings, args.queues)
    env = {**os.environ, "DISTILLERY_DATA_DIR": str(settings.data_dir), "DISTILLERY_WORKER_QUEUES": queues,
           "DISTILLERY_LOG_FORMAT": settings.log_format}
    # One fixed name: a restarted embedded worker re-queues at once what its previous life left running.
    worker_cmd = worker_command(settings, "embedded@%h", queues, None)
    worker = subprocess.Popen(worker_cmd, env=env, preexec_fn=die_with_parent(signal.SIGTERM))
    log.info("data in %s; database %s; broker %s", settings.data_dir, _redact(settings.database_url),
             settings.broker_url)
    log.info("local worker %s consumes %s %s%s", "embedded@" + socket.gethostname(),
             "queues" if "," in queues else "queue", queues, "" if "gpu" in queues.split(",") else
             " (not gpu: `auto` jobs run here on the CPU, `device: cuda` jobs wait for a GPU worker)")
    try:
        from app.main import create_app

        uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=settings.log_level.lower(),
                    log_config=_uvicorn_log_config(settings), timeout_graceful_shutdown=5)
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


def cmd_keys(settings: Settings, args) -> int:
    from app.auth.keys import create_key, list_keys, revoke_key
    from app.core.db import Database

    db = Database(settings)
    try:
        with db.session() as session:
            if args.keys_command == "create":
                try:
                    row, key = create_key(session, args.owner, admin=args.admin, label=args.label or "")
                except ValueError as exc:
                    print(f"error: {exc}", file=sys.stderr)
                    return 2
                print(key)
                print(f"key id {row.id} for owner {row.owner}{' (admin)' if row.admin else ''}; the key is shown "
                      "only now: store it safely", file=sys.stderr)
                return 0
            if args.keys_command == "revoke":
                if revoke_key(session, args.key_id):
                    print(f"revoked {args.key_id}")
                    return 0
                print(f"error: no active key {args.key_id}", file=sys.stderr)
                return 1
            for row in list_keys(session):
                state = f"revoked {row.revoked_at:%Y-%m-%d}" if row.revoked_at else "active"
                print(f"{row.id}  {row.owner:<24} {'admin' if row.admin else 'user ':<5}  {state:<18} {row.label}")
            return 0
    finally:
        db.dispose()


def cmd_example(settings: Settings, args) -> int:
    """Train a small CNN on scikit-learn's digits and write ONNX, TorchScript and an .npz (needs the engine extra)."""
    return subprocess.call([sys.executable, "-m", "worker.examples", "--out", args.out, "--seed", str(args.seed)])


def _pid1_argv() -> list[str]:
    try:
        return Path("/proc/1/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def healthcheck_url(argv: list[str]) -> str | None:
    """The /healthz URL to probe for a container whose main process has `argv`: the API's own port for
    `distillery api`/`serve` (whatever --port it was given), None for a worker or a migration (no HTTP)."""
    words = [Path(w).name for w in argv[:3]]
    role = next((argv[i + 1] for i, w in enumerate(words) if w == "distillery" and i + 1 < len(argv)), None)
    if role not in ("api", "serve"):
        return None
    args, _ = build_parser().parse_known_args(argv[argv.index(role):])
    return f"http://127.0.0.1:{args.port}/healthz"


def cmd_healthcheck(_settings: Settings, args) -> int:
    """The Docker HEALTHCHECK: probe the API's /healthz on the port its process listens on (read from the
    container's main process), or succeed for a worker or migration container, which serves no HTTP (a worker
    that stops ends its container)."""
    import urllib.request

    url = args.url or healthcheck_url(_pid1_argv())
    if url is None:
        return 0
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as resp:
            return 0 if resp.status == 200 else 1
    except OSError as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distillery", description="Model compression as a service.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="Embedded default: API + local worker on SQLite and a file-system broker.")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--queues", default=None, help="Queues the local worker consumes (default: cpu, and gpu too "
                   "when nvidia-smi sees a GPU).")
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

    k = sub.add_parser("keys", help="Create, list and revoke API keys (stored only as a hash).")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    kc = ksub.add_parser("create", help="Create a key for an owner and print it (once).")
    kc.add_argument("--owner", required=True, help="Owner name: letters, digits, '_', '.', '-'.")
    kc.add_argument("--admin", action="store_true", help="Admin scope: sees every owner's resources.")
    kc.add_argument("--label", default="", help="A note to recognise the key by.")
    kr = ksub.add_parser("revoke", help="Revoke a key by its id (the 16 hex digits after dk_).")
    kr.add_argument("key_id")
    ksub.add_parser("list", help="List keys (ids, owners, state; never the secrets).")
    k.set_defaults(func=cmd_keys)

    h = sub.add_parser("healthcheck", help="Exit 0 when this container's API answers /healthz (the image's "
                       "HEALTHCHECK); a worker or migration container is always healthy.")
    h.add_argument("--url", default=None, help="Probe this URL instead of the main process's API port.")
    h.add_argument("--timeout", type=float, default=4.0)
    h.set_defaults(func=cmd_healthcheck)

    e = sub.add_parser("example", help="Write an example model (ONNX + TorchScript) and dataset (.npz).")
    e.add_argument("--out", default="example", help="Folder to write into (default: ./example).")
    e.add_argument("--seed", type=int, default=0)
    e.set_defaults(func=cmd_example)
    from app.client.commands import register  # models, datasets, jobs, artifacts, quantize, ... (HTTP, no Settings)

    register(p, sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "client_func", None) is not None:  # a client command: talks HTTP, needs no Settings
        from app.client.commands import run

        return run(args)
    settings = get_settings()
    if args.command == "serve" and "log_format" not in settings.model_fields_set:
        settings = settings.model_copy(update={"log_format": "text"})  # a person at a terminal, unless asked
    _setup_logging(settings)
    return args.func(settings, args) or 0


if __name__ == "__main__":
    sys.exit(main())
