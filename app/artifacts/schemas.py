from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel


class ArtifactOut(BaseModel):
    id: str
    job_id: str
    format: str
    size_bytes: int
    sha256: str
    filename: str
    owner: str
    created_at: datetime
