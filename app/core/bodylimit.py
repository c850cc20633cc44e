"""A bound on request bodies that are not file uploads (JSON job specs, label patches).

Multipart uploads bound themselves as they stream (app/core/uploads.py: the file by `max_upload_bytes`, the form's
parts, headers and text fields by small constants, the whole body by `max_upload_bytes` + FORM_ALLOWANCE, with or
without a Content-Length), so this middleware lets them through. Every other body is read into memory by FastAPI,
so it gets a small fixed bound: a declared Content-Length over it is answered 413 at once, and a chunked body is
cut off (413) as soon as it passes it.
"""
from __future__ import annotations

import orjson

from app.core.errors import error_body

JSON_BODY_LIMIT = 1024 * 1024
#: The streaming upload routes, which bound their bodies themselves (whatever the content type says).
UPLOAD_PATHS = ("/v1/models", "/v1/datasets")


class BodyTooLarge(Exception):
    """Raised while a body streams in past the limit; FastAPI reports it as the cause of its 400, turned into 413."""

    message = f"the request body is over the {JSON_BODY_LIMIT} byte limit of non-upload requests"


class BodyLimitMiddleware:
    def __init__(self, app, limit: int = JSON_BODY_LIMIT):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        if scope["method"] == "POST" and scope["path"].rstrip("/") in UPLOAD_PATHS:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or ())
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            body = orjson.dumps(error_body("payload_too_large", BodyTooLarge.message, {"limit": self.limit}))
            await send({"type": "http.response.start", "status": 413,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                    (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})
            return
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(BodyTooLarge.message)
            return message

        return await self.app(scope, limited_receive, send)
