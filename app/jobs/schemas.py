"""The public job contract: request bodies (one config schema per kind) and the job resource."""
from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.core.ids import ID_PATTERN


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class CalibrationConfig(StrictModel):
    samples: int = Field(512, ge=1, le=100_000, description="Calibration samples taken from the dataset.")
    method: Literal["minmax", "entropy", "percentile"] = Field("minmax", description="Range estimator.")


class BenchmarkConfig(StrictModel):
    batch_sizes: list[Annotated[int, Field(ge=1, le=4096)]] = Field(
        default_factory=lambda: [1, 64], min_length=1, max_length=8, description="Batch sizes timed.")
    repeats: int = Field(50, ge=1, le=10_000, description="Timed runs per batch size and model.")
    warmup: int = Field(5, ge=0, le=1_000, description="Untimed runs before timing.")

    @field_validator("batch_sizes")
    @classmethod
    def _unique(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError("batch sizes must be distinct")
        return v


class QuantizeConfig(StrictModel):
    method: Literal["dynamic_int8", "static_int8"] = Field(
        description="dynamic_int8: int8 weights, activations quantized at run time. static_int8: weights and "
                    "activations int8 (QDQ), calibrated on the job's dataset.")
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    per_channel: bool = Field(True, description="Per-channel weight scales.")
    max_accuracy_drop: float = Field(0.01, ge=0.0, le=1.0, description="Accuracy drop (fraction) reported as "
                                     "within budget or not.")
    output_format: Literal["onnx"] = Field("onnx", description="Format of the artifact.")
    benchmark: BenchmarkConfig = Field(default_factory=BenchmarkConfig)


Device = Literal["auto", "cpu", "cuda"]
Id = Annotated[str, Field(pattern=ID_PATTERN)]


class QuantizeJobCreate(StrictModel):
    kind: Literal["quantize"]
    model_id: Id
    dataset_id: Id | None = Field(None, description="Calibration/evaluation data (required by static_int8).")
    config: QuantizeConfig
    device: Device = Field("auto", description="auto: a GPU worker when one is live, else CPU.")


# Later kinds (prune, distill) become a discriminated union on `kind`, each with its own config schema.
JobCreate = QuantizeJobCreate


class JobError(BaseModel):
    code: str
    message: str


class JobOut(BaseModel):
    id: str
    kind: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    model_id: str
    dataset_id: str | None
    config: dict[str, Any]
    device_requested: str
    progress: float = Field(ge=0.0, le=1.0)
    stage: str
    attempts: int
    max_attempts: int
    error: JobError | None
    metrics: dict[str, Any] | None
    artifact_id: str | None
    worker: str | None
    device: str | None
    owner: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime


class JobEventOut(BaseModel):
    seq: int
    status: str
    progress: float
    stage: str
    at: datetime
