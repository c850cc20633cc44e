"""`/` and its two assets. Left out of the OpenAPI spec: they are a page, not API.

A job's report is `/#/jobs/<id>` on the same page (the fragment never reaches the server). Each file carries an
ETag (its content's hash) and `Cache-Control: no-cache`: a browser revalidates it and gets a 304 with no body while
it is unchanged."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Header, Path as PathParam, Response

from app.core.errors import NotFound

STATIC = Path(__file__).resolve().parent / "static"
ASSETS = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}
# Only this origin's script and style files run; no inline script, no other origin, no framing.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}

router = APIRouter(include_in_schema=False)
IfNoneMatch = Annotated[str | None, Header(max_length=200)]


def _file(name: str, media_type: str, if_none_match: str | None) -> Response:
    body = (STATIC / name).read_bytes()
    etag = f'"{hashlib.sha256(body).hexdigest()[:32]}"'
    headers = {**HEADERS, "ETag": etag}
    if if_none_match and etag in [t.strip() for t in if_none_match.split(",")]:
        return Response(status_code=304, headers=headers)
    return Response(body, media_type=media_type, headers=headers)


@router.get("/")
async def dashboard(if_none_match: IfNoneMatch = None) -> Response:
    return _file("index.html", "text/html; charset=utf-8", if_none_match)


@router.get("/dashboard/{name}")
async def dashboard_asset(name: str = PathParam(max_length=32), if_none_match: IfNoneMatch = None) -> Response:
    if name not in ASSETS:
        raise NotFound(f"no dashboard file {name!r}")
    return _file(name, ASSETS[name], if_none_match)
