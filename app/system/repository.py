"""The system routes' queries: the readiness probe and the stored-bytes gauges (the job figures are
app/jobs/repository.py's)."""
from __future__ import annotations

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from app.core.tables import DatasetRow, ModelRow


def ping(session: Session) -> None:
    session.execute(text("SELECT 1"))


def model_bytes(session: Session) -> float:
    """The bytes of every model row (deleted ones included)."""
    return float(session.scalar(select(func.coalesce(func.sum(ModelRow.size_bytes), 0))))


def dataset_bytes(session: Session) -> float:
    return float(session.scalar(select(func.coalesce(func.sum(DatasetRow.size_bytes), 0))))
