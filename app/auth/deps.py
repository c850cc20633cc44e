"""Who is calling: an API key (Bearer), or the default owner in open mode; plus the per-owner request rate."""
from __future__ import annotations

import threading
import time
from typing import Annotated

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from app.auth.keys import KEY_RE, Principal
from app.auth.throttle import client_address, guards
from app.core.deps import ServicesDep
from app.core.errors import DistilleryError, TooManyRequests
from app.core.openapi import answers
from app.core.services import Services


class Unauthorized(DistilleryError):
    status_code = 401
    code = "unauthorized"


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


def known_principal(services: Services, header: str | None) -> Principal | None:
    """The caller when it is known without a database query: open mode without a header, or a well-formed Bearer key
    verified (and valid) within `auth_cache_s`. None otherwise; `current_principal` then decides and explains. The
    poll fast path (app/jobs/poll_middleware.py) answers only whom this knows and leaves everyone else to the route, so a
    key that needs a query always meets the failed-attempt limit below first."""
    if header is None:
        return Principal(services.settings.default_owner) if services.settings.auth == "open" else None
    token = _bearer_token(header)
    return None if token is None else services.keys.cached(token)


@answers(401, 429)  # no key or a bad one; over the owner's request rate or the address's failed-key budget
async def current_principal(request: Request, services: ServicesDep) -> Principal:
    settings = services.settings
    header = request.headers.get("authorization")
    principal = known_principal(services, header)
    if principal is None:
        principal = await _verified_or_refused(services, header, client_address(request.scope))
    wait = services.rate_limiter.take(principal.owner)
    if wait > 0:
        raise TooManyRequests(f"owner {principal.owner!r} is over the limit of {settings.rate_limit_per_minute} "
                              "requests per minute", retry_after_s=wait,
                              detail={"limit": "rate_limit_per_minute", "value": settings.rate_limit_per_minute})
    return principal


async def _verified_or_refused(services: Services, header: str | None, address: str) -> Principal:
    """The caller of a request whose key is not in the cache (one query, off the event loop), or a 401 saying why.
    A well-formed key is a query, so it first takes a token of its address's failed-attempt budget (429 when there is
    none); the token comes back unless the key fails."""
    if header is None:
        raise Unauthorized("this server needs an API key: send 'Authorization: Bearer <key>' "
                           "(keys come from `distillery keys create --owner NAME`)")
    token = _bearer_token(header)
    if token is None:
        raise Unauthorized("send the API key as 'Authorization: Bearer <key>'")
    if not KEY_RE.match(token):
        raise Unauthorized("the API key is invalid or revoked")  # not a key's shape: refused without a query
    failed_keys = guards(services).failed_keys
    bucket, wait = failed_keys.take(address)
    if bucket is None:
        raise failed_keys.refusal(wait)
    try:
        principal = await run_in_threadpool(services.keys.verify, services.db.sessionmaker, token)
    except Exception:  # the database could not say (a 503 follows): not a failed attempt
        failed_keys.refund(bucket)
        raise
    if principal is None:  # the token stays spent
        raise Unauthorized("the API key is invalid or revoked")
    failed_keys.refund(bucket)
    return principal


PrincipalDep = Annotated[Principal, Depends(current_principal)]
