from __future__ import annotations

from fastapi import APIRouter, Path, Request, Response
from starlette.concurrency import run_in_threadpool

from app.auth.deps import PrincipalDep
from app.core.deps import ServicesDep, SessionDep
from app.core.errors import NotFound, PayloadTooLarge, Unprocessable, error_responses
from app.core.ids import ID_PATTERN
from app.core.pagination import CursorQuery, LimitQuery, next_cursor
from app.core.schemas import Page
from app.core.uploads import UnsupportedMediaType, UploadAborted, receive_upload
from app.datasets import service
from app.datasets.schemas import DatasetOut
from app.models.endpoints import Sha256Query, answer_upload, existing_response

router = APIRouter(tags=["datasets"])

MULTIPART_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"],
    "properties": {"file": {"type": "string", "format": "binary",
                            "description": ".npz: `x` (or one array per model input), optional `y`, "
                                           "optional `x_test`/`y_test`."},
                   "name": {"type": "string", "maxLength": 255}}}}}}}


@router.post("/datasets", status_code=201, response_model=DatasetOut, openapi_extra=MULTIPART_BODY,
             responses={**existing_response(DatasetOut, "sha256", "its name is kept"),
                        **error_responses(UploadAborted, PayloadTooLarge, UnsupportedMediaType, Unprocessable)},
             summary="Upload a dataset (.npz, validated without unpickling); a repeat answers the existing dataset")
async def upload_dataset(request: Request, response: Response, services: ServicesDep,
                         who: PrincipalDep) -> DatasetOut:
    received = await receive_upload(request, services.storage, max_bytes=services.settings.max_upload_bytes,
                                    quota=service.upload_quota(services, who.owner))
    dataset, created = await run_in_threadpool(service.create_from_upload, services, who.owner, received)
    answer_upload(response, created)
    return dataset


@router.get("/datasets", response_model=Page[DatasetOut])
def list_datasets(session: SessionDep, who: PrincipalDep, cursor: CursorQuery = None, limit: LimitQuery = 50,
                  sha256: Sha256Query = None):
    rows = service.list_page(session, who.scope, cursor, limit, sha256=sha256.lower() if sha256 else None)
    return Page[DatasetOut](items=[service.to_out(r) for r in rows], next_cursor=next_cursor(rows, limit))


@router.get("/datasets/{dataset_id}", response_model=DatasetOut, responses=error_responses(NotFound))
def get_dataset(session: SessionDep, who: PrincipalDep,
                dataset_id: str = Path(pattern=ID_PATTERN, description="A dataset id.")) -> DatasetOut:
    return service.to_out(service.get(session, who.scope, dataset_id))
