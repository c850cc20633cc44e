"""The routes of jobs: submit, list, read (also served below the router: app/jobs/poll_middleware.py), cancel, follow
(Server-Sent Events) and label patches.

Each route keeps the OpenAPI tag it has always had: the label patch is tagged `labels`, beside the other label
operations; `router` gathers both groups.
"""
from __future__ import annotations

import asyncio
from typing import Annotated

import orjson
from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from app.auth.deps import PrincipalDep
from app.auth.throttle import TooManyEventStreams, guards
from app.core.deps import ServicesDep, SessionDep
from app.core.errors import Conflict, InvalidTransition, NotFound, Unprocessable, error_responses
from app.core.ids import ID_PATTERN
from app.core.pagination import CursorQuery, LabelQuery, LimitQuery, next_cursor
from app.core.schemas import Page
from app.jobs import service
from app.jobs.schemas import JobCreate, JobEventOut, JobOut
from app.jobs.states import TERMINAL, JobStatus
from app.labels.schemas import LabelsPatch
from app.labels.service import parse_filters

jobs_routes = APIRouter(tags=["jobs"])
labels_routes = APIRouter(tags=["labels"])
JobId = Path(pattern=ID_PATTERN, description="A job id.")
SSE_POLL_S = 0.25
SSE_POLL_MAX_S = 1.0
SSE_KEEPALIVE_S = 15.0


@jobs_routes.post("/jobs", status_code=202, response_model=JobOut,
                  responses=error_responses(NotFound, Conflict, Unprocessable),
                  summary="Submit a job (committed, then enqueued by id)")
async def create_job(body: JobCreate, response: Response, services: ServicesDep, who: PrincipalDep,
                     idempotency_key: Annotated[str | None, Header(max_length=255, description=(
                         "Repeat a request safely: the same key returns the same job; a different body is a "
                         "409."))] = None):
    async with services.submit_gate:  # a burst of submissions queues here, not on the interpreter lock
        job, created = await run_in_threadpool(_create_job, services, who, body, idempotency_key)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return job


@jobs_routes.get("/jobs", response_model=Page[JobOut], summary="List jobs, newest first")
def list_jobs(session: SessionDep, who: PrincipalDep, cursor: CursorQuery = None, limit: LimitQuery = 50,
              status: JobStatus | None = None, kind: Annotated[str | None, Query(max_length=16)] = None,
              model_id: Annotated[str | None, Query(pattern=ID_PATTERN)] = None, label: LabelQuery = None):
    rows = service.list_page(session, who.scope, status=status, kind=kind, model_id=model_id, cursor=cursor,
                             limit=limit, label_filters=parse_filters(label))
    return Page[JobOut](items=[service.to_out(r) for r in rows], next_cursor=next_cursor(rows, limit))


def _create_job(services, who, body: JobCreate, idempotency_key: str | None):
    with services.db.session() as session:
        return service.create(services, session, who, body, idempotency_key)


def _get_job_json(services, owner: str | None, job_id: str) -> bytes:
    with services.db.session() as session:
        return service.to_out(service.get(session, owner, job_id)).model_dump_json().encode()


@jobs_routes.get("/jobs/{job_id}", response_model=JobOut, responses=error_responses(NotFound),
            summary="Read a job (the status-polling hot path)")
async def get_job(services: ServicesDep, who: PrincipalDep, job_id: str = JobId):
    if services.job_reader is not None:
        body = await services.job_reader.job_json(who.scope, job_id)
        if body is None:
            raise service.job_not_found(job_id)
    else:
        body = await run_in_threadpool(_get_job_json, services, who.scope, job_id)
    return Response(body, media_type="application/json")


@jobs_routes.post("/jobs/{job_id}/cancel", response_model=JobOut,
                  responses=error_responses(NotFound, InvalidTransition),
                  summary="Cancel: a queued job at once, a running one within a few seconds")
def cancel_job(session: SessionDep, who: PrincipalDep, job_id: str = JobId):
    return service.cancel(session, who.scope, job_id)


@labels_routes.patch("/jobs/{job_id}", response_model=JobOut, responses=error_responses(NotFound, Unprocessable),
                     summary="Change a job's labels (JSON merge patch: null removes a key)")
def patch_job(body: LabelsPatch, session: SessionDep, who: PrincipalDep,
              job_id: str = Path(pattern=ID_PATTERN)) -> JobOut:
    return service.patch_labels(session, who.scope, job_id, body.labels)


def _poll_events(services, owner: str | None, job_id: str, after: int):
    with services.db.session() as session:
        return service.events(session, owner, job_id, after)


class _SlotStream(StreamingResponse):
    """A StreamingResponse that frees its event-stream slot however the stream ends: the job ended, the client went
    away (uvicorn's disconnect cancels the stream; a failed send raises), or an error."""

    def __init__(self, content, slot, **kwargs):
        super().__init__(content, **kwargs)
        self.slot = slot

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.slot.close()
            try:
                await self.body_iterator.aclose()  # stop a generator left suspended at a yield now, not at GC
            except RuntimeError:
                pass


@jobs_routes.get("/jobs/{job_id}/events", responses={**error_responses(NotFound, TooManyEventStreams), 200: {
    "description": "Server-Sent Events: one `status` event per change (id = sequence number, data = JobEventOut "
                   "JSON), ending after a terminal state. Reconnect with Last-Event-ID to resume. An owner may hold "
                   "`max_event_streams_per_owner` streams open per API process, and a process serves "
                   "`max_event_streams` (429 `event_streams_limit` with Retry-After past either).",
    "content": {"text/event-stream": {"schema": {"type": "string"}}}}}, response_class=StreamingResponse)
async def job_events(request: Request, services: ServicesDep, who: PrincipalDep, job_id: str = JobId,
                     last_event_id: Annotated[str | None, Header(max_length=20)] = None):
    after = int(last_event_id) if last_event_id and last_event_id.isdigit() else 0
    slots = guards(services).event_streams
    slot = slots.open(who.owner)  # before any query: a refused stream costs the database nothing (429 past a limit)
    try:
        status, first = await run_in_threadpool(_poll_events, services, who.scope, job_id, after)  # 404 first
    except BaseException:
        slot.close()
        raise

    async def stream():
        nonlocal after, status
        events, idle, pause = first, 0.0, SSE_POLL_S
        while True:
            for ev in events:
                data = JobEventOut(seq=ev.seq, status=ev.status, progress=ev.progress, stage=ev.stage,
                                   at=ev.created_at).model_dump(mode="json")
                yield f"id: {ev.seq}\nevent: status\ndata: {orjson.dumps(data).decode()}\n\n"
                after = ev.seq
            if status in TERMINAL and not events:
                return
            if events:
                idle, pause = 0.0, SSE_POLL_S
            elif idle >= SSE_KEEPALIVE_S:
                yield ": keep-alive\n\n"
                idle = 0.0
            if await request.is_disconnected():
                return
            await asyncio.sleep(pause)
            idle += pause
            pause = min(SSE_POLL_MAX_S, pause * 1.5)  # a quiet job is polled less and less often, down to 1/s
            status, events = await run_in_threadpool(_poll_events, services, who.scope, job_id, after)

    return _SlotStream(stream(), slot, media_type="text/event-stream",
                       headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


router = APIRouter()
router.include_router(jobs_routes)
router.include_router(labels_routes)
