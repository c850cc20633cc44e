"""create_app(): routers, error handlers, lifespan."""
from __future__ import annotations

import gc
import logging
from contextlib import asynccontextmanager

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from psycopg_pool import PoolTimeout
from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.artifacts.endpoints import router as artifacts_router
from app.auth.deps import RateLimiter
from app.auth.keys import KeyVerifier
from app.core.bodylimit import JSON_BODY_LIMIT, BodyLimitMiddleware, BodyTooLarge
from app.core.broker import make_celery
from app.core.config import Settings, get_settings
from app.core.db import Database
from app.core.errors import DistilleryError, database_unavailable_response, error_body, error_response
from app.core.logs import RequestIdMiddleware
from app.core.openapi import install_docs, install_openapi
from app.core.services import Services
from app.core.storage import make_storage
from app.core.uploads import sweep_temp_files
from app.dashboard.endpoints import router as dashboard_router
from app.datasets.endpoints import router as datasets_router
from app.jobs.endpoints import router as jobs_router
from app.jobs.poll_middleware import JobPollFastPath
from app.jobs.poll_reader import JobReader
from app.lineage.endpoints import router as lineage_router
from app.methods import UNION_TAGS
from app.models.endpoints import router as models_router
from app.system.endpoints import router as system_router
from app.fleet.endpoints import router as workers_router

log = logging.getLogger("distillery.api")

_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 406: "not_acceptable", 413: "payload_too_large",
               415: "unsupported_media_type", 416: "range_not_satisfiable", 429: "too_many_requests"}


def _validation_detail(exc: RequestValidationError) -> list[dict]:
    out = []
    for err in exc.errors():
        raw = [str(p) for p in err.get("loc", ())]
        # drop "body" and the tags that discriminated unions add (body.quantize.config.x -> config.x)
        loc = [p for i, p in enumerate(raw) if not (i == 0 and p == "body" and len(raw) > 1)
               and not (p in UNION_TAGS and i > 0 and raw[i - 1] in ("body", "config", "student"))]
        if err.get("type") == "invalid_method":  # the config's method is missing or unknown
            loc.append("method")
        out.append({"field": ".".join(loc), "message": err.get("msg", ""), "type": err.get("type", "")})
    return out


_FASTAPI_BODY_ERROR = "There was an error parsing the body"


def _body_parse_reason(cause: BaseException) -> str:
    """Why FastAPI could not read a JSON body that is not a plain syntax error (it says only 'There was an error
    parsing the body')."""
    if isinstance(cause, RecursionError):
        return "it is nested too deeply"
    if isinstance(cause, UnicodeDecodeError):
        return "it is not UTF-8 text"
    if isinstance(cause, ValueError) and "digits" in str(cause):
        return "a number has too many digits"
    return f"it cannot be parsed ({type(cause).__name__})"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(DistilleryError)
    async def _domain(_: Request, exc: DistilleryError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        errors = _validation_detail(exc)
        first = errors[0] if errors else {"field": "", "message": "invalid request"}
        if first.get("type") == "json_invalid":
            message = "the request body is not valid JSON"
        else:
            message = f"{first['field'] or 'request'}: {first['message']}"
        return JSONResponse(error_body("validation_error", message, {"errors": errors}), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else code
        if isinstance(exc.__cause__, BodyTooLarge):
            return JSONResponse(error_body("payload_too_large", exc.__cause__.message, {"limit": JSON_BODY_LIMIT}),
                                status_code=413)
        if exc.status_code == 400 and exc.detail == _FASTAPI_BODY_ERROR and exc.__cause__ is not None:
            message = f"the request body cannot be read as JSON: {_body_parse_reason(exc.__cause__)}"
        return JSONResponse(error_body(code, message), status_code=exc.status_code, headers=exc.headers)

    async def _db_down(_: Request, exc: Exception):
        log.warning("database unavailable: %s", getattr(exc, "orig", exc))
        return database_unavailable_response()

    # SQLAlchemy's, and the polling path's psycopg pool's, ways of saying the database is unreachable
    for exc_type in (OperationalError, psycopg.OperationalError, PoolTimeout):
        app.add_exception_handler(exc_type, _db_down)

    @app.exception_handler(DBAPIError)
    async def _db_error(_: Request, exc: DBAPIError):
        log.exception("database error")
        return JSONResponse(error_body("database_error", "the database rejected the request"), status_code=503,
                              headers={"Retry-After": "2"})

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse(error_body("internal_error", "an unexpected error occurred"), status_code=500)


_heap_collected = False


def _freeze_startup_heap() -> None:
    """Move what start-up made (it lives as long as the app) out of the cycle collector's reach, so that a full
    collection, triggered by request garbage, scans only newer objects instead of stalling this process's event loop
    (bench/gc_pause.py measures the stall; docs/benchmarks.md has the figures). The first start in a process
    collects first (it also sets the collector's full-collection baseline); later starts in the same process (the test suite makes hundreds of apps) only freeze. The lifespan unfreezes at
    shutdown, so an app made and dropped in a longer process leaves nothing uncollectable behind."""
    global _heap_collected
    if not _heap_collected:
        gc.collect()
        _heap_collected = True
    gc.freeze()


def build_services(settings: Settings) -> Services:
    """This process's services; the poll reader only on PostgreSQL (SQLite reads jobs through the route)."""
    reader = JobReader(settings.database_url, wait_s=settings.database_wait_s) \
        if settings.database_url.startswith("postgresql") else None
    return Services(settings, Database(settings), make_storage(settings), make_celery(settings),
                    KeyVerifier(settings.auth_cache_s), RateLimiter(settings.rate_limit_per_minute), reader)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        services = build_services(settings)
        sweep_temp_files(services.storage)  # temp files of API processes killed mid-upload, at once
        services.storage.clean_temp(older_than_s=3600)
        await services.open()
        app.state.services = services
        _freeze_startup_heap()
        try:
            yield
        finally:
            await services.close()
            gc.unfreeze()

    app = FastAPI(title="Distillery", version="1.0.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Model compression as a service: upload a model, run a quantize/prune/distill job "
                              "on a worker, download the measured, compressed artifact.")
    install_error_handlers(app)
    install_openapi(app)  # the errors every route may answer (401, 422, 429, 503...), declared in the spec
    install_docs(app)  # /docs with Swagger UI's files served from here, not a CDN
    app.add_middleware(JobPollFastPath)  # GET /v1/jobs/{id} on PostgreSQL, below the router (poll_middleware.py)
    app.add_middleware(BodyLimitMiddleware)  # JSON bodies (not uploads) are at most JSON_BODY_LIMIT bytes
    app.add_middleware(RequestIdMiddleware)  # X-Request-ID, and request_id on the request's log lines
    # each domain's routes live in its endpoints module (a model's label patch and its jobs with the models, a job's
    # label patch with the jobs), tagged in the spec as they always were
    for router in (models_router, datasets_router, jobs_router, artifacts_router, workers_router, lineage_router):
        app.include_router(router, prefix="/v1")
    app.include_router(system_router)
    app.include_router(dashboard_router)  # `/`: a static page, left out of the OpenAPI spec
    return app
