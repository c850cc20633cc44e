"""Changing the labels of a model or a job (PATCH), owner-scoped like every other read and write."""
from __future__ import annotations

from sqlalchemy.orm import Session

from app.core.tables import JobLabelRow, ModelLabelRow
from app.labels import service as labels


def patch_model(session: Session, scope: str | None, model_id: str, patch: dict):
    from app.models import service as models

    row = models.get(session, scope, model_id)
    labels.replace(row, ModelLabelRow, labels.merge(labels.as_dict(row.label_rows), patch))
    session.commit()
    return models.to_out(row)


def patch_job(session: Session, scope: str | None, job_id: str, patch: dict):
    from app.jobs import service as jobs

    row = jobs.get(session, scope, job_id)
    labels.replace(row, JobLabelRow, labels.merge(labels.as_dict(row.label_rows), patch))
    session.commit()
    return jobs.to_out(row)
