"""Thin tasks: receive a job id, hand it to the supervisor."""
from __future__ import annotations

from app.core.broker import RUN_JOB_TASK
from worker.celery_app import celery
from worker.runtime import get_runtime
from worker.supervisor import run_job


@celery.task(name=RUN_JOB_TASK, bind=True, acks_late=True, ignore_result=True)
def run_job_task(self, job_id: str) -> str:
    return run_job(get_runtime(), job_id, worker_name=self.request.hostname or "worker")
