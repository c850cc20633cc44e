"""Jobs: create (validated, idempotent) and dispatch after commit, cancel, read, label patches (the moves:
app/jobs/lifecycle.py). Each write commits the request's work (app/core/services.py); submission commits the job
before it is sent to the broker."""
from __future__ import annotations

import hashlib
import logging

import orjson
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.auth.keys import Principal
from app.core.db import cutoff, owner_limit_lock, utcnow
from app.core.errors import Conflict, DistilleryError, NotFound, Unprocessable
from app.core.services import Services
from app.core.tables import JobEventRow, JobLabelRow, JobRow, ModelRow
from app.datasets import service as datasets
from app.jobs import admission, lifecycle, repository as repo
from app.jobs.schemas import JobCreate, JobError, JobOut
from app.jobs.states import JobStatus
from app.labels import service as labels
from app.lineage import service as lineage
from app.methods import MethodConfig, ModelStudent
from app.methods.datasets import builtin_name, dataset_ref
from app.models import service as models
from app.webhooks.policy import check_callback_url
from app.webhooks.schemas import webhook_out
from app.fleet import repository as workers_repo

log = logging.getLogger("distillery.jobs")


class TooManyJobs(DistilleryError):
    status_code = 429
    code = "concurrent_jobs_limit"


def request_digest(body: JobCreate) -> str:
    return hashlib.sha256(orjson.dumps(body.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)).hexdigest()


def to_out(row: JobRow) -> JobOut:
    return JobOut(
        id=row.id, kind=row.kind, status=row.status, model_id=row.model_id,
        dataset_id=dataset_ref(row.dataset_id, row.builtin_dataset),
        config=row.config, device_requested=row.device_requested, queue=row.queue, progress=row.progress,
        stage=row.stage,
        attempts=row.attempts, max_attempts=row.max_attempts,
        error=JobError(code=row.error_code, message=row.error_message or "") if row.error_code else None,
        metrics=row.metrics, artifact_id=row.artifact_id, worker=row.worker, device=row.device, owner=row.owner,
        created_at=row.created_at, started_at=row.started_at, finished_at=row.finished_at,
        updated_at=row.updated_at, labels=labels.as_dict(row.label_rows),
        webhook=webhook_out(row.callback_url, row.webhook_delivery) if row.callback_url else None)


def _check_dataset_fits(model_info: dict, dataset_info: dict) -> None:
    # a TorchScript model's inputs are known when it was traced (forward's argument names, as the worker feeds them)
    model_inputs = [i["name"] for i in model_info.get("inputs") or model_info.get("traced_inputs") or []]
    given = set(dataset_info.get("inputs", []))
    if len(model_inputs) == 1 and "x" in given:  # the worker feeds a single input from `x` first
        return
    missing = [n for n in model_inputs if n not in given]
    if missing:
        raise Unprocessable(
            f"the dataset has no array for model input(s) {missing}; name the arrays after the inputs "
            f"{model_inputs}" + (" or use 'x'" if len(model_inputs) == 1 else ""),
            code="dataset_mismatch", detail={"model_inputs": model_inputs, "dataset_inputs": sorted(given)})


def _check_labels_fit(model_info: dict, labels: int | None, dataset_name: str) -> None:
    """Labels are class indices into the model's output: a dataset whose largest label is not below the number of
    outputs would fail the job late (an index past the outputs when training, an accuracy that means nothing)."""
    classes = admission.output_classes(model_info)
    if classes is None or not isinstance(labels, int) or labels <= classes:
        return
    output = (model_info.get("outputs") or [{}])[0].get("name", "")
    raise Unprocessable(
        f"the labels of {dataset_name} go up to {labels - 1}, but the model's output {output!r} has {classes} "
        f"classes (labels must be 0..{classes - 1}); use a dataset whose labels index the model's outputs",
        code="labels_out_of_range",
        detail={"max_label": labels - 1, "num_outputs": classes, "output": output})


