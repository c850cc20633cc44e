"""Error hierarchy. Services raise these; one handler renders them as {"error": {code, message, detail}}."""
from __future__ import annotations

import math
from typing import Any


class DistilleryError(Exception):
    status_code = 400
    code = "bad_request"

    def __init__(self, message: str, *, code: str | None = None, detail: dict[str, Any] | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        self.detail = detail or {}
        self.headers = headers or {}  # e.g. Retry-After on a 429


class TooManyRequests(DistilleryError):
    """429 with Retry-After (whole seconds, at least 1)."""

    status_code = 429
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: float, code: str | None = None,
                 detail: dict[str, Any] | None = None):
        retry = max(1, math.ceil(retry_after_s))
        super().__init__(message, code=code, detail={**(detail or {}), "retry_after_s": retry},
                         headers={"Retry-After": str(retry)})


class NotFound(DistilleryError):
    status_code = 404
    code = "not_found"


class Conflict(DistilleryError):
    status_code = 409
    code = "conflict"


class InvalidTransition(Conflict):
    code = "invalid_transition"


class PayloadTooLarge(DistilleryError):
    status_code = 413
    code = "payload_too_large"


class Unprocessable(DistilleryError):
    status_code = 422
    code = "unprocessable"


def error_body(code: str, message: str, detail: Any = None) -> dict:
    return {"error": {"code": code, "message": message, "detail": detail if detail is not None else {}}}


def error_response(exc: DistilleryError):
    """The JSON response of a domain error (the app's handler, and the poll fast path below the router)."""
    from fastapi.responses import JSONResponse

    return JSONResponse(error_body(exc.code, exc.message, exc.detail), status_code=exc.status_code,
                        headers=exc.headers or None)


def database_unavailable_response():
    """The 503 of every request that found the database unreachable (the route handlers' and the poll fast path's)."""
    from fastapi.responses import JSONResponse

    return JSONResponse(error_body("database_unavailable", "the database is unavailable; retry shortly"),
                        status_code=503, headers={"Retry-After": "2"})


def error_responses(*errors: type[DistilleryError]) -> dict:
    """OpenAPI `responses=` entries for the errors an endpoint may raise."""
    from app.core.schemas import ErrorResponse

    out: dict[int, dict] = {}
    for err in errors:
        out.setdefault(err.status_code, {"model": ErrorResponse, "description": err.code})
    return out
