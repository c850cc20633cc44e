"""Datasets: uploads (validated without unpickling, stored by content, one row per owner and content, as models:
the upload steps are app/models/service.py's) and reads."""
from __future__ import annotations

from sqlalchemy.orm import Session

from app.core.errors import NotFound, Unprocessable
from app.core.services import Services
from app.core.tables import DatasetRow
from app.core.uploads import ReceivedUpload
from app.datasets import repository as repo
from app.datasets.schemas import DatasetOut
from app.datasets.validate import DatasetRejected, validate_npz
from app.models.service import clean_name, insert_uploaded, store_received, upload_quota  # noqa: F401 (the route's)


def create_from_upload(services: Services, owner: str, received: ReceivedUpload) -> tuple[DatasetOut, bool]:
    """(the dataset, created). Content this owner already holds as a dataset is not stored again: the existing
    dataset comes back as it is (its name is kept) and `created` is False (as for models: models.service)."""
    try:
        name = clean_name(received.fields.get("name"), received.filename or "dataset")
        try:
            info = validate_npz(received.temp_path, services.settings.max_dataset_array_bytes)
        except DatasetRejected as exc:
            raise Unprocessable(exc.message, code=exc.code, detail=exc.detail) from None

        def existing(session: Session) -> DatasetRow | None:
            return repo.with_content(session, owner, received.sha256)

        with services.db.session() as session:
            found = existing(session)
            if found is not None:
                return to_out(found), False
        store_received(services, received)
    finally:
        received.temp_path.unlink(missing_ok=True)
    row = DatasetRow(owner=owner, name=name, size_bytes=received.size_bytes, sha256=received.sha256, info=info)
    return insert_uploaded(services, row, existing, to_out)


def to_out(row: DatasetRow) -> DatasetOut:
    return DatasetOut(id=row.id, name=row.name, size_bytes=row.size_bytes, sha256=row.sha256, owner=row.owner,
                      created_at=row.created_at, **row.info)


def get(session: Session, owner: str | None, dataset_id: str) -> DatasetRow:
    row = repo.get(session, owner, dataset_id)
    if row is None:
        raise NotFound(f"dataset {dataset_id} not found", code="dataset_not_found")
    return row


def list_page(session: Session, owner: str | None, cursor: str | None, limit: int,
              sha256: str | None = None) -> list[DatasetRow]:
    return repo.list_page(session, owner, cursor, limit, sha256=sha256)


