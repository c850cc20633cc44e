from __future__ import annotations

from fastapi import APIRouter, Path, Request, Response
from starlette.concurrency import run_in_threadpool

from app.auth.deps import PrincipalDep
from app.core.deps import ServicesDep, SessionDep
from app.core.errors import Conflict, NotFound, PayloadTooLarge, Unprocessable, error_responses
from app.core.ids import ID_PATTERN
from app.core.pagination import CursorQuery, LimitQuery, next_cursor
from app.core.schemas import Page
from app.core.uploads import UnsupportedMediaType, UploadAborted, receive_upload
from app.labels.schemas import LabelQuery
from app.labels.service import parse_filters
from app.models import repository as repo
from app.models import service
from app.models.schemas import ModelOut

router = APIRouter(tags=["models"])
ModelId = Path(pattern=ID_PATTERN, description="A model id.")

MULTIPART_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"],
    "properties": {"file": {"type": "string", "format": "binary", "description": "ONNX or TorchScript file."},
                   "name": {"type": "string", "maxLength": 255},
                   "labels": {"type": "string", "description": 'A JSON object of labels, e.g. {"team": "search"}.'}}}}}}}


@router.post("/models", status_code=201, response_model=ModelOut, openapi_extra=MULTIPART_BODY,
             responses=error_responses(UploadAborted, PayloadTooLarge, UnsupportedMediaType, Unprocessable),
             summary="Upload a model (streamed, hashed, inspected)")
async def upload_model(request: Request, services: ServicesDep, who: PrincipalDep) -> ModelOut:
    received = await receive_upload(request, services.storage, max_bytes=services.settings.max_upload_bytes,
                                    quota=service.upload_quota(services, who.owner))
    return await run_in_threadpool(service.create_from_upload, services, who.owner, received)


@router.get("/models", response_model=Page[ModelOut])
def list_models(session: SessionDep, who: PrincipalDep, cursor: CursorQuery = None, limit: LimitQuery = 50,
                label: LabelQuery = None):
    rows = repo.list_page(session, who.scope, cursor, limit, labels=parse_filters(label))
    return Page[ModelOut](items=[service.to_out(r) for r in rows], next_cursor=next_cursor(rows, limit))


@router.get("/models/{model_id}", response_model=ModelOut, responses=error_responses(NotFound))
def get_model(session: SessionDep, who: PrincipalDep, model_id: str = ModelId) -> ModelOut:
    return service.to_out(service.get(session, who.scope, model_id))


@router.delete("/models/{model_id}", status_code=204, responses=error_responses(NotFound, Conflict))
def delete_model(services: ServicesDep, session: SessionDep, who: PrincipalDep, model_id: str = ModelId) -> Response:
    service.delete(services, session, who.scope, model_id)
    return Response(status_code=204)
