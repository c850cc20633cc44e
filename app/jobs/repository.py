"""Every query on jobs and their events. Shared by the API and the workers; callers own the transaction (nothing here
commits or rolls back)."""
from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import and_, case, func, select, update
from sqlalchemy.orm import Session, selectinload

from app.core.db import utcnow
from app.core.ids import new_id
from app.core.tables import ArtifactRow, JobEventRow, JobLabelRow, JobRow
from app.jobs.states import ACTIVE, TERMINAL, JobStatus, sources_of
from app.labels.repository import filter_clauses
from app.webhooks import repository as outbox


def get(session: Session, job_id: str, owner: str | None = None) -> JobRow | None:
    stmt = select(JobRow).where(JobRow.id == job_id).execution_options(populate_existing=True)  # never a stale row
    if owner is not None:
        stmt = stmt.where(JobRow.owner == owner)
    return session.scalars(stmt).one_or_none()


def get_by_idempotency_key(session: Session, owner: str, key: str) -> JobRow | None:
    return session.scalars(select(JobRow).where(JobRow.owner == owner, JobRow.idempotency_key == key)).one_or_none()


def list_page(session: Session, owner: str | None, *, status: str | None, kind: str | None, model_id: str | None,
              cursor: str | None, limit: int, labels: list[tuple[str, str | None]] = ()) -> list[JobRow]:
    stmt = select(JobRow).options(selectinload(JobRow.label_rows), selectinload(JobRow.webhook_delivery))
    stmt = stmt.where(*filter_clauses(JobLabelRow, JobLabelRow.job_id, JobRow.id, list(labels)))
    if owner is not None:
        stmt = stmt.where(JobRow.owner == owner)
    if status:
        stmt = stmt.where(JobRow.status == status)
    if kind:
        stmt = stmt.where(JobRow.kind == kind)
    if model_id:
        stmt = stmt.where(JobRow.model_id == model_id)
    if cursor:
        stmt = stmt.where(JobRow.id < cursor)
    return list(session.scalars(stmt.order_by(JobRow.id.desc()).limit(limit)))


def add(session: Session, job: JobRow) -> JobRow:
    job.event_seq = 1
    session.add(job)
    session.flush()
    session.add(JobEventRow(job_id=job.id, seq=1, status=job.status, progress=job.progress, stage=job.stage))
    return job


def transition(session: Session, job_id: str, *, to: JobStatus | None = None, where: list | None = None,
               **values: Any) -> JobRow | None:
    """One conditional UPDATE ... RETURNING; records an event when status, progress or stage changes.

    `to` adds `status = to` and restricts the update to the states that may move there (the state table).
    Returns the updated row, or None when the condition did not hold (someone else moved the job first).
    """
    now = utcnow()
    conds = [JobRow.id == job_id, *(where or [])]
    if to is not None:
        conds.append(JobRow.status.in_(sources_of(to)))
        values["status"] = to.value
    evented = any(k in values for k in ("status", "progress", "stage"))
    if evented:
        values["event_seq"] = JobRow.event_seq + 1
    values["updated_at"] = now
    row = session.execute(
        update(JobRow).where(and_(*conds)).values(**values)
        # No in-Python evaluation of the WHERE against loaded rows: a row that lost the race must keep its state.
        .execution_options(synchronize_session=False)
        .returning(JobRow.event_seq, JobRow.status, JobRow.progress, JobRow.stage, JobRow.callback_url)
    ).one_or_none()
    if row is None:
        return None
    if to in TERMINAL and row.callback_url:  # the webhook outbox, in the transaction that ends the job
        outbox.record(session, job_id, row.callback_url, to.value)
    if evented:
        session.add(JobEventRow(job_id=job_id, seq=row.event_seq, status=row.status, progress=row.progress,
                                stage=row.stage, created_at=now))
    session.flush()
    job = session.get(JobRow, job_id, populate_existing=True)
    return job


def claim(session: Session, job_id: str, worker: str, device: str) -> JobRow | None:
    """queued -> running with attempts + 1, only if no one else claimed it and attempts remain."""
    now = utcnow()
    return transition(session, job_id, to=JobStatus.running,
                      where=[JobRow.status == JobStatus.queued.value, JobRow.attempts < JobRow.max_attempts],
                      attempts=JobRow.attempts + 1, worker=worker, device=device, started_at=now,
                      heartbeat_at=now, progress=0.0, stage="starting", error_code=None, error_message=None)


def _running_attempt(attempt: int) -> list:
    return [JobRow.status == JobStatus.running.value, JobRow.attempts == attempt]


def record_progress(session: Session, job_id: str, attempt: int, progress: float, stage: str) -> JobRow | None:
    return transition(session, job_id, where=_running_attempt(attempt), progress=max(0.0, min(1.0, progress)),
                      stage=stage[:255], heartbeat_at=utcnow())


def heartbeat(session: Session, job_id: str, attempt: int) -> tuple[bool, bool]:
    """Returns (still ours, cancel requested)."""
    row = session.execute(
        update(JobRow).where(JobRow.id == job_id, *_running_attempt(attempt))
        .values(heartbeat_at=utcnow()).returning(JobRow.cancel_requested)
    ).one_or_none()
    return (row is not None, bool(row and row.cancel_requested))


