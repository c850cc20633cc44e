from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from app.artifacts.schemas import ArtifactOut
from app.core.ids import ID_PATTERN
from app.models.schemas import ModelOut


class ModelFromArtifact(BaseModel):
    artifact_id: str = Field(pattern=ID_PATTERN)
    name: str | None = Field(None, max_length=255, description="Default: the artifact's filename.")
    labels: dict[str, str] | None = None


class LineageJob(BaseModel):
    id: str
    kind: str
    method: str
    status: str
    config: dict[str, Any]
    dataset_id: str | None
    labels: dict[str, str]
    created_at: datetime
    finished_at: datetime | None


class LineageStep(BaseModel):
    artifact: ArtifactOut
    job: LineageJob = Field(description="The job that made the artifact.")
    input_model: ModelOut = Field(description="The job's input model; its source_artifact_id, when set, is the "
                                              "next step's artifact.")


class LineageOut(BaseModel):
    artifact_id: str
    steps: list[LineageStep] = Field(description="Newest first: the artifact asked about, the job that made it and "
                                                 "that job's input model, then the same for the artifact that model "
                                                 "came from, back to an uploaded model.")
    teacher: ModelOut | None = Field(description="The uploaded model at the root of the chain (None when the chain "
                                                 "is incomplete).")
    complete: bool = Field(description="False when a link is missing or not visible to the caller.")
