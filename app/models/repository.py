"""Every query on models, and the storage accounting that uploads share (what an owner stores, whether any row still
points at some content). Callers own the transaction."""
from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from app.core.db import owned, utcnow
from app.core.tables import ArtifactRow, DatasetRow, ModelLabelRow, ModelRow
from app.labels.repository import filter_clauses


def get(session: Session, owner: str | None, model_id: str) -> ModelRow | None:
    stmt = select(ModelRow).where(ModelRow.id == model_id, ModelRow.deleted_at.is_(None))
    return session.scalars(owned(stmt, ModelRow.owner, owner)).one_or_none()


def by_id(session: Session, model_id: str) -> ModelRow | None:
    """Any owner's model, soft-deleted ones included (history: lineage, a job's inputs)."""
    return session.get(ModelRow, model_id)


def list_page(session: Session, owner: str | None, cursor: str | None, limit: int,
              labels: list[tuple[str, str | None]] = (), sha256: str | None = None) -> list[ModelRow]:
    stmt = owned(select(ModelRow).where(ModelRow.deleted_at.is_(None)), ModelRow.owner, owner)
    if sha256 is not None:
        stmt = stmt.where(ModelRow.sha256 == sha256)
    stmt = stmt.where(*filter_clauses(ModelLabelRow, ModelLabelRow.model_id, ModelRow.id, list(labels)))
    stmt = stmt.options(selectinload(ModelRow.label_rows))
    if cursor:
        stmt = stmt.where(ModelRow.id < cursor)
    return list(session.scalars(stmt.order_by(ModelRow.id.desc()).limit(limit)))


def live_with_content(session: Session, owner: str, sha256: str, fmt: str) -> ModelRow | None:
    """The owner's oldest live model of this content and format (what a repeated upload of it answers with)."""
    stmt = select(ModelRow).where(ModelRow.owner == owner, ModelRow.sha256 == sha256, ModelRow.format == fmt,
                                  ModelRow.deleted_at.is_(None))
    return session.scalars(stmt.order_by(ModelRow.id).limit(1)).first()


def live_from_artifact(session: Session, owner: str, artifact_id: str) -> ModelRow | None:
    """The owner's oldest live model made from this artifact."""
    stmt = select(ModelRow).where(ModelRow.source_artifact_id == artifact_id, ModelRow.owner == owner,
                                  ModelRow.deleted_at.is_(None))
    return session.scalars(stmt.order_by(ModelRow.id).limit(1)).first()


def add(session: Session, row: ModelRow | DatasetRow) -> None:
    """Insert a new model's row (or, for the upload path that models and datasets share, a dataset's), flushed so
    that it has its id."""
    session.add(row)
    session.flush()


def soft_delete(session: Session, model: ModelRow) -> None:
    model.deleted_at = utcnow()


def content_referenced(session: Session, sha256: str) -> bool:
    """Whether any live model, any dataset or any artifact still points at this content."""
    live_models = select(func.count()).select_from(ModelRow).where(
        ModelRow.sha256 == sha256, ModelRow.deleted_at.is_(None))
    datasets = select(func.count()).select_from(DatasetRow).where(DatasetRow.sha256 == sha256)
    artifacts = select(func.count()).select_from(ArtifactRow).where(ArtifactRow.sha256 == sha256)
    return any(session.scalar(q) for q in (live_models, datasets, artifacts))


def stored_bytes(session: Session, owner: str) -> int:
    """What one owner stores: live models, datasets and artifacts. A model made from an artifact shares the
    artifact's file and is not counted again."""
    parts = (
        select(func.coalesce(func.sum(ModelRow.size_bytes), 0)).where(ModelRow.owner == owner,
                                                                     ModelRow.deleted_at.is_(None),
                                                                     ModelRow.source_artifact_id.is_(None)),
        select(func.coalesce(func.sum(DatasetRow.size_bytes), 0)).where(DatasetRow.owner == owner),
        select(func.coalesce(func.sum(ArtifactRow.size_bytes), 0)).where(ArtifactRow.owner == owner),
    )
    return sum(int(session.scalar(q) or 0) for q in parts)
