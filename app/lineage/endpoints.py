from __future__ import annotations

from fastapi import APIRouter, Path

from app.artifacts.service import ContentMissing
from app.auth.deps import PrincipalDep
from app.core.deps import ServicesDep, SessionDep
from app.core.errors import NotFound, PayloadTooLarge, Unprocessable, error_responses
from app.core.ids import ID_PATTERN
from app.labels import service as labels
from app.lineage import service
from app.lineage.schemas import LineageOut, ModelFromArtifact
from app.models.schemas import ModelOut

router = APIRouter(tags=["lineage"])


@router.post("/models/from-artifact", status_code=201, response_model=ModelOut,
             responses=error_responses(NotFound, ContentMissing, Unprocessable, PayloadTooLarge),
             summary="Make a model of an artifact (no copy, no download), e.g. to prune, then quantize")
def model_from_artifact(body: ModelFromArtifact, services: ServicesDep, session: SessionDep,
                        who: PrincipalDep) -> ModelOut:
    return service.make_model(services, session, who, body.artifact_id, name=body.name,
                              model_labels=labels.validate(body.labels))


@router.get("/artifacts/{artifact_id}/lineage", response_model=LineageOut, responses=error_responses(NotFound),
            summary="The chain artifact <- job <- input model <- ... back to the uploaded teacher")
def artifact_lineage(session: SessionDep, who: PrincipalDep,
                     artifact_id: str = Path(pattern=ID_PATTERN)) -> LineageOut:
    return service.lineage(session, who.scope, artifact_id)
