"""The errors every route may answer, declared in the OpenAPI spec in one place.

Routes declare their own domain errors with `responses=error_responses(...)`. What follows from how a route is
wired is added here, from its dependencies, to every operation in the spec (routes added later included):
  - a JSON body: 400 (the body could not be read as text) and 413 (over app/core/bodylimit.py's limit);
  - parameters or a body: 422, with the error schema this app really answers with (FastAPI's default says
    `HTTPValidationError`, which the validation handler in `app/main.py` never returns);
  - the caller's principal (`PrincipalDep`): 401 (no key, a bad or revoked key) and 429 (the per-owner rate limit),
    and the Bearer security scheme;
  - the shared services (database, broker, storage): 503 (the database is unavailable or refused the request).
Each dependency declares its own with `answers(...)` where it is defined (app/auth/deps.py, app/core/deps.py), so
this module imports no domain.

It also serves the interactive docs, `/docs` (Swagger UI), from this process alone: `install_docs`.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from functools import lru_cache
from importlib import resources
from typing import Any

from fastapi import FastAPI, Path, Request, Response, routing
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.routing import APIRoute

from app.core.errors import NotFound
from app.core.schemas import ErrorResponse

ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
SECURITY_SCHEME = "bearerAuth"
_COMMON = {
    400: "bad_request: the request body could not be read",
    413: "payload_too_large: a JSON body over 1 MiB (`detail.limit`)",
    401: "unauthorized: no API key, or an invalid or revoked one (`Authorization: Bearer <key>`)",
    422: "validation_error: a parameter or the body is invalid (`detail.errors` lists each field)",
    429: "rate_limited: the owner is over `DISTILLERY_RATE_LIMIT_PER_MINUTE`; auth_rate_limited: this address "
         "sent too many invalid API keys (`DISTILLERY_AUTH_FAILURES_PER_MINUTE`); retry after the `Retry-After` "
         "seconds (`detail.retry_after_s`)",
    503: "database_unavailable / database_error: retry after the `Retry-After` seconds",
}


def _calls(dependant) -> Iterator[Callable]:
    for dep in dependant.dependencies:
        if dep.call is not None:
            yield dep.call
        yield from _calls(dep)


def _api_routes(app: FastAPI) -> Iterator[Any]:
    """Every APIRoute with its full path (FastAPI >= 0.130 keeps included routers unflattened)."""
    contexts = getattr(routing, "iter_route_contexts", None)
    if contexts is None:
        yield from (r for r in app.routes if isinstance(r, APIRoute))
        return
    for ctx in contexts(app.routes):
        if isinstance(ctx.original_route, APIRoute):
            yield ctx


#: The status codes a route dependency can answer, by dependency (declared where each is defined, with `answers`)
_DEPENDENCY_ERRORS: dict[Callable, tuple[int, ...]] = {}


def answers(*codes: int) -> Callable[[Callable], Callable]:
    """Declare the errors a route dependency can answer (the caller's principal: 401 and 429; the shared services:
    503); every route that depends on it, directly or through another dependency, declares them in the spec."""
    unknown = set(codes) - set(_COMMON)
    if unknown:
        raise ValueError(f"no common error is described for {sorted(unknown)}")

    def declare(dependency: Callable) -> Callable:
        _DEPENDENCY_ERRORS[dependency] = codes
        return dependency

    return declare


def common_errors(route: APIRoute) -> list[int]:
    """The status codes this route can answer because of how it is wired (not what its service raises)."""
    codes = [400, 413] if route.body_field is not None else []
    wired = {code for call in _calls(route.dependant) for code in _DEPENDENCY_ERRORS.get(call, ())}
    return codes + [code for code in _COMMON if code in wired]


def _error_response(code: int) -> dict[str, Any]:
    return {"description": _COMMON[code], "content": {"application/json": {"schema": dict(ERROR_REF)}}}


def declare_common_errors(app: FastAPI, spec: dict[str, Any]) -> dict[str, Any]:
    paths = spec.get("paths", {})
    authed = False
    for route in _api_routes(app):
        if not route.include_in_schema:
            continue
        codes = common_errors(route)
        for method in route.methods:
            op = paths.get(route.path_format, {}).get(method.lower())
            if op is None:
                continue
            responses = op.setdefault("responses", {})
            for code in codes:
                responses.setdefault(str(code), _error_response(code))
            if 401 in codes:
                op.setdefault("security", [{SECURITY_SCHEME: []}])
                authed = True
    for op in (op for item in paths.values() for op in item.values() if isinstance(op, dict)):
        for status, resp in op.get("responses", {}).items():
            # every error is answered as {"error": {...}} (the handlers in app/main.py), declared or not
            if status[:1] in "45" and isinstance(resp, dict) and "content" not in resp and "$ref" not in resp:
                resp["content"] = {"application/json": {"schema": dict(ERROR_REF)}}
        resp = op.get("responses", {}).get("422")
        schema = (resp or {}).get("content", {}).get("application/json", {}).get("schema", {})
        if schema.get("$ref", "").endswith("/HTTPValidationError"):
            op["responses"]["422"] = _error_response(422)
    components = spec.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    if "ErrorResponse" not in schemas:
        defs = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(defs.pop("$defs", {}))
        schemas["ErrorResponse"] = defs
    if '"#/components/schemas/HTTPValidationError"' not in json.dumps(spec):
        schemas.pop("HTTPValidationError", None)
        if '"#/components/schemas/ValidationError"' not in json.dumps(spec):
            schemas.pop("ValidationError", None)
    if authed:
        components.setdefault("securitySchemes", {})[SECURITY_SCHEME] = {
            "type": "http", "scheme": "bearer",
            "description": "An API key from `distillery keys create --owner NAME`. `distillery serve` on "
                           "127.0.0.1 runs open (DISTILLERY_AUTH=open): keyless requests act as the default owner."}
    return spec


def install_openapi(app: FastAPI) -> None:
    """Make `app.openapi()` (and /openapi.json, /docs) carry the common errors."""
    build = app.openapi  # FastAPI's: cached, rebuilt when routes are added
    done: dict[str, int] = {}

    def openapi() -> dict[str, Any]:
        spec = build()
        if done.get("id") != id(spec):
            declare_common_errors(app, spec)
            done["id"] = id(spec)
        return spec

    app.openapi = openapi


#: Swagger UI's files, from the `fastapi-swagger` package (Swagger UI 5's dist files, which render OpenAPI 3.1):
#: served here, so /docs works without the CDN that FastAPI's default page loads them from.
DOCS_ASSETS_PATH = "/docs/assets"
_DOCS_ASSETS = {"swagger-ui-bundle.js": "text/javascript; charset=utf-8", "swagger-ui.css": "text/css; charset=utf-8",
                "favicon-32x32.png": "image/png"}


@lru_cache(maxsize=None)
def docs_asset(name: str) -> tuple[bytes, str]:
    """(content, ETag) of one of Swagger UI's files, read once per process."""
    data = resources.files("fastapi_swagger.resources").joinpath(name).read_bytes()
    if name.endswith(".css"):  # it names a source map the package does not ship
        data = data.split(b"/*# sourceMappingURL=", 1)[0]
    return data, '"' + hashlib.sha256(data).hexdigest()[:32] + '"'


