"""`GET /v1/jobs/{id}` served below FastAPI's routing, for the clients that poll job status many times a second.

An ASGI middleware in front of the router. It answers the plain case only: a PostgreSQL deployment (where
`JobReader` reads the job as JSON text), a well-formed id, no query string, and a caller known without a database
query (open mode, or an API key verified within `auth_cache_s`) who is under the rate limit. It answers 200 with
the reader's bytes, the route's own 404, or the route's 503 when the database is unreachable; everything else goes
on to the route, which decides and phrases every refusal. It skips the router's path matching, the dependency
solving, the exception layers and the request object (docs/benchmarks.md measures what that saves). The OpenAPI
spec still describes the route; a test checks both answer the same bytes.
"""
from __future__ import annotations

import logging
import re

import psycopg
from psycopg_pool import PoolTimeout

from app.auth.deps import known_principal
from app.core.errors import database_unavailable_response, error_response
from app.jobs.service import job_not_found

log = logging.getLogger("distillery.api")

_PATH = re.compile(r"/v1/jobs/([0-9a-f]{32})")


class JobPollFastPath:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and not scope.get("query_string"):
            match = _PATH.fullmatch(scope["path"])
            if match is not None and await self._serve(scope, receive, send, match.group(1)):
                return
        await self.app(scope, receive, send)

    async def _serve(self, scope, receive, send, job_id: str) -> bool:
        """True when it answered; False leaves the request to the route (nothing has been sent)."""
        services = getattr(scope["app"].state, "services", None)
        if services is None or services.job_reader is None:
            return False
        header = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                header = value.decode("latin-1")
                break
        principal = known_principal(services, header)
        if principal is None or services.rate_limiter.take(principal.owner) > 0:
            return False
        try:
            body = await services.job_reader.job_json(principal.scope, job_id)
        except (psycopg.OperationalError, PoolTimeout) as exc:  # answered here: the request's token is spent
            log.warning("database unavailable: %s", exc)
            await database_unavailable_response()(scope, receive, send)
            return True
        if body is None:
            await error_response(job_not_found(job_id))(scope, receive, send)
            return True
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})
        return True
