from __future__ import annotations

from fastapi import APIRouter, Path

from app.artifacts.service import ContentMissing
from app.auth.deps import PrincipalDep
from app.core.deps import ServicesDep, SessionDep
from app.core.errors import NotFound, PayloadTooLarge, Unprocessable, error_responses
from app.core.ids import ID_PATTERN
from app.core.pagination import CursorQuery, LimitQuery, next_cursor
from app.core.schemas import Page
from app.jobs.schemas import JobOut
from app.labels import service as labels
from app.labels.schemas import LabelQuery
from app.lineage import service
from app.lineage.schemas import LineageOut, ModelFromArtifact
from app.models import service as models
from app.models.schemas import ModelOut

router = APIRouter(tags=["lineage"])


@router.post("/models/from-artifact", status_code=201, response_model=ModelOut,
             responses=error_responses(NotFound, ContentMissing, Unprocessable, PayloadTooLarge),
             summary="Make a model of an artifact (no copy, no download), e.g. to prune, then quantize")
def model_from_artifact(body: ModelFromArtifact, services: ServicesDep, session: SessionDep,
                        who: PrincipalDep) -> ModelOut:
    row = service.model_from_artifact(services, session, who, body.artifact_id, name=body.name,
                                      model_labels=labels.validate(body.labels))
    session.commit()
    return models.to_out(row)


@router.get("/models/{model_id}/jobs", response_model=Page[JobOut], responses=error_responses(NotFound),
            summary="Jobs that took this model as input, newest first")
def model_jobs(session: SessionDep, who: PrincipalDep, model_id: str = Path(pattern=ID_PATTERN),
               cursor: CursorQuery = None, limit: LimitQuery = 50, label: LabelQuery = None):
    from app.jobs.service import to_out

    rows = service.model_jobs(session, who.scope, model_id, cursor=cursor, limit=limit,
                              label_filters=labels.parse_filters(label))
    return Page[JobOut](items=[to_out(r) for r in rows], next_cursor=next_cursor(rows, limit))


@router.get("/artifacts/{artifact_id}/lineage", response_model=LineageOut, responses=error_responses(NotFound),
            summary="The chain artifact <- job <- input model <- ... back to the uploaded teacher")
def artifact_lineage(session: SessionDep, who: PrincipalDep,
                     artifact_id: str = Path(pattern=ID_PATTERN)) -> LineageOut:
    return service.lineage(session, who.scope, artifact_id)