def _finish_values(job: JobRow | None) -> dict:
    now = utcnow()
    out: dict[str, Any] = {"finished_at": now}
    if job is not None and job.started_at is not None:
        out["duration_s"] = max(0.0, (now - job.started_at).total_seconds())
    return out


def succeed(session: Session, job_id: str, attempt: int, artifact: ArtifactRow, metrics: dict) -> JobRow | None:
    """Artifact, metrics and `succeeded` in one transaction (the caller commits). The artifact row is added only
    when `attempt` still holds the job; otherwise nothing is written."""
    job = get(session, job_id)
    artifact.id = artifact.id or new_id()
    done = transition(session, job_id, to=JobStatus.succeeded, where=_running_attempt(attempt),
                      progress=1.0, stage="done", metrics=metrics, artifact_id=artifact.id, **_finish_values(job))
    if done is not None:
        session.add(artifact)
        session.flush()
    return done


def fail(session: Session, job_id: str, code: str, message: str, *, attempt: int | None = None,
         status: JobStatus = JobStatus.failed) -> JobRow | None:
    job = get(session, job_id)
    where = _running_attempt(attempt) if attempt is not None else []
    return transition(session, job_id, to=status, where=where, error_code=code, error_message=message[:4000],
                      stage=message[:255] if status == JobStatus.failed else "cancelled", **_finish_values(job))


def requeue(session: Session, job_id: str, *, attempt: int | None, reason: str, where: list | None = None) -> JobRow | None:
    """running -> queued for another attempt (transient error or lost worker)."""
    conds = list(where or [])
    if attempt is not None:
        conds += _running_attempt(attempt)
    return transition(session, job_id, to=JobStatus.queued, where=conds, stage=f"re-queued: {reason}"[:255],
                      progress=0.0, worker=None, heartbeat_at=None, dispatched_at=utcnow())


def cancel_queued(session: Session, job_id: str) -> JobRow | None:
    return transition(session, job_id, to=JobStatus.cancelled, where=[JobRow.status == JobStatus.queued.value],
                      error_code="cancelled", error_message="cancelled by request", stage="cancelled",
                      finished_at=utcnow())


def request_cancel(session: Session, job_id: str) -> JobRow | None:
    return transition(session, job_id, where=[JobRow.status == JobStatus.running.value],
                      cancel_requested=True, stage="cancelling")


def mark_dispatched(session: Session, job_id: str, dispatched: bool = True) -> None:
    session.execute(update(JobRow).where(JobRow.id == job_id).values(dispatched_at=utcnow() if dispatched else None))


def set_device(session: Session, job_id: str, device: str) -> None:
    session.execute(update(JobRow).where(JobRow.id == job_id).values(device=device[:64]))


def stale_running(session: Session, older_than: datetime) -> list[JobRow]:
    return list(session.scalars(select(JobRow).where(
        JobRow.status == JobStatus.running.value, JobRow.heartbeat_at < older_than)))


def running_on_worker(session: Session, worker: str) -> list[JobRow]:
    return list(session.scalars(select(JobRow).where(JobRow.status == JobStatus.running.value, JobRow.worker == worker)))


def undispatched(session: Session, older_than: datetime) -> list[JobRow]:
    return list(session.scalars(select(JobRow).where(
        JobRow.status == JobStatus.queued.value,
        (JobRow.dispatched_at.is_(None)) | (JobRow.dispatched_at < older_than))))


def queued_count(session: Session, queue: str) -> int:
    return session.scalar(select(func.count()).select_from(JobRow).where(
        JobRow.status == JobStatus.queued.value, JobRow.queue == queue)) or 0


def exhausted_queued(session: Session) -> list[JobRow]:
    return list(session.scalars(select(JobRow).where(
        JobRow.status == JobStatus.queued.value, JobRow.attempts >= JobRow.max_attempts)))


def events_after(session: Session, job_id: str, seq: int) -> list[JobEventRow]:
    return list(session.scalars(select(JobEventRow).where(JobEventRow.job_id == job_id, JobEventRow.seq > seq)
                                .order_by(JobEventRow.seq)))


def active_using_model(session: Session, model_id: str) -> int:
    return session.scalar(select(func.count()).select_from(JobRow).where(
        (JobRow.model_id == model_id) | (JobRow.student_model_id == model_id),
        JobRow.status.in_([s.value for s in ACTIVE]))) or 0


def active_of_owner(session: Session, owner: str) -> int:
    return session.scalar(select(func.count()).select_from(JobRow).where(
        JobRow.owner == owner, JobRow.status.in_([s.value for s in ACTIVE]))) or 0


def counts_by_kind_status(session: Session) -> list[tuple[str, str, int]]:
    return [tuple(r) for r in session.execute(
        select(JobRow.kind, JobRow.status, func.count()).group_by(JobRow.kind, JobRow.status))]


def duration_histogram(session: Session, buckets: list[float]) -> list[tuple[str, list[int], float, int]]:
    """Per kind: cumulative bucket counts, sum and count of finished jobs' durations."""
    cols = [func.sum(case((JobRow.duration_s <= b, 1), else_=0)) for b in buckets]
    rows = session.execute(select(JobRow.kind, *cols, func.sum(JobRow.duration_s), func.count())
                           .where(JobRow.duration_s.is_not(None)).group_by(JobRow.kind))
    return [(r[0], [int(x or 0) for x in r[1:1 + len(buckets)]], float(r[-2] or 0.0), int(r[-1])) for r in rows]
