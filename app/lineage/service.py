"""Lineage: artifacts as input models (no copy, no download), and an artifact's chain back to the uploaded teacher.

A model made from an artifact is a row pointing at the artifact's stored file (same sha256) with
`source_artifact_id` set; it is inspected like an upload. Storage quota: its bytes are counted once, as the
artifact's (see app/models/repository.stored_bytes).
"""
from __future__ import annotations

from sqlalchemy.orm import Session

from app.artifacts import repository as artifacts_repo
from app.artifacts import service as artifacts
from app.auth.keys import Principal
from app.core.errors import Unprocessable
from app.core.services import Services
from app.core.tables import JobRow, ModelLabelRow, ModelRow
from app.labels import service as labels
from app.lineage import repository as repo
from app.lineage.schemas import LineageJob, LineageOut, LineageStep
from app.methods import default_method
from app.methods.datasets import dataset_ref
from app.models import repository as models_repo
from app.models import service as models
from app.models.inspect import ModelRejected, inspect_model
from app.models.schemas import ModelOut

MAX_DEPTH = 64


class InputModelRequired(Unprocessable):
    code = "input_model_required"


def model_from_artifact(services: Services, session: Session, who: Principal, artifact_id: str, *,
                        name: str | None = None, model_labels: dict[str, str] | None = None) -> ModelRow:
    """A new model row on the artifact's stored content, added in the caller's transaction (a job's submission, or
    `make_model`)."""
    art = artifacts.get(session, who.scope, artifact_id)
    artifacts.check_content(services.storage, art)
    try:  # produced by our own worker, but it goes through the same inspector as an upload
        info = inspect_model(services.storage.local_path(art.sha256))
    except ModelRejected as exc:
        raise Unprocessable(f"artifact {art.id} cannot be used as a model: {exc.message}", code=exc.code,
                            detail={**exc.detail, "artifact_id": art.id}) from None
    if info.format != art.format:
        raise Unprocessable(f"artifact {art.id} is recorded as {art.format} but its content is {info.format}",
                            code="artifact_format_mismatch", detail={"artifact_id": art.id})
    row = ModelRow(owner=who.owner, name=models.clean_name(name, art.filename), format=info.format,
                   size_bytes=art.size_bytes, sha256=art.sha256, info=info.to_dict(), source_artifact_id=art.id)
    labels.replace(row, ModelLabelRow, model_labels or {})
    models_repo.add(session, row)
    return row


def make_model(services: Services, session: Session, who: Principal, artifact_id: str, *, name: str | None,
               model_labels: dict[str, str]) -> ModelOut:
    """`POST /v1/models/from-artifact`: a model of the artifact, committed."""
    row = model_from_artifact(services, session, who, artifact_id, name=name, model_labels=model_labels)
    session.commit()
    return models.to_out(row)


def input_model(services: Services, session: Session, who: Principal, model_id: str | None,
                artifact_id: str | None) -> ModelRow:
    """The input model of a job given `model_id` or `artifact_id` (exactly one). For an artifact, the caller's
    live model made from it is reused, else one is made in the job's transaction."""
    if (model_id is None) == (artifact_id is None):
        raise InputModelRequired("give exactly one of model_id and artifact_id",
                                 detail={"fields": ["model_id", "artifact_id"]})
    if model_id is not None:
        return models.get(session, who.scope, model_id)
    existing = models_repo.live_from_artifact(session, who.owner, artifact_id)
    if existing is not None:
        artifacts.get(session, who.scope, artifact_id)  # still visible to the caller
        return existing
    return model_from_artifact(services, session, who, artifact_id)


def _scoped(row, scope: str | None):
    return row if row is not None and (scope is None or row.owner == scope) else None


def _job_out(job: JobRow) -> LineageJob:
    # a job stored before its kind's config named the method (distill) shows the kind's default
    method = (job.config or {}).get("method") or default_method(job.kind) or job.kind
    return LineageJob(id=job.id, kind=job.kind, method=method, status=job.status,
                      config=job.config or {}, labels=labels.as_dict(job.label_rows),
                      dataset_id=dataset_ref(job.dataset_id, job.builtin_dataset),
                      created_at=job.created_at, finished_at=job.finished_at)


def lineage(session: Session, scope: str | None, artifact_id: str) -> LineageOut:
    """artifact <- job <- input model <- (the model's source artifact) <- job <- ... <- the uploaded teacher.
    Soft-deleted models still appear (the chain is history); every link must be visible to the caller."""
    art = artifacts.get(session, scope, artifact_id)
    steps: list[LineageStep] = []
    seen = {art.id}
    while len(steps) < MAX_DEPTH:
        job = _scoped(repo.job(session, art.job_id), scope)
        model = _scoped(models_repo.by_id(session, job.model_id), scope) if job is not None else None
        if job is None or model is None:
            break
        steps.append(LineageStep(artifact=artifacts.to_out(art), job=_job_out(job),
                                 input_model=models.to_out(model)))
        if model.source_artifact_id is None:
            return LineageOut(artifact_id=artifact_id, steps=steps, teacher=models.to_out(model), complete=True)
        nxt = _scoped(artifacts_repo.by_id(session, model.source_artifact_id), scope)
        if nxt is None or nxt.id in seen:
            break
        seen.add(nxt.id)
        art = nxt
    return LineageOut(artifact_id=artifact_id, steps=steps, teacher=None, complete=False)

