"""Health, readiness and Prometheus metrics."""
from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool

from app.core.deps import ServicesDep
from app.core.errors import error_body
from app.system import service

router = APIRouter(tags=["system"])


@router.get("/healthz", summary="The process is up")
async def healthz():
    return {"status": "ok"}


@router.get("/readyz", summary="Database, broker and object storage reachable (503 otherwise)",
            responses={503: {"description": "Not ready; the body says which dependency failed."}})
async def readyz(services: ServicesDep):
    checks = await run_in_threadpool(service.readiness, services)
    if all(v == "ok" for v in checks.values()):
        return {"status": "ready", "checks": checks}
    return JSONResponse(error_body("not_ready", "a dependency is unavailable", {"checks": checks}), status_code=503)


@router.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
async def metrics(services: ServicesDep):
    body = await run_in_threadpool(service.render_metrics, services)
    return PlainTextResponse(body, media_type="text/plain; version=0.0.4")
