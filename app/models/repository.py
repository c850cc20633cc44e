from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.core.db import utcnow
from app.core.tables import ArtifactRow, DatasetRow, ModelRow


def get(session: Session, owner: str, model_id: str) -> ModelRow | None:
    return session.scalars(select(ModelRow).where(
        ModelRow.id == model_id, ModelRow.owner == owner, ModelRow.deleted_at.is_(None))).one_or_none()


def list_page(session: Session, owner: str, cursor: str | None, limit: int) -> list[ModelRow]:
    stmt = select(ModelRow).where(ModelRow.owner == owner, ModelRow.deleted_at.is_(None))
    if cursor:
        stmt = stmt.where(ModelRow.id < cursor)
    return list(session.scalars(stmt.order_by(ModelRow.id.desc()).limit(limit)))


def soft_delete(session: Session, model: ModelRow) -> None:
    model.deleted_at = utcnow()


def content_referenced(session: Session, sha256: str) -> bool:
    """Whether any live model, any dataset or any artifact still points at this content."""
    live_models = select(func.count()).select_from(ModelRow).where(
        ModelRow.sha256 == sha256, ModelRow.deleted_at.is_(None))
    datasets = select(func.count()).select_from(DatasetRow).where(DatasetRow.sha256 == sha256)
    artifacts = select(func.count()).select_from(ArtifactRow).where(ArtifactRow.sha256 == sha256)
    return any(session.scalar(q) for q in (live_models, datasets, artifacts))
