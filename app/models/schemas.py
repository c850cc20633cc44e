from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field


class TensorSpecOut(BaseModel):
    name: str
    dtype: str
    shape: list[int | str | None]


class InspectionOut(BaseModel):
    status: str = Field("done", description="'done': inspection ran at upload time and its results are below.")
    inputs: list[TensorSpecOut] = []
    outputs: list[TensorSpecOut] = []
    params: int | None = Field(None, description="Number of stored weight elements (initializers / tensors).")
    details: dict[str, Any] = {}
    traced_inputs: list[TensorSpecOut] = Field([], description=(
        "TorchScript saved by torch.jit.trace: the example inputs it was traced with (forward's argument names, the "
        "examples' dtypes and shapes; the first dim is the example's batch). TorchScript declares no input shapes; "
        "a traced graph is specialised to these, so job submission checks the dataset against them. Empty for "
        "ONNX (see `inputs`) and scripted models."))


class ModelOut(BaseModel):
    id: str
    name: str
    format: str = Field(description="Detected from the content: 'onnx' or 'torchscript'.")
    size_bytes: int
    sha256: str
    owner: str
    created_at: datetime
    inspection: InspectionOut
    labels: dict[str, str] = {}
    source_artifact_id: str | None = Field(None, description="Set when the model was made from an artifact (same "
                                                             "stored file); see GET /v1/artifacts/{id}/lineage.")
