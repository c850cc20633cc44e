"""Every query on artifacts (the rows the workers write when a job succeeds); callers own the transaction."""
from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.db import owned
from app.core.tables import ArtifactRow


def get(session: Session, owner: str | None, artifact_id: str) -> ArtifactRow | None:
    return session.scalars(owned(select(ArtifactRow).where(ArtifactRow.id == artifact_id), ArtifactRow.owner,
                                 owner)).one_or_none()


def by_id(session: Session, artifact_id: str) -> ArtifactRow | None:
    """Any owner's artifact."""
    return session.get(ArtifactRow, artifact_id)
