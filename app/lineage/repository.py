"""The one read of a lineage walk that is not a model's or an artifact's (those are in their domains' repositories):
an artifact's job, by id, whoever owns it (the service keeps only the caller's)."""
from __future__ import annotations

from sqlalchemy.orm import Session

from app.core.tables import JobRow


def job(session: Session, job_id: str) -> JobRow | None:
    return session.get(JobRow, job_id)
