"""One logging set-up for every process: the CLI and the API (uvicorn), the Celery worker, and a job's own process.

`log_format` "json" writes one JSON object per line: `ts`, `level`, `logger`, `message`, and when known `job_id`
(a line about a job), `worker` (the worker's node name), `request_id` (an API request), `exc` (a traceback).
`job_id` comes from a context variable set while a job is claimed, supervised and recorded (`job_context`), so
every line a job's thread writes carries it, whichever library writes it. "text" is the same information on one
human-readable line.
"""
from __future__ import annotations

import contextlib
import json
import logging
import logging.config
import os
import secrets
import sys
import time
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import Any, Iterator

job_id_var: ContextVar[str | None] = ContextVar("distillery_job_id", default=None)
request_id_var: ContextVar[str | None] = ContextVar("distillery_request_id", default=None)
_process: dict[str, str] = {}  # facts of the whole process (the worker's name), on every line

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName",
                                                                          "color_message"}  # uvicorn's ANSI copy
_ACCESS_FIELDS = ("client", "method", "path", "http_version", "status")


@contextlib.contextmanager
def job_context(job_id: str | None) -> Iterator[None]:
    """Every line logged in this thread (or task) until the block ends names `job_id`."""
    token = job_id_var.set(job_id)
    try:
        yield
    finally:
        job_id_var.reset(token)


def set_process_field(name: str, value: str) -> None:
    _process[name] = value


class ContextFilter(logging.Filter):
    """Adds job_id, request_id and the process fields to every record (None where unknown)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "job_id", None) is None:
            record.job_id = job_id_var.get()
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        for k, v in _process.items():
            if getattr(record, k, None) is None:
                setattr(record, k, v)
        return True


def _iso(created: float) -> str:
    return datetime.fromtimestamp(created, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per line; nothing of a record is lost, nothing spans two lines."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": _iso(record.created), "level": record.levelname, "logger": record.name,
                               "message": record.getMessage()}
        for key in ("job_id", "worker", "request_id"):
            value = getattr(record, key, None)
            if value is not None:
                out[key] = value
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
            out.update(zip(_ACCESS_FIELDS, record.args, strict=True))
        for key, value in vars(record).items():  # fields passed with extra={...}
            if key not in _RESERVED and key not in out and key not in ("job_id", "worker", "request_id"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`2026-11-28 06:03:01,123 INFO distillery.worker [job 1f2e...] message` (the tag only about a job)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        job_id = getattr(record, "job_id", None)
        if job_id and job_id not in record.getMessage():
            head, _, tail = line.partition(f" {record.name} ")
            line = f"{head} {record.name} [job {job_id}] {tail}"
        return line


class StderrHandler(logging.StreamHandler):
    """Writes to sys.stderr as it was at configuration time (Celery later replaces sys.stderr with a proxy that logs
    what is written to it), or to the current sys.stderr once that stream was closed (a test runner's capture)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # noqa: D102
        return sys.stderr if getattr(self._stream, "closed", False) else self._stream

    @stream.setter
    def stream(self, value) -> None:
        self._stream = value


class _Demote(logging.Filter):
    """On a logger: its records that `quiet(record)` picks are DEBUG lines, not INFO or WARNING ones (shown only
    when that logger is enabled for DEBUG, e.g. DISTILLERY_LOG_LEVEL=DEBUG); every other record passes as it is."""

    def quiet(self, record: logging.LogRecord) -> bool:  # pragma: no cover - overridden
        raise NotImplementedError

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.DEBUG or not self.quiet(record):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


#: What a browser on the dashboard or /docs fetches over and over: the pages and their assets, and the dashboard's
#: polls (every 1.5 s: the job list, a job, now and then the model list). Their successful GETs are DEBUG lines.
QUIET_GET_PATHS = frozenset({"/", "/docs", "/openapi.json", "/favicon.ico", "/v1/jobs", "/v1/models"})
QUIET_GET_PREFIXES = ("/dashboard/", "/docs/assets/")


def is_quiet_access(method: str, path: str, status: int) -> bool:
    """A successful (2xx, 3xx) GET or HEAD of a page, a static asset or a dashboard poll: `/`, `/dashboard/*`,
    `/docs`, `/docs/assets/*`, `/openapi.json`, `GET /v1/jobs`, `GET /v1/jobs/{id}`, `GET /v1/models`. Writes,
    errors and every other read are not."""
    if method not in ("GET", "HEAD") or not 200 <= status < 400:
        return False
    path = path.partition("?")[0]
    if path in QUIET_GET_PATHS or path.startswith(QUIET_GET_PREFIXES):
        return True
    head, _, job = path.rpartition("/")
    return head == "/v1/jobs" and bool(job)


class QuietAccessFilter(_Demote):
    """uvicorn's access lines of is_quiet_access() requests are DEBUG: a dashboard left open writes nothing at
    INFO, while writes (POST, PATCH, DELETE) and every 4xx/5xx answer are still logged at INFO."""

    def quiet(self, record: logging.LogRecord) -> bool:
        args = record.args
        if not (isinstance(args, tuple) and len(args) == 5 and isinstance(args[4], int)):
            return False
        return is_quiet_access(str(args[1]), str(args[2]), args[4])


class AlembicContextFilter(_Demote):
    """Alembic's "Context impl SQLiteImpl." and "Will assume non-transactional DDL." at every start: DEBUG. Its
    "Running upgrade A -> B" lines (the schema changed) stay INFO."""

    def quiet(self, record: logging.LogRecord) -> bool:
        return record.msg.startswith(("Context impl", "Will assume")) if isinstance(record.msg, str) else False


class KombuNoHostnameFilter(_Demote):
    """kombu's "No hostname was supplied. Reverting to default 'localhost'": kombu says it each time it describes
    a connection whose URL names no host (Celery's banner and its "Connected to" line), which the file-system
    broker's `filesystem://` never does, and that transport has no use for a host. DEBUG."""

    def quiet(self, record: logging.LogRecord) -> bool:
        return isinstance(record.msg, str) and record.msg.startswith("No hostname was supplied")


def logging_config(log_format: str, level: str) -> dict[str, Any]:
    """A dictConfig: the root logger writes to stderr in `log_format`; uvicorn's and Celery's loggers go through
    it. Also handed to uvicorn (log_config=), so its worker processes log the same way.

    Start-up and polling noise is kept below INFO: Alembic's plugin set-up lines (WARNING and up only), its
    per-connection context lines, kombu's "No hostname" warning about the file-system broker, and the access lines of
    successful page, asset and dashboard-poll GETs (`is_quiet_access`). DISTILLERY_LOG_LEVEL=DEBUG shows the
    demoted lines again."""
    loggers: dict[str, Any] = {name: {"handlers": [], "propagate": True, "level": level.upper()}
                               for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "celery")}
    loggers["uvicorn.access"]["filters"] = ["quiet_access"]
    # "setup plugin alembic.autogenerate.schemas" and six more, at every import of Alembic's command module
    numeric = logging.getLevelName(level.upper())
    quiet_level = level.upper() if not isinstance(numeric, int) or numeric <= logging.DEBUG \
        else logging.getLevelName(max(numeric, logging.WARNING))
    loggers["alembic.runtime.plugins"] = {"handlers": [], "propagate": True, "level": quiet_level}
    loggers["alembic.runtime.migration"] = {"handlers": [], "propagate": True, "filters": ["alembic_context"]}
    loggers["kombu.connection"] = {"handlers": [], "propagate": True, "filters": ["kombu_no_hostname"]}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"context": {"()": "app.core.logs.ContextFilter"},
                    "quiet_access": {"()": "app.core.logs.QuietAccessFilter"},
                    "alembic_context": {"()": "app.core.logs.AlembicContextFilter"},
                    "kombu_no_hostname": {"()": "app.core.logs.KombuNoHostnameFilter"}},
        "formatters": {"json": {"()": "app.core.logs.JsonFormatter"},
                       "text": {"()": "app.core.logs.TextFormatter"}},
        "handlers": {"stderr": {"()": "app.core.logs.StderrHandler",
                                "formatter": "json" if log_format == "json" else "text", "filters": ["context"]}},
        "loggers": loggers,
        "root": {"handlers": ["stderr"], "level": level.upper()},
    }


