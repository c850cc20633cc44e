"""Artifacts: reads (owner-scoped), the content check before a download, and byte ranges."""
from __future__ import annotations

import re

from sqlalchemy.orm import Session

from app.artifacts import repository as repo
from app.artifacts.schemas import ArtifactOut
from app.core.errors import DistilleryError, NotFound
from app.core.tables import ArtifactRow

RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


class RangeNotSatisfiable(DistilleryError):
    status_code = 416
    code = "range_not_satisfiable"


def get(session: Session, owner: str | None, artifact_id: str) -> ArtifactRow:
    row = repo.get(session, owner, artifact_id)
    if row is None:
        raise NotFound(f"artifact {artifact_id} not found", code="artifact_not_found")
    return row


class ContentMissing(DistilleryError):
    status_code = 410
    code = "artifact_content_missing"


def check_content(storage, row: ArtifactRow) -> None:
    if not storage.exists(row.sha256):
        raise ContentMissing(f"the content of artifact {row.id} is no longer in storage")


def to_out(row: ArtifactRow) -> ArtifactOut:
    return ArtifactOut(id=row.id, job_id=row.job_id, format=row.format, size_bytes=row.size_bytes,
                       sha256=row.sha256, filename=row.filename, owner=row.owner, created_at=row.created_at)


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """One byte range (inclusive bounds) from a Range header, or None for the whole file."""
    if not header:
        return None
    m = RANGE_RE.match(header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        raise RangeNotSatisfiable("only a single 'bytes=start-end' range is supported", detail={"size_bytes": size})
    start_s, end_s = m.groups()
    if start_s:
        start, end = int(start_s), min(int(end_s), size - 1) if end_s else size - 1
    else:  # suffix range: the last N bytes
        n = int(end_s)
        start, end = max(0, size - n), size - 1
    if start >= size or start > end:
        raise RangeNotSatisfiable(f"range {header!r} is outside the {size}-byte file", detail={"size_bytes": size})
    return start, end
