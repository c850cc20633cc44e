"""Shared services and typed dependency aliases for the routes."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from celery import Celery
from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.core.broker import make_celery
from app.core.config import Settings
from app.core.db import Database
from app.core.storage import LocalStorage, make_storage

if TYPE_CHECKING:
    from app.jobs.fastread import JobReader


@dataclass
class Services:
    settings: Settings
    db: Database
    storage: LocalStorage
    celery: Celery
    job_reader: "JobReader | None" = None

    @classmethod
    def build(cls, settings: Settings) -> "Services":
        reader = None
        if settings.database_url.startswith("postgresql"):
            from app.jobs.fastread import JobReader

            reader = JobReader(settings.database_url)
        return cls(settings, Database(settings), make_storage(settings), make_celery(settings), reader)

    async def open(self) -> None:
        if self.job_reader is not None:
            await self.job_reader.open()

    async def close(self) -> None:
        if self.job_reader is not None:
            await self.job_reader.close()
        self.db.dispose()


async def get_services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


def get_session(services: ServicesDep) -> Iterator[Session]:
    with services.db.session() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


async def current_owner(services: ServicesDep) -> str:
    """One default owner until API keys arrive (every row already carries its owner)."""
    return services.settings.default_owner


OwnerDep = Annotated[str, Depends(current_owner)]
