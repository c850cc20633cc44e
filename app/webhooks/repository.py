"""The webhook outbox: recorded in the transaction that ends a job, claimed conditionally, retried with back-off.

Queries only; callers own the transaction (as in app/jobs/repository.py, which records a job's row when it ends).
"""
from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from app.core.db import utcnow
from app.core.tables import WebhookDeliveryRow

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
MAX_BACKOFF_S = 3600.0


def record(session: Session, job_id: str, url: str, status: str) -> None:
    """Called by the job's terminal transition, inside its transaction (a job ends once: one row per job)."""
    now = utcnow()
    session.add(WebhookDeliveryRow(job_id=job_id, url=url, event=f"job.{status}", state=PENDING, attempts=0,
                                   next_attempt_at=now, created_at=now))


def due(session: Session, now: datetime, limit: int) -> list[str]:
    """Ids of deliveries whose time has come and that no live claim holds."""
    return list(session.scalars(
        select(WebhookDeliveryRow.id).where(
            WebhookDeliveryRow.state == PENDING, WebhookDeliveryRow.next_attempt_at <= now,
            or_(WebhookDeliveryRow.claimed_until.is_(None), WebhookDeliveryRow.claimed_until < now))
        .order_by(WebhookDeliveryRow.next_attempt_at).limit(limit)))


def claim(session: Session, delivery_id: str, now: datetime, lease_s: float):
    """One conditional UPDATE: attempts + 1 and a lease, only if still due and unclaimed. Of two processes racing for
    the same delivery exactly one gets a row back; the other gets None and moves on."""
    return session.execute(
        update(WebhookDeliveryRow).where(
            WebhookDeliveryRow.id == delivery_id, WebhookDeliveryRow.state == PENDING,
            WebhookDeliveryRow.next_attempt_at <= now,
            or_(WebhookDeliveryRow.claimed_until.is_(None), WebhookDeliveryRow.claimed_until < now))
        .values(attempts=WebhookDeliveryRow.attempts + 1, claimed_until=now + timedelta(seconds=lease_s),
                last_attempt_at=now)
        .returning(WebhookDeliveryRow.id, WebhookDeliveryRow.job_id, WebhookDeliveryRow.url,
                   WebhookDeliveryRow.event, WebhookDeliveryRow.attempts)
    ).one_or_none()


def backoff_s(base_s: float, attempts: int) -> float:
    return min(MAX_BACKOFF_S, base_s * 2 ** max(0, attempts - 1))


def finish_attempt(session: Session, delivery_id: str, attempt: int, *, ok: bool, status_code: int | None,
                   error: str | None, max_attempts: int, base_backoff_s: float) -> str | None:
    """Record one attempt's outcome (only by the holder of that attempt's claim); returns the new state."""
    now = utcnow()
    if ok:
        values = {"state": DELIVERED, "delivered_at": now}
    elif attempt >= max_attempts:
        values = {"state": FAILED}
    else:
        values = {"state": PENDING, "next_attempt_at": now + timedelta(seconds=backoff_s(base_backoff_s, attempt))}
    row = session.execute(
        update(WebhookDeliveryRow).where(WebhookDeliveryRow.id == delivery_id,
                                         WebhookDeliveryRow.attempts == attempt,
                                         WebhookDeliveryRow.state == PENDING)
        .values(last_status_code=status_code, last_error=(error or None) and error[:2000], claimed_until=None,
                **values)
        .returning(WebhookDeliveryRow.state)
    ).one_or_none()
    return None if row is None else row.state
