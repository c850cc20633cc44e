from __future__ import annotations

from fastapi import APIRouter, Path

from app.auth.deps import PrincipalDep
from app.core.deps import SessionDep
from app.core.errors import NotFound, Unprocessable, error_responses
from app.core.ids import ID_PATTERN
from app.jobs.schemas import JobOut
from app.labels import resources
from app.labels.schemas import LabelsPatch
from app.models.schemas import ModelOut

router = APIRouter(tags=["labels"])


@router.patch("/models/{model_id}", response_model=ModelOut, responses=error_responses(NotFound, Unprocessable),
              summary="Change a model's labels (JSON merge patch: null removes a key)")
def patch_model(body: LabelsPatch, session: SessionDep, who: PrincipalDep,
                model_id: str = Path(pattern=ID_PATTERN)) -> ModelOut:
    return resources.patch_model(session, who.scope, model_id, body.labels)


@router.patch("/jobs/{job_id}", response_model=JobOut, responses=error_responses(NotFound, Unprocessable),
              summary="Change a job's labels (JSON merge patch: null removes a key)")
def patch_job(body: LabelsPatch, session: SessionDep, who: PrincipalDep,
              job_id: str = Path(pattern=ID_PATTERN)) -> JobOut:
    return resources.patch_job(session, who.scope, job_id, body.labels)
