"""A worker's background duties: register and heartbeat the worker, and reap jobs that would otherwise be lost.

- a running job whose heartbeat expired (its worker died, even with the embedded broker that forgets the
  message) is re-queued and re-dispatched, or failed with `worker_lost` once its attempts are used up;
- a queued job that was never dispatched (the broker was down) or not claimed for long is dispatched again
  (a duplicate message is harmless: the claim is a conditional update);
- on start, jobs this very worker name was running are its previous life's: they are re-queued at once.
"""
from __future__ import annotations

import logging
import shutil
import threading

from app.core.broker import send_run_job
from app.core.db import utcnow
from app.core.tables import JobRow, WorkerRow
from app.jobs import repository as repo
from app.jobs.states import ErrorCode
from worker.runtime import Runtime, get_runtime

log = logging.getLogger("distillery.reaper")
_stop = threading.Event()
_thread: threading.Thread | None = None


def detect_device() -> str:
    """Without touching CUDA in this process: ask the driver's tool."""
    import subprocess

    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
            if out.returncode == 0 and "GPU" in out.stdout:
                return "cuda"
        except (OSError, subprocess.SubprocessError):
            pass
    return "cpu"


def resolve_queues(setting: str) -> list[str]:
    if setting == "auto":
        return ["gpu"] if detect_device() == "cuda" else ["cpu"]
    return [q.strip() for q in setting.split(",") if q.strip()]


def probe_capabilities() -> dict:
    """What the job processes can run here, asked of a child process (`python -m worker.probe`)."""
    import json
    import subprocess
    import sys

    try:
        out = subprocess.run([sys.executable, "-m", "worker.probe"], capture_output=True, text=True, timeout=300)
        if out.returncode == 0:
            return json.loads(out.stdout)
        log.warning("capability probe failed: %s", out.stderr[-2000:])
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        log.warning("capability probe failed: %s", exc)
    return {}


def register_worker(rt: Runtime, name: str) -> None:
    queues = ",".join(resolve_queues(rt.settings.worker_queues))
    info = probe_capabilities()
    device = info.get("device") or ("cuda" if "gpu" in queues else "cpu")

    def upsert(session):
        row = session.get(WorkerRow, name)
        if row is None:
            session.add(WorkerRow(name=name, queues=queues, device=device, info=info))
        else:
            row.queues, row.device, row.info = queues, device, info
            row.started_at = row.last_seen_at = utcnow()

    _in_tx(rt, upsert)


def beat_worker(rt: Runtime, name: str) -> None:
    def touch(session):
        row = session.get(WorkerRow, name)
        if row is not None:
            row.last_seen_at = utcnow()

    _in_tx(rt, touch)


def _in_tx(rt: Runtime, fn):
    with rt.db.session() as session:
        out = fn(session)
        session.commit()
        return out


def _requeue_or_fail(rt: Runtime, job: JobRow, reason: str, extra_where: list) -> None:
    def move(session):
        if job.attempts < job.max_attempts:
            return repo.requeue(session, job.id, attempt=job.attempts, reason=reason, where=extra_where)
        repo.fail(session, job.id, ErrorCode.worker_lost, f"{reason}; gave up after {job.attempts} attempts",
                  attempt=job.attempts)
        return None

    if _in_tx(rt, move) is not None:
        log.warning("job %s: %s; re-queued", job.id, reason)
        send_run_job(rt.celery, job.id, job.queue)


def reap_own(rt: Runtime, worker_name: str) -> None:
    """Jobs recorded as running on this worker name belong to a previous, dead incarnation of it."""
    with rt.db.session() as session:
        mine = repo.running_on_worker(session, worker_name)
    for job in mine:
        _requeue_or_fail(rt, job, f"worker {worker_name} restarted during the job",
                         [JobRow.worker == worker_name])


def reap_once(rt: Runtime) -> None:
    s = rt.settings
    cutoff = repo.cutoff(s.worker_lost_after_s)
    with rt.db.session() as session:
        stale = repo.stale_running(session, cutoff)
        undispatched = repo.undispatched(session, repo.cutoff(s.redispatch_after_s))
        exhausted = repo.exhausted_queued(session)
    for job in stale:
        _requeue_or_fail(rt, job, "the worker running this job stopped responding", [JobRow.heartbeat_at < cutoff])
    for job in exhausted:
        _in_tx(rt, lambda session, j=job: repo.fail(session, j.id, ErrorCode.attempts_exhausted,
                                                     f"the job was tried {j.attempts} times without finishing"))
    for job in undispatched:
        if job.attempts >= job.max_attempts:
            continue
        try:
            send_run_job(rt.celery, job.id, job.queue)
            _in_tx(rt, lambda session, j=job: repo.mark_dispatched(session, j.id))
            log.info("job %s: dispatched again", job.id)
        except Exception as exc:  # noqa: BLE001 - the broker is down; next round
            log.warning("could not dispatch job %s: %s", job.id, exc)
            break


def _loop(worker_name: str) -> None:
    rt = get_runtime()
    try:
        register_worker(rt, worker_name)
        reap_own(rt, worker_name)
    except Exception:  # noqa: BLE001
        log.exception("worker registration failed; will retry")
    while not _stop.wait(rt.settings.reaper_interval_s):
        try:
            beat_worker(rt, worker_name)
            reap_once(rt)
        except Exception:  # noqa: BLE001 - keep reaping through database or broker outages
            log.exception("reaper round failed")


def start_maintenance(worker_name: str) -> None:
    global _thread
    _stop.clear()
    _thread = threading.Thread(target=_loop, args=(worker_name,), name="distillery-maintenance", daemon=True)
    _thread.start()


def stop_maintenance() -> None:
    _stop.set()
