"""The shared services of one API process, and the one rule for who commits.

`Services` holds what every request may use: the settings, the database, the object store, the broker, the API-key
cache, the request rate limit and (on PostgreSQL) the poll reader. `app/main.py` builds it at start-up and the routes
get it through `app/core/deps.py`. This module imports neither FastAPI nor any domain: the domain services import
`Services` from here, and the parts a domain provides (the key cache, the rate limit, the poll reader) are described
by the small protocols below.

Who commits. In the API a request is one unit of work, and the domain service that carries out a write commits it:
a `service.py` function that changes data calls `session.commit()` once, when the request's work is done. Routes
(`endpoints.py`) and repositories (`repository.py`) never commit or roll back; repositories add, update and flush in
the caller's transaction. The session itself is the request's (`SessionDep`, or one opened by the route when the
work runs on a worker thread), closed when the request ends. Two flows commit in steps, because something outside
the database happens in between:
  - submitting a job (`app/jobs/service.create`) commits the job, then sends it to the broker (a worker may claim it
    the moment the message arrives), and commits again only to record a send that failed;
  - an upload stores the received file first, then inserts its row in a transaction of its own under the owner's
    storage lock, and removes the file again if that insert fails (`app/models/service.insert_uploaded`, shared by
    datasets); the storage quota is also read in a short session of its own while the file streams in.
In the worker the unit of work is the task's step: the supervisor and the reaper (`worker/`) open a session per step,
call the job lifecycle (`app/jobs/lifecycle.py`, which never commits) and commit; the webhook deliverer commits each
claim and each recorded attempt.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from celery import Celery

from app.core.config import Settings
from app.core.db import Database
from app.core.storage import Storage


class KeyCache(Protocol):
    """Verifies API keys and remembers the verified ones (app/auth/keys.KeyVerifier)."""

    def cached(self, token: str) -> Any: ...

    def verify(self, session_factory: Callable, token: str) -> Any: ...


class RequestLimit(Protocol):
    """The per-owner request rate of this process (app/auth/deps.RateLimiter): 0, or the seconds to wait."""

    def take(self, owner: str) -> float: ...


class JobJsonReader(Protocol):
    """The status-polling read of a job as JSON bytes (app/jobs/poll_reader.JobReader)."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def job_json(self, owner: str | None, job_id: str) -> bytes | None: ...


@dataclass
class Services:
    settings: Settings
    db: Database
    storage: Storage
    celery: Celery
    keys: KeyCache
    rate_limiter: RequestLimit
    job_reader: JobJsonReader | None = None
    #: bounds the job submissions this process runs at once (`api_submit_concurrency`); made in the event loop
    submit_gate: asyncio.Semaphore | None = field(default=None, repr=False)

    async def open(self) -> None:
        self.submit_gate = asyncio.Semaphore(self.settings.api_submit_concurrency)
        if self.job_reader is not None:
            await self.job_reader.open()

    async def close(self) -> None:
        if self.job_reader is not None:
            await self.job_reader.close()
        self.db.dispose()