def install_docs(app: FastAPI) -> None:
    """`/docs`: FastAPI's Swagger UI page (create the app with docs_url=None and redoc_url=None), its script, style
    and icon served by this app under /docs/assets/, so that nothing is fetched from another origin (a machine
    offline, or one whose browser reaches only this server, gets working docs). ReDoc is not offered (its page loads
    its script and web fonts from CDNs too). All of it is left out of the spec."""
    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> Response:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(
            openapi_url=root + (app.openapi_url or "/openapi.json"), title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{DOCS_ASSETS_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSETS_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_ASSETS_PATH}/favicon-32x32.png",
            swagger_ui_parameters={"validatorUrl": None})  # no badge asking validator.swagger.io about the spec

    @app.get(DOCS_ASSETS_PATH + "/{name}", include_in_schema=False)
    async def swagger_ui_asset(request: Request, name: str = Path(max_length=64)) -> Response:
        if name not in _DOCS_ASSETS:
            raise NotFound(f"no docs file {name!r}")
        data, etag = docs_asset(name)
        headers = {"ETag": etag, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
        if request.headers.get("if-none-match") == etag:  # revalidated: the browser keeps its copy
            return Response(status_code=304, headers=headers)
        return Response(data, media_type=_DOCS_ASSETS[name], headers=headers)
