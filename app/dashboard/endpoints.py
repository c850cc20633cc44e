"""`/` and its two assets. Left out of the OpenAPI spec: they are a page, not API."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Path as PathParam, Response

from app.core.errors import NotFound

STATIC = Path(__file__).resolve().parent / "static"
ASSETS = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}
# Only this origin's script and style files run; no inline script, no other origin, no framing.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}

router = APIRouter(include_in_schema=False)


@router.get("/")
async def dashboard() -> Response:
    return Response((STATIC / "index.html").read_bytes(), media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/dashboard/{name}")
async def dashboard_asset(name: str = PathParam(max_length=32)) -> Response:
    if name not in ASSETS:
        raise NotFound(f"no dashboard file {name!r}")
    return Response((STATIC / name).read_bytes(), media_type=ASSETS[name], headers=HEADERS)