def setup_logging(log_format: str, level: str) -> None:
    """Configure this process's logging (idempotent: the root logger's handlers are replaced)."""
    logging.config.dictConfig(logging_config(log_format, level))
    logging.captureWarnings(True)  # warnings.warn() lines go through the same handler


class RequestIdMiddleware:
    """Gives each HTTP request an id (the client's X-Request-ID when it is short and plain, else a new one),
    echoes it in the response's X-Request-ID, and names it on every line logged while serving the request,
    uvicorn's access line included."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = None
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id":
                candidate = value.decode("latin-1")
                if 0 < len(candidate) <= 64 and all(c.isalnum() or c in "-_." for c in candidate):
                    rid = candidate
                break
        rid = rid or secrets.token_hex(8)
        raw = rid.encode()

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", raw)]
            await send(message)

        token = request_id_var.set(rid)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)


def write_raw_line(stream, message: str, logger: str, level: str = "WARNING") -> None:
    """One JSON line straight to a stream's file descriptor, taking no lock: for code that must not log (a signal
    handler), such as Celery's shutdown notices."""
    out = {"ts": _iso(time.time()), "level": level, "logger": logger, "message": message.strip(), **_process}
    try:
        os.write(stream.fileno(), (json.dumps(out, default=str) + "\n").encode())
    except (OSError, ValueError, AttributeError):
        pass


def child_log_spec(log_format: str, level: str, job_id: str) -> dict[str, str]:
    """What a job's own process needs to log like its worker (it gets no DISTILLERY_ environment)."""
    return {"format": log_format, "level": level, "job_id": job_id}


def setup_child_logging(spec: dict | None) -> None:
    """In the job's process: the worker's format and level, and the job id on every line."""
    if not spec:
        return
    setup_logging(spec.get("format", "text"), spec.get("level", "INFO"))
    if spec.get("job_id"):
        job_id_var.set(spec["job_id"])

