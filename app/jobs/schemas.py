"""The public job contract: request bodies (a config per method, from app/methods) and the job resource."""
from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Field, create_model

from app.core.ids import ID_PATTERN
from app.methods import KINDS, StrictModel, config_union
from app.methods.datasets import DATASET_REF_PATTERN
from app.webhooks.schemas import WebhookOut


Device = Literal["auto", "cpu", "cuda"]
Id = Annotated[str, Field(pattern=ID_PATTERN)]
DatasetRef = Annotated[str, Field(
    pattern=DATASET_REF_PATTERN,
    description="An uploaded dataset's id, or a built-in: builtin:mnist, builtin:fashion-mnist, builtin:digits.")]


class _JobCreateBase(StrictModel):
    model_id: Id | None = Field(None, description="The input model. Give exactly one of model_id and artifact_id.")
    artifact_id: Id | None = Field(None, description="An artifact of an earlier job as the input model (no download: "
                                   "a model row pointing at the same stored file is made, or reused).")
    dataset_id: DatasetRef | None = Field(None, description="Calibration / evaluation / training data.")
    device: Device = Field("auto", description="auto: a GPU worker when one is live, else CPU.")
    labels: dict[str, str] | None = Field(None, description="Up to 20 labels, keys [a-z0-9_.-]{1,63}, values up to "
                                          "255 characters; filter lists with ?label=key:value.")
    callback_url: str | None = Field(None, max_length=2048, description="POSTed the job JSON, signed, when the job "
                                     "ends; its host must be on the server's webhook allow-list.")


def _job_create(kind: str) -> type[_JobCreateBase]:
    return create_model(f"{kind.capitalize()}JobCreate", __base__=_JobCreateBase, __module__=__name__,
                        kind=(Literal[kind], ...), config=(config_union(kind), ...))  # type: ignore[valid-type]


#: One request body per job kind, each with its methods' configs (app/methods), chosen by `kind`.
JOB_CREATE_MODELS = {kind: _job_create(kind) for kind in KINDS}
JobCreate = Annotated[Union[tuple(JOB_CREATE_MODELS.values())], Field(discriminator="kind")]  # noqa: UP007


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
    queue: str | None = Field(None, description="The queue the job was sent to: `gpu` (`device: cuda`, or `auto` "
                              "while a live worker consumed `gpu`) or `cpu`; only a worker consuming it claims the "
                              "job. Once claimed, `worker` names that worker and `device` where the job runs.")
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
    labels: dict[str, str] = {}
    webhook: WebhookOut | None = Field(None, description="Delivery of the callback_url webhook, when the job has one.")


class JobEventOut(BaseModel):
    seq: int
    status: str
    progress: float
    stage: str
    at: datetime
