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
import time
from datetime import datetime, timezone

import psutil
from sqlalchemy.exc import DBAPIError

from app.core.broker import queue_depth
from app.core.db import cutoff, utcnow
from app.core.tables import JobRow, WorkerRow
from app.jobs import lifecycle, repository as repo
from app.jobs.service import job_json
from app.jobs.states import ErrorCode
from app.webhooks.delivery import WebhookDeliverer
from worker import childpool
from worker.runtime import Runtime, get_runtime
from worker.sandbox import UNTRUSTED_FORMATS

log = logging.getLogger("distillery.reaper")
_stop = threading.Event()
_thread: threading.Thread | None = None
_webhooks: WebhookDeliverer | None = None


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


def sandbox_info(rt: Runtime) -> dict:
    """The job sandbox's layers here (tried and self-tested once per process), logged at start-up."""
    support = childpool.get_pool(rt.settings).config.support
    if support.runs_untrusted and support.confined:
        log.info("%s", support.summary())
    else:
        log.warning("%s", support.summary())
    return support.describe()


def register_worker(rt: Runtime, name: str) -> None:
    queues = ",".join(resolve_queues(rt.settings.worker_queues))
    info = probe_capabilities()
    info["job_memory_limit_bytes"] = rt.settings.job_memory_limit_bytes  # the API admits jobs that fit it
    info["sandbox"] = sandbox_info(rt)
    if not info["sandbox"]["runs_untrusted_formats"]:  # what this worker refuses is not offered
        for method in info.get("methods", []):
            method["input_formats"] = [f for f in method.get("input_formats", []) if f not in UNTRUSTED_FORMATS]
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
    move = _in_tx(rt, lambda session: lifecycle.retry_or_fail(
        session, job, attempt=job.attempts, reason=reason, code=ErrorCode.worker_lost, where=extra_where))
    if move == lifecycle.Move.requeued:
        log.warning("job %s: %s; re-queued", job.id, reason)
        _in_tx(rt, lambda session: lifecycle.dispatch(rt.celery, session, job))


def reap_own(rt: Runtime, worker_name: str, before=None) -> None:
    """Jobs recorded as running on this worker name belong to a previous, dead incarnation of it (those started
    `before` this incarnation, when given: registration may be retried after this one has claimed jobs)."""
    with rt.db.session() as session:
        mine = repo.running_on_worker(session, worker_name)
    extra = [JobRow.worker == worker_name] + ([JobRow.started_at < before] if before is not None else [])
    for job in mine:
        if before is None or (job.started_at is not None and job.started_at < before):
            _requeue_or_fail(rt, job, f"worker {worker_name} restarted during the job", extra)


def reap_once(rt: Runtime, reap_stale: bool = True) -> None:
    """One round. `reap_stale=False` leaves running jobs alone (just after a database outage: see _loop)."""
    s = rt.settings
    lost_before = cutoff(s.worker_lost_after_s)
    with rt.db.session() as session:
        stale = repo.stale_running(session, lost_before) if reap_stale else []
        undispatched = repo.undispatched(session, cutoff(s.redispatch_after_s))
        exhausted = repo.exhausted_queued(session)
        undispatched = _maybe_lost(rt, session, undispatched)
    for job in stale:
        _requeue_or_fail(rt, job, "the worker running this job stopped responding",
                         [JobRow.heartbeat_at < lost_before])
    for job in exhausted:
        _in_tx(rt, lambda session, j=job: lifecycle.fail_exhausted(session, j))
    for job in undispatched:
        if not lifecycle.attempts_left(job):
            continue
        if not _in_tx(rt, lambda session, j=job: lifecycle.dispatch(rt.celery, session, j, again=True)):
            break  # the broker is down; next round
        log.info("job %s: dispatched again", job.id)


def _maybe_lost(rt: Runtime, session, jobs: list[JobRow]) -> list[JobRow]:
    """The jobs to send again: never sent (dispatched_at unset), and, of those sent over redispatch_after_s ago,
    the ones of a queue whose broker holds fewer messages than the database has queued jobs (a restarted Redis, a
    lost file-system message). A job that only waits its turn in a long queue is not sent again every
    redispatch_after_s (its copies would pile up). When the depth cannot be read, every one is sent (copies are
    harmless: the claim is a conditional update)."""
    verdict: dict[str, bool] = {}
    out = []
    for job in jobs:
        if job.dispatched_at is not None:
            if job.queue not in verdict:
                depth = queue_depth(rt.celery, job.queue)
                verdict[job.queue] = depth is None or depth < repo.queued_count(session, job.queue)
            if not verdict[job.queue]:
                continue
        out.append(job)
    return out


def _register(rt: Runtime, worker_name: str, born) -> bool:
    try:
        register_worker(rt, worker_name)
        reap_own(rt, worker_name, before=born)
        return True
    except Exception:  # noqa: BLE001
        log.exception("worker registration failed; will retry")
        return False


def _loop(worker_name: str) -> None:
    """Heartbeat and reap every reaper_interval_s. While the database is unreachable nobody can heartbeat, so every
    running job's heartbeat goes stale at once: once the database is back, running jobs are left alone for
    worker_lost_after_s, long enough for their live supervisors to heartbeat (or record their result) again, so an
    outage does not turn every running job into a 'lost' one that runs a second time."""
    rt = get_runtime()
    born = datetime.fromtimestamp(psutil.Process().create_time(), timezone.utc)  # before any job of this process
    registered = _register(rt, worker_name, born)
    hold_stale_until = 0.0 if registered else time.monotonic() + rt.settings.worker_lost_after_s
    while not _stop.wait(rt.settings.reaper_interval_s):
        try:
            if not registered:
                registered = _register(rt, worker_name, born)
                if not registered:
                    hold_stale_until = time.monotonic() + rt.settings.worker_lost_after_s
                    continue
            beat_worker(rt, worker_name)
            reap_once(rt, reap_stale=time.monotonic() >= hold_stale_until)
        except DBAPIError as exc:
            hold_stale_until = time.monotonic() + rt.settings.worker_lost_after_s
            log.warning("reaper round failed, database unavailable: %s", exc.orig)
        except Exception:  # noqa: BLE001 - keep reaping through database or broker outages
            log.exception("reaper round failed")


def start_maintenance(worker_name: str) -> None:
    global _thread, _webhooks
    _stop.clear()
    _thread = threading.Thread(target=_loop, args=(worker_name,), name="distillery-maintenance", daemon=True)
    _thread.start()
    rt = get_runtime()  # the webhook outbox is delivered on a thread of its own (a slow receiver never delays reaping)
    _webhooks = WebhookDeliverer(rt.db, rt.settings, rt.settings.reaper_interval_s, job_json)
    _webhooks.start()


def stop_maintenance() -> None:
    _stop.set()
    if _webhooks is not None:
        _webhooks.stop()
