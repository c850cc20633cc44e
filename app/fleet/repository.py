"""Every query on the workers' registrations (written by the workers themselves, read by the API)."""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.tables import WorkerRow


def all_by_name(session: Session) -> list[WorkerRow]:
    return list(session.scalars(select(WorkerRow).order_by(WorkerRow.name)))


def seen_since(session: Session, since: datetime) -> list[WorkerRow]:
    """The live workers: seen after `since`."""
    return list(session.scalars(select(WorkerRow).where(WorkerRow.last_seen_at > since)))


def live_on_queue(session: Session, queue: str, since: datetime) -> str | None:
    """The name of a worker that consumes `queue` and was seen after `since`, if there is one."""
    return session.scalar(select(WorkerRow.name).where(
        WorkerRow.queues.contains(queue), WorkerRow.last_seen_at > since).limit(1))
