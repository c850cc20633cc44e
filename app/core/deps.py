"""Shared services and typed dependency aliases for the routes."""
from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

from celery import Celery
from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.core.broker import make_celery
from app.core.config import Settings
from app.core.db import Database
from app.core.storage import Storage, make_storage

if TYPE_CHECKING:
    from app.auth.deps import RateLimiter
    from app.auth.keys import KeyVerifier
    from app.jobs.fastread import JobReader


@dataclass
class Services:
    settings: Settings
    db: Database
    storage: Storage
    celery: Celery
    keys: "KeyVerifier"
    rate_limiter: "RateLimiter"
    job_reader: "JobReader | None" = None
    #: bounds the job submissions this process runs at once (`api_submit_concurrency`); made in the event loop
    submit_gate: asyncio.Semaphore | None = field(default=None, repr=False)

    @classmethod
    def build(cls, settings: Settings) -> "Services":
        reader = None
        if settings.database_url.startswith("postgresql"):
            from app.jobs.fastread import JobReader

            reader = JobReader(settings.database_url)
        from app.auth.deps import RateLimiter
        from app.auth.keys import KeyVerifier

        return cls(settings, Database(settings), make_storage(settings), make_celery(settings),
                   KeyVerifier(settings.auth_cache_s), RateLimiter(settings.rate_limit_per_minute), reader)

    async def open(self) -> None:
        self.submit_gate = asyncio.Semaphore(self.settings.api_submit_concurrency)
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

