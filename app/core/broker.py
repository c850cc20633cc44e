"""The Celery app, configured from Settings. The API only sends tasks by name; worker/ adds the task code."""
from __future__ import annotations

from pathlib import Path

from celery import Celery

from app.core.config import Settings

RUN_JOB_TASK = "distillery.run_job"
QUEUES = ("cpu", "gpu")


def celery_config(settings: Settings) -> dict:
    conf: dict = {
        "broker_url": settings.broker_url,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": "cpu",
        "task_create_missing_queues": True,
        "task_ignore_result": True,
        "result_backend": None,
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": 3,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "task_serializer": "json",
        "accept_content": ["json"],
        "enable_utc": True,
    }
    if settings.is_embedded_broker:
        folder = settings.broker_dir
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        conf["broker_transport_options"] = {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            "store_processed": False,
            "control_folder": str(folder / "control"),
            "polling_interval": settings.broker_poll_interval_s,
        }
    else:
        conf["broker_transport_options"] = {
            "visibility_timeout": settings.visibility_timeout_s,
            "socket_connect_timeout": 3,
            "socket_timeout": 10,
        }
        conf["broker_pool_limit"] = 10
    return conf


def make_celery(settings: Settings) -> Celery:
    app = Celery("distillery", set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


def send_run_job(celery: Celery, job_id: str, queue: str) -> None:
    celery.send_task(RUN_JOB_TASK, args=[job_id], queue=queue, retry=True,
                     retry_policy={"max_retries": 2, "interval_start": 0.1, "interval_step": 0.3})


def check_broker(celery: Celery) -> None:
    """Raises when the broker cannot be reached."""
    with celery.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=2)
        _ = conn.default_channel  # opens a channel: for Redis this round-trips to the server


def queue_depth(celery: Celery, queue: str) -> int | None:
    """Messages waiting in a queue (Redis: the list's length; file-system broker: its message files)."""
    try:
        if celery.conf.broker_url.startswith("filesystem"):
            folder = Path(celery.conf.broker_transport_options["data_folder_in"])
            return sum(1 for p in folder.iterdir() if p.name.endswith(f".{queue}.msg"))
        with celery.connection_for_read() as conn:
            return int(conn.default_channel.client.llen(queue))
    except Exception:  # noqa: BLE001 - a metric, never a failure
        return None
