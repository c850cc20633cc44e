"""The status-polling hot path: `GET /v1/jobs/{id}` on PostgreSQL.

Clients poll job status far more often than they do anything else, so this read skips the ORM, the thread pool and
pydantic: one prepared statement on a small async connection pool per API process, and the JSON is assembled
directly (the stored `config` and `metrics` JSON is spliced in as text, never parsed). A test checks that the bytes
equal the regular `JobOut` rendering. SQLite deployments (the embedded default) use the regular path.
"""
from __future__ import annotations

from datetime import datetime

import orjson
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool
from sqlalchemy.engine import make_url

from app.methods.datasets import dataset_ref
from app.webhooks.schemas import webhook_out

_COLUMNS = ("id, kind, status, model_id, dataset_id, builtin_dataset, config::text AS config, device_requested, "
            "queue, progress, stage, attempts, max_attempts, error_code, error_message, metrics::text AS metrics, "
            "artifact_id, worker, device, owner, created_at, started_at, finished_at, updated_at, callback_url, "
            "COALESCE((SELECT json_object_agg(l.key, l.value ORDER BY l.key COLLATE \"C\") FROM job_labels l "
            "WHERE l.job_id = jobs.id), '{}'::json)::text AS labels, "
            "(SELECT row_to_json(d)::text FROM (SELECT w.event, w.state, w.attempts, w.last_status_code, "
            "w.last_error, w.last_attempt_at, w.next_attempt_at, w.delivered_at FROM webhook_deliveries w "
            "WHERE w.job_id = jobs.id) d) AS webhook")
_QUERY = f"SELECT {_COLUMNS} FROM jobs WHERE id = %s AND owner = %s"
_QUERY_ANY_OWNER = f"SELECT {_COLUMNS} FROM jobs WHERE id = %s"
_JSON_OPTS = orjson.OPT_UTC_Z


def _libpq_conninfo(sqlalchemy_url: str) -> str:
    url = make_url(sqlalchemy_url).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


class JobReader:
    def __init__(self, sqlalchemy_url: str, max_size: int = 8, wait_s: float = 5.0):
        self.wait_s = wait_s
        self.pool = AsyncConnectionPool(_libpq_conninfo(sqlalchemy_url), min_size=1, max_size=max_size, open=False,
                                        kwargs={"autocommit": True, "prepare_threshold": 0, "row_factory": dict_row,
                                                "connect_timeout": max(1, round(wait_s)), "options": "-c TimeZone=UTC"})

    async def open(self) -> None:
        await self.pool.open(wait=False)

    async def close(self) -> None:
        await self.pool.close()

    async def job_json(self, owner: str | None, job_id: str) -> bytes | None:
        """The job as JSON; owner None (an admin) reads any owner's job."""
        async with self.pool.connection(timeout=self.wait_s) as conn:
            cur = await conn.execute(_QUERY, (job_id, owner)) if owner is not None else \
                await conn.execute(_QUERY_ANY_OWNER, (job_id,))
            row = await cur.fetchone()
        return None if row is None else render(row)


def render(row: dict) -> bytes:
    """The JobOut JSON of a row whose config and metrics are JSON text."""
    row["dataset_id"] = dataset_ref(row["dataset_id"], row.pop("builtin_dataset"))
    code, message = row.pop("error_code"), row.pop("error_message")
    row["error"] = {"code": code, "message": message or ""} if code else None
    row["config"] = orjson.Fragment(row["config"])
    row["labels"] = orjson.Fragment(row["labels"])
    row["webhook"] = _webhook(row.pop("callback_url"), row["webhook"])
    metrics = row["metrics"]
    row["metrics"] = orjson.Fragment(metrics) if metrics is not None and metrics != "null" else None
    out = {k: row[k] for k in ORDER}
    return orjson.dumps(out, option=_JSON_OPTS)


ORDER = ("id", "kind", "status", "model_id", "dataset_id", "config", "device_requested", "queue", "progress",
         "stage", "attempts", "max_attempts", "error", "metrics", "artifact_id", "worker", "device", "owner",
         "created_at", "started_at", "finished_at", "updated_at", "labels", "webhook")


def _webhook(callback_url: str | None, delivery_json: str | None) -> dict | None:
    if not callback_url:
        return None
    delivery = orjson.loads(delivery_json) if delivery_json else None
    if delivery is not None:
        for key in ("last_attempt_at", "next_attempt_at", "delivered_at"):
            if delivery[key] is not None:
                delivery[key] = datetime.fromisoformat(delivery[key])
    return webhook_out(callback_url, delivery).model_dump()
