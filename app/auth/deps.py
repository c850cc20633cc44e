"""Who is calling: an API key (Bearer), or the default owner in open mode; plus the per-owner request rate."""
from __future__ import annotations

import threading
import time
from typing import Annotated

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from app.auth.keys import Principal
from app.core.deps import ServicesDep
from app.core.errors import DistilleryError


class Unauthorized(DistilleryError):
    status_code = 401
    code = "unauthorized"


class TooManyRequests(DistilleryError):
    status_code = 429
    code = "rate_limited"


class RateLimiter:
    """A token bucket per owner, in this API process: `per_minute` requests, bursts up to the same number."""

    def __init__(self, per_minute: int):
        self.rate = per_minute / 60.0
        self.capacity = float(per_minute)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, owner: str) -> float:
        """0 when allowed, else the seconds until a request would be."""
        now = time.monotonic()
        with self._lock:
            tokens, at = self._buckets.get(owner, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - at) * self.rate)
            if tokens >= 1.0:
                self._buckets[owner] = (tokens - 1.0, now)
                return 0.0
            self._buckets[owner] = (tokens, now)
            return (1.0 - tokens) / self.rate


def _bearer_token(header: str) -> str | None:
    """The key of an `Authorization: Bearer <key>` header; None when the header is not of that form."""
    scheme, _, token = header.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def known_principal(services, header: str | None) -> Principal | None:
    """The caller when it is known without a database query: open mode without a header, or a well-formed Bearer key
    verified (and valid) within `auth_cache_s`. None otherwise; `current_principal` then decides and explains."""
    if header is None:
        return Principal(services.settings.default_owner) if services.settings.auth == "open" else None
    token = _bearer_token(header)
    if token is None or not services.keys.is_cached(token):
        return None
    return services.keys.verify(None, token)


async def current_principal(request: Request, services: ServicesDep) -> Principal:
    settings = services.settings
    header = request.headers.get("authorization")
    principal = known_principal(services, header)
    if principal is None:
        principal = await _verified_or_refused(services, header)
    wait = services.rate_limiter.take(principal.owner)
    if wait > 0:
        raise TooManyRequests(f"owner {principal.owner!r} is over the limit of {settings.rate_limit_per_minute} "
                              "requests per minute", detail={"limit": "rate_limit_per_minute",
                                                             "value": settings.rate_limit_per_minute,
                                                             "retry_after_s": round(wait, 2)})
    return principal


async def _verified_or_refused(services, header: str | None) -> Principal:
    """The caller of a request whose key is not in the cache (one query, off the event loop), or a 401 saying why."""
    if header is None:
        raise Unauthorized("this server needs an API key: send 'Authorization: Bearer <key>' "
                           "(keys come from `distillery keys create --owner NAME`)")
    token = _bearer_token(header)
    if token is None:
        raise Unauthorized("send the API key as 'Authorization: Bearer <key>'")
    principal = await run_in_threadpool(services.keys.verify, services.db.sessionmaker, token)
    if principal is None:
        raise Unauthorized("the API key is invalid or revoked")
    return principal


PrincipalDep = Annotated[Principal, Depends(current_principal)]
