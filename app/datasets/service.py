from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.deps import Services
from app.core.errors import NotFound, Unprocessable
from app.core.tables import DatasetRow
from app.core.uploads import ReceivedUpload
from app.datasets.schemas import DatasetOut
from app.datasets.validate import DatasetRejected, validate_npz
from app.models.repository import owned
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
            return with_content(session, owner, received.sha256)

        with services.db.session() as session:
            found = existing(session)
            if found is not None:
                return to_out(found), False
        store_received(services, received)
    finally:
        received.temp_path.unlink(missing_ok=True)
    row = DatasetRow(owner=owner, name=name, size_bytes=received.size_bytes, sha256=received.sha256, info=info)
    return insert_uploaded(services, row, existing, to_out)


def with_content(session: Session, owner: str, sha256: str) -> DatasetRow | None:
    """The owner's oldest dataset of this content."""
    stmt = select(DatasetRow).where(DatasetRow.owner == owner, DatasetRow.sha256 == sha256)
    return session.scalars(stmt.order_by(DatasetRow.id).limit(1)).first()


def to_out(row: DatasetRow) -> DatasetOut:
    return DatasetOut(id=row.id, name=row.name, size_bytes=row.size_bytes, sha256=row.sha256, owner=row.owner,
                      created_at=row.created_at, **row.info)


def get(session: Session, owner: str | None, dataset_id: str) -> DatasetRow:
    row = session.scalars(owned(select(DatasetRow).where(DatasetRow.id == dataset_id), DatasetRow.owner,
                                owner)).one_or_none()
    if row is None:
        raise NotFound(f"dataset {dataset_id} not found", code="dataset_not_found")
    return row


def list_page(session: Session, owner: str | None, cursor: str | None, limit: int,
              sha256: str | None = None) -> list[DatasetRow]:
    stmt = owned(select(DatasetRow), DatasetRow.owner, owner)
    if sha256 is not None:
        stmt = stmt.where(DatasetRow.sha256 == sha256)
    if cursor:
        stmt = stmt.where(DatasetRow.id < cursor)
    return list(session.scalars(stmt.order_by(DatasetRow.id.desc()).limit(limit)))
