"""Every query on API keys; callers own the transaction."""
from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.tables import ApiKeyRow


def get(session: Session, key_id: str) -> ApiKeyRow | None:
    return session.get(ApiKeyRow, key_id)


def add(session: Session, row: ApiKeyRow) -> ApiKeyRow:
    session.add(row)
    return row


def list_all(session: Session) -> list[ApiKeyRow]:
    return list(session.scalars(select(ApiKeyRow).order_by(ApiKeyRow.created_at)))
