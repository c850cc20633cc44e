"""The worker's Celery app: the same configuration as the API's, plus the task module and worker hooks.

Run with `distillery worker` (threads pool: each task only supervises a child process that does the work).
"""
from __future__ import annotations

import sys

from celery import signals

from app.core.broker import RUN_JOB_TASK, make_celery
from app.core.config import get_settings

settings = get_settings()
celery = make_celery(settings)
celery.conf.update(imports=["worker.tasks"], worker_concurrency=settings.worker_concurrency,
                   worker_pool="threads")


@signals.setup_logging.connect
def _setup_logging(loglevel=None, **_):
    """Celery's own lines, the tasks' and ours in one format (JSON with the job id, or text): app/core/logs.py."""
    import logging

    from app.core.logs import setup_logging

    setup_logging(settings.log_format, logging.getLevelName(loglevel) if isinstance(loglevel, int)
                  else loglevel or settings.log_level)


@signals.celeryd_init.connect
def _name_log_lines(sender=None, conf=None, **_):
    from app.core.logs import set_process_field, setup_logging

    set_process_field("worker", str(sender))
    setup_logging(settings.log_format, settings.log_level)  # now: Celery warns (e.g. about root) before its set-up
    _superuser_notice(conf.accept_content if conf is not None else celery.conf.accept_content)


#: The start of the SecurityWarning that Celery's worker gives whenever it runs as root (celery.platforms).
ROOT_WARNING = "You're running the worker with superuser privileges"


def _superuser_notice(accept_content) -> None:
    """Celery warns, in six lines, whenever its worker runs as root, because a worker that accepts pickle messages
    runs whatever code a message carries, as root; with pickle accepted it refuses to start at all unless
    C_FORCE_ROOT is set (which only turns the refusal into this same warning: it never silences it). This worker
    accepts JSON only (app/core/broker.py), so that risk is absent: the warning is filtered out and one line says so
    (job processes are confined by the job sandbox, whose own line follows). Were pickle ever accepted, Celery's
    warning and refusal would stand."""
    import logging
    import os
    import warnings

    from celery.exceptions import SecurityWarning

    if any(c in accept_content for c in ("pickle", "application/x-python-serialize",
                                         "application/group-python-serialize")):
        return
    warnings.filterwarnings("ignore", message=ROOT_WARNING, category=SecurityWarning)
    if os.getuid() == 0 or os.geteuid() == 0:
        logging.getLogger("distillery.worker").info(
            "running as root: Celery's superuser warning is left out, as the risk it names (pickle messages running "
            "code) does not apply to this worker, which accepts only JSON messages; a dedicated user is still safer")


@signals.task_prerun.connect
def _log_job_id(task=None, args=None, **_):
    """Celery's own lines about a job's task (its "succeeded in") carry the job id too."""
    from app.core.logs import job_id_var

    if task is not None and task.name == RUN_JOB_TASK and args:
        job_id_var.set(str(args[0]))


@signals.task_postrun.connect
def _log_job_id_done(**_):
    from app.core.logs import job_id_var

    job_id_var.set(None)


@signals.celeryd_after_setup.connect
def _json_only(instance=None, **_):
    if settings.log_format == "json":  # every line JSON: no ASCII banner, stray prints become log records
        import celery.apps.worker as celery_worker

        from app.core.logs import write_raw_line

        instance.quiet = True
        instance.app.log.redirect_stdouts(instance.redirect_stdouts_level)
        # Celery writes its shutdown notices from signal handlers with os.write, bypassing logging: as JSON too
        celery_worker.safe_say = lambda msg, f=None: write_raw_line(f or sys.__stderr__, msg, "celery.apps.worker")


@signals.worker_ready.connect
def _start_maintenance(sender=None, **_):
    from worker.maintenance import start_maintenance

    start_maintenance(sender.hostname)
    from worker import childpool

    # The first job's process starts now, from the worker's main thread, which lives as long as the worker.
    childpool.get_pool(settings).top_up()


@signals.worker_shutting_down.connect
def _stop_maintenance(**_):
    from worker.maintenance import stop_maintenance

    stop_maintenance()
