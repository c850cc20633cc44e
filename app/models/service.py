"""Models: uploads (inspect the received file, store it by content, record the row), reads, label patches, deletes.

One live row per owner and content: a repeated upload answers the row the owner already has (docs/api.md, "Repeated
uploads"). An upload commits in its own steps (store the file, then insert the row under the owner's storage lock);
`insert_uploaded` is shared with datasets. Everything else commits the request's work once, at its end
(app/core/services.py)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy.orm import Session

from app.core.db import owner_limit_lock
from app.core.errors import Conflict, NotFound, PayloadTooLarge, Unprocessable
from app.core.services import Services
from app.core.tables import ModelLabelRow, ModelRow
from app.core.uploads import ReceivedUpload, UploadQuota
from app.labels import service as labels
from app.models import repository as repo
from app.models.inspect import ModelRejected, inspect_model
from app.models.schemas import InspectionOut, ModelOut

T = TypeVar("T")
#: The response header of an upload answered with a record the owner already had (status 200 instead of 201).
EXISTING_HEADER = "X-Distillery-Existing"


def clean_name(raw: str | None, fallback: str) -> str:
    name = (raw or "").strip() or fallback
    if len(name) > 255:
        raise Unprocessable("name: at most 255 characters", code="validation_error", detail={"field": "name"})
    return name


def store_received(services: Services, received: ReceivedUpload) -> None:
    services.storage.commit_temp(received.temp_path, received.sha256)


class StorageLimit(PayloadTooLarge):
    code = "storage_limit"


def check_quota(services: Services, session: Session, owner: str, incoming: int) -> None:
    limit = services.settings.max_storage_bytes_per_owner
    used = repo.stored_bytes(session, owner)
    if used + incoming > limit:
        raise StorageLimit(f"owner {owner!r} stores {used} bytes; {incoming} more would pass the limit of {limit}",
                           detail={"limit": "max_storage_bytes_per_owner", "value": limit, "used": used,
                                   "incoming": incoming})


def upload_quota(services: Services, owner: str) -> UploadQuota:
    """The owner's storage quota for an upload as it streams (receive_upload(quota=...)): refused before the body is
    read when the owner is already at or over it, aborted as soon as stored + in-flight bytes pass it. The in-flight
    count is per API process; check_quota, when the row is inserted, stays authoritative across processes."""
    limit = services.settings.max_storage_bytes_per_owner

    def stored() -> int:
        with services.db.session() as session:
            return repo.stored_bytes(session, owner)

    def refuse(used: int, in_flight: int) -> StorageLimit:
        if used >= limit:
            message = f"owner {owner!r} stores {used} bytes, at or over the limit of {limit}; delete some first"
        else:
            message = (f"owner {owner!r} stores {used} bytes and is uploading {in_flight} more; that passes the "
                       f"limit of {limit}")
        return StorageLimit(message, detail={"limit": "max_storage_bytes_per_owner", "value": limit, "used": used,
                                             "in_flight": in_flight})

    return UploadQuota((services.settings.database_url, owner), limit, stored, refuse)


def forget_content(services: Services, session: Session, sha256: str) -> None:
    """Delete stored content that no row references any more (after a failed insert or a delete)."""
    if not repo.content_referenced(session, sha256):
        services.storage.delete(sha256)


def create_from_upload(services: Services, owner: str, received: ReceivedUpload) -> tuple[ModelOut, bool]:
    """(the model, created). Content this owner already holds as a live model of the same format is not stored
    again: the existing model comes back as it is (its name and labels are kept, whatever this upload's say) and
    `created` is False. The upload is still checked first (name, labels, inspection), so a file today's inspector
    refuses is a 422 even when an older copy of it exists."""
    try:
        name = clean_name(received.fields.get("name"), received.filename or "model")
        model_labels = labels.parse_form_field(received.fields.get("labels"))
        try:
            info = inspect_model(received.temp_path)
        except ModelRejected as exc:
            raise Unprocessable(exc.message, code=exc.code, detail=exc.detail) from None

        def existing(session: Session) -> ModelRow | None:
            return repo.live_with_content(session, owner, received.sha256, info.format)

        with services.db.session() as session:  # the common repeat, answered without storing anything
            found = existing(session)
            if found is not None:
                return to_out(found), False
        store_received(services, received)
    finally:
        received.temp_path.unlink(missing_ok=True)
    row = ModelRow(owner=owner, name=name, format=info.format, size_bytes=received.size_bytes,
                   sha256=received.sha256, info=info.to_dict())
    labels.replace(row, ModelLabelRow, model_labels)
    return insert_uploaded(services, row, existing, to_out)


def insert_uploaded(services: Services, row, existing: Callable[[Session], Any], out: Callable[[Any], T]
                    ) -> tuple[T, bool]:
    """Insert the row of stored upload content (model or dataset) within the owner's quota; on any failure the
    content is removed again unless another row uses it, so nothing is left half-written. Returns (out(row), True),
    or (out(that row), False) when `existing` finds the owner's row of the same content: under the owner's storage
    lock, which every upload of the owner takes to insert, so two concurrent uploads of one content make one row
    (the second sees the first's, committed), across API processes on PostgreSQL (an advisory lock) as in the one
    SQLite process. The quota is checked after that, so a repeat never counts against it."""
    with services.db.session() as session:
        try:
            with owner_limit_lock(session, row.owner, "storage"):
                found = existing(session)
                if found is not None:
                    return out(found), False
                check_quota(services, session, row.owner, row.size_bytes)
                repo.add(session, row)
                session.commit()
        except BaseException:
            session.rollback()
            forget_content(services, session, row.sha256)
            raise
        return out(row), True


def to_out(row: ModelRow) -> ModelOut:
    info = row.info or {}
    return ModelOut(id=row.id, name=row.name, format=row.format, size_bytes=row.size_bytes, sha256=row.sha256,
                    owner=row.owner, created_at=row.created_at,
                    inspection=InspectionOut(status="done", inputs=info.get("inputs", []),
                                             outputs=info.get("outputs", []), params=info.get("params"),
                                             details=info.get("details", {}),
                                             traced_inputs=info.get("traced_inputs", [])),
                    labels=labels.as_dict(row.label_rows), source_artifact_id=row.source_artifact_id)


def get(session: Session, owner: str | None, model_id: str) -> ModelRow:
    row = repo.get(session, owner, model_id)
    if row is None:
        raise NotFound(f"model {model_id} not found", code="model_not_found")
    return row


def list_page(session: Session, owner: str | None, cursor: str | None, limit: int,
              label_filters: list[tuple[str, str | None]], sha256: str | None) -> list[ModelRow]:
    return repo.list_page(session, owner, cursor, limit, labels=label_filters, sha256=sha256)


def patch_labels(session: Session, owner: str | None, model_id: str, patch: dict) -> ModelOut:
    """A JSON merge patch of the model's labels (null removes a key)."""
    row = get(session, owner, model_id)
    labels.replace(row, ModelLabelRow, labels.merge(labels.as_dict(row.label_rows), patch))
    session.commit()
    return to_out(row)


def delete(services: Services, session: Session, row: ModelRow, *, active_jobs: int) -> None:
    """Soft-delete a model and, when nothing else points at it, its stored content. `active_jobs` is the number of
    queued or running jobs that take the model as input or student (app/jobs/service.active_using_model): a model
    in use is a 409 `model_in_use`."""
    if active_jobs:
        raise Conflict(f"model {row.id} is used by {active_jobs} queued or running job(s); cancel them first",
                       code="model_in_use", detail={"active_jobs": active_jobs})
    repo.soft_delete(session, row)
    session.commit()
    forget_content(services, session, row.sha256)
