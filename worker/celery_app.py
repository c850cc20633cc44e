"""The worker's Celery app: the same configuration as the API's, plus the task module and worker hooks.

Run with `distillery worker` (threads pool: each task only supervises a child process that does the work).
"""
from __future__ import annotations

from celery import signals

from app.core.broker import make_celery
from app.core.config import get_settings

settings = get_settings()
celery = make_celery(settings)
celery.conf.update(imports=["worker.tasks"], worker_concurrency=settings.worker_concurrency,
                   worker_pool="threads")


@signals.worker_ready.connect
def _start_maintenance(sender=None, **_):
    from worker.maintenance import start_maintenance

    start_maintenance(sender.hostname)


@signals.worker_shutting_down.connect
def _stop_maintenance(**_):
    from worker.maintenance import stop_maintenance

    stop_maintenance()
