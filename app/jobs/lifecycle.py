"""The job lifecycle: every move of a job after it is created is decided here, and only here.

    created (API) --dispatch--> queued --claim (worker)--> running --+-- record_success --> succeeded
                                  ^                                  +-- record_failure --> failed
                                  |                                  +-- record_cancelled -> cancelled
                                  +------ retry_or_fail (a transient error, a lost worker) --+
                                          while attempts remain, else failed

The state table itself (which status may follow which) is `app/jobs/states.py`; the conditional updates that
apply it are `app/jobs/repository.py`. This module holds the rules on top: when a job may be claimed, when a
failed attempt is retried, when attempts are exhausted, and how a job reaches the broker. The API (submission,
cancel), the worker's supervisor (claim, outcome) and its reaper (lost workers, lost messages) all call it.

Transactions: every function except `dispatch` works in the caller's session and never commits; the caller's
scope commits (the request in the API, the task's retried transaction in the worker). `dispatch` talks to the
broker, so it is called only after the transaction that made the job queued has committed; it is the only caller
of `send_run_job`.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from enum import StrEnum

from celery import Celery
from sqlalchemy.orm import Session

from app.core.broker import send_run_job
from app.core.errors import Conflict, InvalidTransition
from app.core.tables import ArtifactRow, JobRow
from app.jobs import repository as repo
from app.jobs.states import ErrorCode, JobStatus

log = logging.getLogger("distillery.jobs")


class Move(StrEnum):
    """What a lifecycle call did to the job."""

    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    requeued = "requeued"
    lost = "lost"  # the job was no longer ours (another claim, a cancel, the reaper): nothing was written


def attempts_left(job: JobRow) -> bool:
    """The one rule for "attempts exhausted": a job is tried at most `max_attempts` times."""
    return job.attempts < job.max_attempts


def _exhausted(job: JobRow) -> str:
    return f"the job was tried {job.attempts} times without finishing"


def claim(session: Session, job_id: str, worker: str, device: str | Callable[[JobRow], str]) -> JobRow | None:
    """queued -> running for `worker` (attempts + 1), on `device` (or the device `device(job)` picks for it). None
    when the job is not queued any more (another worker claimed it, it was cancelled) or has no attempt left, in
    which case it is failed `attempts_exhausted`."""
    current = repo.get(session, job_id)
    if current is None or current.status != JobStatus.queued:
        return None
    if not attempts_left(current):
        repo.fail(session, job_id, ErrorCode.attempts_exhausted, _exhausted(current))
        return None
    return repo.claim(session, job_id, worker, device if isinstance(device, str) else device(current))


def record_success(session: Session, job_id: str, attempt: int, artifact: ArtifactRow, metrics: dict) -> Move:
    """Artifact row, metrics and `succeeded` together, if `attempt` still holds the job."""
    return Move.succeeded if repo.succeed(session, job_id, attempt, artifact, metrics) is not None else Move.lost


def record_failure(session: Session, job_id: str, attempt: int, code: str, message: str) -> Move:
    """A final failure of `attempt` (not retried)."""
    return Move.failed if repo.fail(session, job_id, code, message, attempt=attempt) is not None else Move.lost


def record_cancelled(session: Session, job_id: str, attempt: int, message: str) -> Move:
    """The running attempt stopped because a cancel was requested."""
    done = repo.fail(session, job_id, ErrorCode.cancelled, message, attempt=attempt, status=JobStatus.cancelled)
    return Move.cancelled if done is not None else Move.lost


def retry_or_fail(session: Session, job: JobRow, *, attempt: int, reason: str, code: str, message: str | None = None,
                  where: Iterable = ()) -> Move:
    """An attempt that did not finish through no fault of the job (a transient error, a worker that died): the
    job goes back to the queue while attempts remain, else it fails with `code` (`message`, or `reason` with the
    count). `where` narrows the update further (the reaper's "heartbeat still stale"). The caller dispatches a
    re-queued job after committing."""
    if attempt < job.max_attempts:
        moved = repo.requeue(session, job.id, attempt=attempt, reason=reason, where=list(where))
        return Move.requeued if moved is not None else Move.lost
    done = repo.fail(session, job.id, code, message or f"{reason}; gave up after {attempt} attempts",
                     attempt=attempt)
    return Move.failed if done is not None else Move.lost


def fail_exhausted(session: Session, job: JobRow) -> Move:
    """A queued job with no attempt left (its last attempt was re-queued by a reaper that then found none)."""
    done = repo.fail(session, job.id, ErrorCode.attempts_exhausted, _exhausted(job))
    return Move.failed if done is not None else Move.lost


def cancel(session: Session, job: JobRow) -> JobRow:
    """A client's cancel: a queued job is cancelled at once; a running one is asked to stop (its worker records
    `cancelled` when the job process has stopped). Raises `InvalidTransition` for a finished job, and `Conflict`
    (`retry`) when the job changed state twice while cancelling."""
    if job.status == JobStatus.queued:
        done = repo.cancel_queued(session, job.id)
        if done is not None:
            return done
        job = repo.get(session, job.id) or job  # it was claimed meanwhile
    if job.status == JobStatus.running:
        done = repo.request_cancel(session, job.id)
        if done is not None:
            return done
        job = repo.get(session, job.id) or job
    if job.status in (JobStatus.queued, JobStatus.running):
        raise Conflict("the job changed state while cancelling; retry", code="retry")
    raise InvalidTransition(f"job {job.id} is already {job.status}; only queued or running jobs can be cancelled",
                            detail={"status": job.status})


def dispatch(celery: Celery, session: Session, job: JobRow, *, again: bool = False) -> bool:
    """Send a queued job to its queue. Only after the transaction that made it queued has committed: a worker may
    claim it the moment the message arrives. A failed send is recorded in `session` (no dispatch time), and the
    reaper sends the job on its next round; `again` (the reaper's own sends) records the new dispatch time. Extra
    copies of a message are harmless: the claim is a conditional update. The caller commits."""
    try:
        send_run_job(celery, job.id, job.queue)
    except Exception as exc:  # noqa: BLE001 - the database keeps the job; the reaper dispatches it again
        log.warning("could not enqueue job %s (%s); it stays queued and will be dispatched again", job.id, exc)
        repo.mark_dispatched(session, job.id, dispatched=False)
        return False
    if again:
        repo.mark_dispatched(session, job.id)
    return True
