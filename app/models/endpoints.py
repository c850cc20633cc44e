"""The routes of models: upload, list, read, delete, their labels and the jobs that took them as input.

Each route keeps the OpenAPI tag it has always had: the label patch is tagged `labels` and the model's jobs
`lineage`, beside the other label and lineage operations; `router` gathers the three groups.
"""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from app.auth.deps import PrincipalDep
from app.core.deps import ServicesDep, SessionDep
from app.core.errors import Conflict, NotFound, PayloadTooLarge, Unprocessable, error_responses
from app.core.ids import ID_PATTERN
from app.core.pagination import CursorQuery, LabelQuery, LimitQuery, next_cursor
from app.core.schemas import Page
from app.core.uploads import UnsupportedMediaType, UploadAborted, receive_upload
from app.jobs import service as jobs
from app.jobs.schemas import JobOut
from app.labels.schemas import LabelsPatch
from app.labels.service import parse_filters
from app.models import service
from app.models.schemas import ModelOut
from app.models.service import EXISTING_HEADER

models_routes = APIRouter(tags=["models"])
labels_routes = APIRouter(tags=["labels"])
lineage_routes = APIRouter(tags=["lineage"])
ModelId = Path(pattern=ID_PATTERN, description="A model id.")
Sha256Query = Annotated[str | None, Query(pattern=r"^[0-9a-fA-F]{64}$", description=(
    "Only records of this content: its sha256, 64 hex characters (e.g. to find an upload before sending it)."))]

MULTIPART_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"],
    "properties": {"file": {"type": "string", "format": "binary", "description": "ONNX or TorchScript file."},
                   "name": {"type": "string", "maxLength": 255},
                   "labels": {"type": "string", "description": 'A JSON object of labels, e.g. {"team": "search"}.'}}}}}}}


def existing_response(model: type, same: str, kept: str) -> dict:
    """The OpenAPI entries of an upload: 201 (a new record), and the 200 it answers when the owner already has its
    content."""
    return {200: {"model": model, "description": f"The owner already has this content (same {same}): the existing "
                                                f"record, unchanged ({kept}), and nothing is stored or counted "
                                                "against the quota again.",
                  "headers": {EXISTING_HEADER: {"description": "`true`: the record existed before this upload.",
                                                "schema": {"type": "string", "enum": ["true"]}}}},
            201: {"description": "Stored and recorded: a new record."}}


def answer_upload(response: Response, created: bool) -> None:
    if not created:
        response.status_code = 200
        response.headers[EXISTING_HEADER] = "true"


@models_routes.post("/models", status_code=201, response_model=ModelOut, openapi_extra=MULTIPART_BODY,
                    responses={**existing_response(ModelOut, "sha256 and format", "its name and labels are kept"),
                               **error_responses(UploadAborted, PayloadTooLarge, UnsupportedMediaType,
                                                 Unprocessable)},
                    summary="Upload a model (streamed, hashed, inspected); a repeat answers the existing model")
async def upload_model(request: Request, response: Response, services: ServicesDep, who: PrincipalDep) -> ModelOut:
    received = await receive_upload(request, services.storage, max_bytes=services.settings.max_upload_bytes,
                                    quota=service.upload_quota(services, who.owner))
    model, created = await run_in_threadpool(service.create_from_upload, services, who.owner, received)
    answer_upload(response, created)
    return model


@models_routes.get("/models", response_model=Page[ModelOut])
def list_models(session: SessionDep, who: PrincipalDep, cursor: CursorQuery = None, limit: LimitQuery = 50,
                label: LabelQuery = None, sha256: Sha256Query = None):
    rows = service.list_page(session, who.scope, cursor, limit, parse_filters(label),
                             sha256.lower() if sha256 else None)
    return Page[ModelOut](items=[service.to_out(r) for r in rows], next_cursor=next_cursor(rows, limit))


@models_routes.get("/models/{model_id}", response_model=ModelOut, responses=error_responses(NotFound))
def get_model(session: SessionDep, who: PrincipalDep, model_id: str = ModelId) -> ModelOut:
    return service.to_out(service.get(session, who.scope, model_id))


@models_routes.delete("/models/{model_id}", status_code=204, responses=error_responses(NotFound, Conflict))
def delete_model(services: ServicesDep, session: SessionDep, who: PrincipalDep, model_id: str = ModelId) -> Response:
    model = service.get(session, who.scope, model_id)
    service.delete(services, session, model, active_jobs=jobs.active_using_model(session, model.id))
    return Response(status_code=204)


@labels_routes.patch("/models/{model_id}", response_model=ModelOut,
                     responses=error_responses(NotFound, Unprocessable),
                     summary="Change a model's labels (JSON merge patch: null removes a key)")
def patch_model(body: LabelsPatch, session: SessionDep, who: PrincipalDep,
                model_id: str = Path(pattern=ID_PATTERN)) -> ModelOut:
    return service.patch_labels(session, who.scope, model_id, body.labels)


@lineage_routes.get("/models/{model_id}/jobs", response_model=Page[JobOut], responses=error_responses(NotFound),
                    summary="Jobs that took this model as input, newest first")
def model_jobs(session: SessionDep, who: PrincipalDep, model_id: str = Path(pattern=ID_PATTERN),
               cursor: CursorQuery = None, limit: LimitQuery = 50, label: LabelQuery = None):
    rows = jobs.list_of_model(session, who.scope, model_id, cursor=cursor, limit=limit,
                              label_filters=parse_filters(label))
    return Page[JobOut](items=[jobs.to_out(r) for r in rows], next_cursor=next_cursor(rows, limit))


router = APIRouter()
router.include_router(models_routes)
router.include_router(labels_routes)
router.include_router(lineage_routes)