def _resolve_queue(session: Session, services: Services, device: str) -> str:
    if device == "cuda":
        return "gpu"
    if device == "cpu":
        return "cpu"
    live_gpu = workers_repo.live_on_queue(session, "gpu", cutoff(services.settings.worker_lost_after_s))
    return "gpu" if live_gpu else "cpu"


def create(services: Services, session: Session, who: Principal, body: JobCreate,
           idempotency_key: str | None) -> tuple[JobOut, bool]:
    """Returns (job, created). A repeated Idempotency-Key returns the first job; a different body is a 409.

    The job belongs to the caller; the models and dataset it names must be visible to the caller."""
    owner, scope = who.owner, who.scope
    digest = request_digest(body)
    if idempotency_key:
        existing = repo.get_by_idempotency_key(session, owner, idempotency_key)
        if existing is not None:
            return _replay(existing, digest), False
    job_labels = labels.validate(body.labels)
    callback_url = check_callback_url(body.callback_url, services.settings.webhook_allowed_hosts) \
        if body.callback_url is not None else None
    model = lineage.input_model(services, session, who, body.model_id, body.artifact_id)
    _check_formats(body.config, model.format)
    dataset_id, builtin = _resolve_dataset(session, scope, body, model)
    student_id = _student_model(session, scope, body)
    queue = _resolve_queue(session, services, body.device)
    admission.check_memory(session, services.settings, kind=body.kind, config=body.config, model=model,
                           dataset_id=dataset_id, builtin=builtin, queue=queue)
    admission.check_input_shapes(session, model=model, dataset_id=dataset_id, builtin=builtin, config=body.config)
    with owner_limit_lock(session, owner, "concurrent_jobs"):  # the count and the insert, one at a time per owner
        _check_concurrency(services, session, owner)
        row = JobRow(owner=owner, kind=body.kind, status=JobStatus.queued.value, model_id=model.id,
                     dataset_id=dataset_id, builtin_dataset=builtin, student_model_id=student_id,
                     config=body.config.model_dump(mode="json"),
                     device_requested=body.device, queue=queue, progress=0.0,
                     stage="queued" if queue == "cpu" else "queued for a GPU worker",
                     max_attempts=services.settings.max_attempts, idempotency_key=idempotency_key,
                     request_sha256=digest, dispatched_at=utcnow(), callback_url=callback_url)
        labels.replace(row, JobLabelRow, job_labels)
        repo.add(session, row)
        try:
            session.commit()
        except IntegrityError:
            session.rollback()
            existing = repo.get_by_idempotency_key(session, owner, idempotency_key) if idempotency_key else None
            if existing is None:
                raise
            return _replay(existing, digest), False
    if not lifecycle.dispatch(services.celery, session, row):
        session.commit()
    return to_out(row), True


def _resolve_dataset(session: Session, scope: str | None, body: JobCreate, model: ModelRow
                     ) -> tuple[str | None, str | None]:
    """(uploaded dataset id, built-in name); 422 when the job needs data and names none."""
    builtin = builtin_name(body.dataset_id)
    if builtin is not None:
        _check_labels_fit(model.info or {}, admission.BUILTIN_CLASSES, body.dataset_id)
        return None, builtin
    if body.dataset_id:
        dataset = datasets.get(session, scope, body.dataset_id)
        _check_dataset_fits(model.info or {}, dataset.info or {})
        _check_labels_fit(model.info or {}, (dataset.info or {}).get("num_classes"), f"dataset {dataset.id}")
        return dataset.id, None
    if body.config.needs_dataset:
        what = f"{body.kind}/{body.config.method_name}"
    elif getattr(body.config, "fine_tune", None) is not None:
        what = "fine_tune"
    elif model.format == "torchscript":
        what = "a TorchScript model (it declares no input shapes, so sample inputs come from the data)"
    else:
        return None, None
    raise Unprocessable(f"{what} needs a dataset_id (an uploaded .npz or builtin:mnist, builtin:fashion-mnist, "
                        "builtin:digits)", code="dataset_required", detail={"field": "dataset_id"})


