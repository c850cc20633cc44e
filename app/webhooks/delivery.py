"""Delivering the webhook outbox: a thread each worker runs beside its maintenance loop.

Each due delivery is claimed with a conditional update (so two workers never send it at the same time), its job is
rendered exactly as `GET /v1/jobs/{id}` renders it, signed, and POSTed to the address that passed the allow-list
check (redirects are not followed, no proxy from the environment is used). Every attempt is recorded on the row
and shows in the job's `webhook` object; failures are retried with exponential back-off up to
`webhook_max_attempts`. Delivery is at least once: a worker that dies mid-POST leaves a lease that expires, and
another worker sends it again (receivers de-duplicate on X-Distillery-Delivery).

This package sits below the jobs domain (jobs record the outbox rows and render the webhook state), so the worker
hands the deliverer the function that renders a job (`RenderJob`: app/jobs/service.job_json). Each claim and each
recorded attempt is committed on its own (the delivery is the unit of work).
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.db import Database, utcnow
from app.webhooks import repository as outbox
from app.webhooks.policy import AllowList, Refused, parse_target, resolve_checked
from app.webhooks.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign

log = logging.getLogger("distillery.webhooks")
BATCH = 20
USER_AGENT = "Distillery-Webhooks/1"
#: (session, job id) -> the job's JSON as `GET /v1/jobs/{id}` answers it, or None when the job does not exist
RenderJob = Callable[[Session, str], "bytes | None"]


@dataclass
class AttemptResult:
    ok: bool
    status_code: int | None = None
    error: str | None = None


def post(settings: Settings, url: str, body: bytes, headers: dict[str, str]) -> AttemptResult:
    """One attempt: resolve and check the host, then POST to the checked address (TLS still verifies the name)."""
    try:
        target = parse_target(url)
        ip = resolve_checked(target, AllowList.parse(settings.webhook_allowed_hosts))
    except Refused as exc:
        return AttemptResult(False, error=f"refused: {exc}")
    except Exception as exc:  # noqa: BLE001 - a URL that passed submit-time checks; record, never crash the loop
        return AttemptResult(False, error=f"invalid callback_url: {exc}")
    pinned = httpx.URL(target.url).copy_with(host=str(ip))
    host_header = target.host if ":" not in target.host else f"[{target.host}]"
    if target.port != (443 if target.scheme == "https" else 80):
        host_header += f":{target.port}"
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    timeout = settings.webhook_timeout_s
    try:
        with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
            request = client.build_request("POST", pinned, content=body, extensions=extensions,
                                           headers={**headers, "Host": host_header})
            response = client.send(request, stream=True)  # the answer's body is never read
            response.close()
    except Exception as exc:  # noqa: BLE001 - httpx.HTTPError, TLS, anything: a failed attempt, recorded
        return AttemptResult(False, error=f"{type(exc).__name__}: {exc}"[:500])
    if 200 <= response.status_code < 300:
        return AttemptResult(True, response.status_code)
    why = "redirects are not followed" if 300 <= response.status_code < 400 else "non-2xx answer"
    return AttemptResult(False, response.status_code, f"HTTP {response.status_code} ({why})")


def deliver_one(db: Database, settings: Settings, render_job: RenderJob, delivery_id: str) -> str | None:
    """Claim, send and record one delivery; None when another process holds it (or it is no longer due)."""
    lease_s = settings.webhook_timeout_s * 4 + 30
    with db.session() as session:
        claimed = outbox.claim(session, delivery_id, utcnow(), lease_s)
        if claimed is None:
            session.rollback()
            return None
        session.commit()
        body = render_job(session, claimed.job_id)
    if body is None:
        result = AttemptResult(False, error="the job no longer exists")
    else:
        ts = int(time.time())
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT,
                   "X-Distillery-Event": claimed.event, "X-Distillery-Delivery": claimed.id,
                   TIMESTAMP_HEADER: str(ts), SIGNATURE_HEADER: sign(settings.webhook_secret, ts, body)}
        result = post(settings, claimed.url, body, headers)
    with db.session() as session:
        state = outbox.finish_attempt(session, claimed.id, claimed.attempts, ok=result.ok,
                                      status_code=result.status_code, error=result.error,
                                      max_attempts=settings.webhook_max_attempts,
                                      base_backoff_s=settings.webhook_backoff_s)
        session.commit()
    level = logging.INFO if result.ok else logging.WARNING
    log.log(level, "webhook %s of job %s, attempt %d: %s", claimed.event, claimed.job_id, claimed.attempts,
            "delivered" if result.ok else f"{result.error} -> {state}")
    return state


def deliver_due(db: Database, settings: Settings, render_job: RenderJob, limit: int = BATCH) -> int:
    """Deliver what is due now (at most `limit`); returns how many attempts this process made."""
    with db.session() as session:
        ids = outbox.due(session, utcnow(), limit)
    return sum(deliver_one(db, settings, render_job, i) is not None for i in ids)


class WebhookDeliverer:
    """The delivery loop on its own thread, so a slow receiver never delays the reaper."""

    def __init__(self, db: Database, settings: Settings, interval_s: float, render_job: RenderJob):
        self.db, self.settings, self.interval_s, self.render_job = db, settings, interval_s, render_job
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="distillery-webhooks", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                while deliver_due(self.db, self.settings, self.render_job) >= BATCH and not self._stop.is_set():
                    pass  # a backlog: keep going without waiting
            except (OperationalError, InterfaceError) as exc:  # the database is unreachable: try again next round
                log.warning("webhook delivery round skipped, database unavailable: %s", exc.orig)
            except Exception:  # noqa: BLE001 - keep delivering whatever one round hit
                log.exception("webhook delivery round failed")
