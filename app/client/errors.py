"""Exceptions of the SDK. Every one carries the API's error `code`, `message` and `detail` where there was an answer."""
from __future__ import annotations

from typing import Any


class DistilleryError(Exception):
    """Base of every SDK error: `code` (the API's error code, or an SDK one), `message`, `status_code`, `detail`."""

    code = "error"

    def __init__(self, message: str, *, code: str | None = None, status_code: int | None = None,
                 detail: Any = None):
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        self.status_code = status_code
        self.detail = detail if detail is not None else {}

    def __str__(self) -> str:
        status = f" (HTTP {self.status_code})" if self.status_code else ""
        return f"{self.code}: {self.message}{status}"


class ApiError(DistilleryError):
    """The API refused the request (a 4xx answer): bad input, unknown id, conflict, quota, auth."""

    code = "api_error"


class BadRequest(ApiError):
    code = "bad_request"


class Unauthorized(ApiError):
    """401 (no or bad API key) and 403."""

    code = "unauthorized"


class NotFound(ApiError):
    code = "not_found"


class Conflict(ApiError):
    """409: model_in_use, invalid_transition, idempotency_key_reused."""

    code = "conflict"


class PayloadTooLarge(ApiError):
    code = "payload_too_large"


class ValidationError(ApiError):
    """422: `detail["errors"]` lists `{field, message, type}`."""

    code = "validation_error"


class RateLimited(ApiError):
    """429: too many requests, jobs or bytes for this owner; `retry_after` in seconds when the API said."""

    code = "rate_limited"

    def __init__(self, *args, retry_after: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.retry_after = retry_after


class ServiceUnavailable(DistilleryError):
    """The service could not be reached (connection error) or answered 503, after the bounded retries."""

    code = "service_unavailable"


class ConnectionFailed(ServiceUnavailable):
    code = "connection_error"


class ServerError(DistilleryError):
    """An unexpected 5xx other than 503 (the API reports these as `internal_error`); not retried."""

    code = "internal_error"


class JobFailed(DistilleryError):
    """A waited-for job ended `failed` or `cancelled`; `job` is the final job, `code` its error code."""

    code = "job_failed"

    def __init__(self, job: Any):
        err = getattr(job, "error", None)
        code = err.code if err is not None else ("cancelled" if job.status == "cancelled" else "job_failed")
        message = err.message if err is not None else f"job {job.id} ended {job.status}"
        super().__init__(f"job {job.id} {job.status}: {message}", code=code)
        self.job = job


class WaitTimeout(DistilleryError, TimeoutError):
    """`wait(timeout=...)` ran out before the job ended (the job itself goes on)."""

    code = "wait_timeout"


class DownloadError(DistilleryError):
    """A download did not match the artifact's size or sha256 even after starting over."""

    code = "download_corrupt"


_BY_STATUS: dict[int, type[ApiError]] = {400: BadRequest, 401: Unauthorized, 403: Unauthorized, 404: NotFound,
                                         409: Conflict, 413: PayloadTooLarge, 422: ValidationError, 429: RateLimited}


def error_for(status_code: int, body: Any, headers: Any = None) -> DistilleryError:
    """The exception for an error answer, from its `{"error": {code, message, detail}}` body (or the bare status)."""
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict) and isinstance(err.get("code"), str):
        code, message, detail = err["code"], str(err.get("message") or err["code"]), err.get("detail")
    else:
        code, message, detail = None, f"HTTP {status_code}", {"body": body} if body else None
    if status_code == 503:
        return ServiceUnavailable(message, code=code or "service_unavailable", status_code=503, detail=detail)
    if status_code >= 500:
        return ServerError(message, code=code or "internal_error", status_code=status_code, detail=detail)
    cls = _BY_STATUS.get(status_code, ApiError)
    if cls is RateLimited:
        retry = headers.get("retry-after") if headers is not None else None
        try:
            retry_after = float(retry) if retry is not None else None
        except ValueError:
            retry_after = None
        return RateLimited(message, code=code, status_code=status_code, detail=detail, retry_after=retry_after)
    return cls(message, code=code, status_code=status_code, detail=detail)