def _check_formats(config: MethodConfig, model_format: str) -> None:
    what = f"{config.kind}/{config.method_name}"
    if model_format not in config.input_formats:
        raise Unprocessable(f"{what} does not support {model_format} models (supported: "
                            f"{sorted(config.input_formats)})", code="unsupported_model_format",
                            detail={"format": model_format, "supported": sorted(config.input_formats)})
    wanted = config.output_format
    if wanted is not None and wanted not in config.output_formats:
        raise Unprocessable(f"{what} cannot write {wanted} (it writes: {sorted(config.output_formats)})",
                            code="unsupported_output_format",
                            detail={"field": "config.output_format", "supported": sorted(config.output_formats)})


def _check_concurrency(services: Services, session: Session, owner: str) -> None:
    limit = services.settings.max_concurrent_jobs_per_owner
    active = repo.active_of_owner(session, owner)
    if active >= limit:
        raise TooManyJobs(f"owner {owner!r} has {active} queued or running jobs, the limit is {limit}; wait for "
                          "some to finish or cancel them", detail={"limit": "max_concurrent_jobs_per_owner",
                                                                   "value": limit, "active": active})


def _student_model(session: Session, owner: str | None, body: JobCreate) -> str | None:
    student = getattr(body.config, "student", None)
    if not isinstance(student, ModelStudent):
        return None
    row = models.get(session, owner, student.model_id)
    return row.id


def _replay(existing: JobRow, digest: str) -> JobOut:
    if existing.request_sha256 != digest:
        raise Conflict("this Idempotency-Key was used with a different request body", code="idempotency_key_reused",
                       detail={"job_id": existing.id})
    return to_out(existing)


def job_not_found(job_id: str) -> NotFound:
    return NotFound(f"job {job_id} not found", code="job_not_found")


def get(session: Session, owner: str | None, job_id: str) -> JobRow:
    row = repo.get(session, job_id, owner)
    if row is None:
        raise job_not_found(job_id)
    return row


def job_json(session: Session, job_id: str) -> bytes | None:
    """Any owner's job as `GET /v1/jobs/{id}` renders it (the body of its webhook), or None when it does not exist."""
    row = repo.get(session, job_id)
    return None if row is None else to_out(row).model_dump_json().encode()


def list_page(session: Session, owner: str | None, *, status: str | None, kind: str | None, model_id: str | None,
              cursor: str | None, limit: int, label_filters: list[tuple[str, str | None]]) -> list[JobRow]:
    return repo.list_page(session, owner, status=status, kind=kind, model_id=model_id, cursor=cursor, limit=limit,
                          labels=label_filters)


def list_of_model(session: Session, owner: str | None, model_id: str, *, cursor: str | None, limit: int,
                  label_filters: list[tuple[str, str | None]]) -> list[JobRow]:
    """Jobs that took the model as input, newest first (404 when the model is not the caller's)."""
    models.get(session, owner, model_id)  # 404 model_not_found unless it is the caller's
    return repo.list_page(session, owner, status=None, kind=None, model_id=model_id, cursor=cursor, limit=limit,
                          labels=label_filters)


def active_using_model(session: Session, model_id: str) -> int:
    """The queued or running jobs that take the model as input or as their student (a model in use is not deleted)."""
    return repo.active_using_model(session, model_id)


def events(session: Session, owner: str | None, job_id: str, after: int) -> tuple[str, list[JobEventRow]]:
    """The job's status and its events after sequence number `after` (404 unless it is the caller's)."""
    job = get(session, owner, job_id)
    return job.status, repo.events_after(session, job_id, after)


def cancel(session: Session, owner: str | None, job_id: str) -> JobOut:
    done = lifecycle.cancel(session, get(session, owner, job_id))
    session.commit()
    return to_out(done)


def patch_labels(session: Session, owner: str | None, job_id: str, patch: dict) -> JobOut:
    """A JSON merge patch of the job's labels (null removes a key)."""
    row = get(session, owner, job_id)
    labels.replace(row, JobLabelRow, labels.merge(labels.as_dict(row.label_rows), patch))
    session.commit()
    return to_out(row)
