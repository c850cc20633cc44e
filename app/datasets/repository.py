"""Every query on datasets; callers own the transaction."""
from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.db import owned
from app.core.tables import DatasetRow


def get(session: Session, owner: str | None, dataset_id: str) -> DatasetRow | None:
    return session.scalars(owned(select(DatasetRow).where(DatasetRow.id == dataset_id), DatasetRow.owner,
                                 owner)).one_or_none()


def by_id(session: Session, dataset_id: str) -> DatasetRow | None:
    """Any owner's dataset."""
    return session.get(DatasetRow, dataset_id)


def with_content(session: Session, owner: str, sha256: str) -> DatasetRow | None:
    """The owner's oldest dataset of this content."""
    stmt = select(DatasetRow).where(DatasetRow.owner == owner, DatasetRow.sha256 == sha256)
    return session.scalars(stmt.order_by(DatasetRow.id).limit(1)).first()


def list_page(session: Session, owner: str | None, cursor: str | None, limit: int,
              sha256: str | None = None) -> list[DatasetRow]:
    stmt = owned(select(DatasetRow), DatasetRow.owner, owner)
    if sha256 is not None:
        stmt = stmt.where(DatasetRow.sha256 == sha256)
    if cursor:
        stmt = stmt.where(DatasetRow.id < cursor)
    return list(session.scalars(stmt.order_by(DatasetRow.id.desc()).limit(limit)))
