"""The job lifecycle's rules (app/jobs/lifecycle.py), on a real database (SQLite and PostgreSQL) and the real
file-system broker, without starting a worker: the supervisor's recording step is driven with the outcomes a job
process can produce (a stand-in child)."""
from __future__ import annotations

import pytest
from sqlalchemy import select

from app.core.broker import make_celery, queue_depth
from app.core.errors import InvalidTransition
from app.core.tables import ArtifactRow, JobRow, ModelRow
from app.jobs import lifecycle, repository as repo
from app.jobs.lifecycle import Move
from app.jobs.states import ErrorCode, JobStatus
from worker import supervisor
from worker.runtime import Runtime


@pytest.fixture
def rt(settings):
    runtime = Runtime(settings)
    yield runtime
    runtime.db.engine.dispose()


def _job(rt: Runtime, *, max_attempts: int = 2, queue: str = "cpu") -> str:
    with rt.db.session() as s:
        model = ModelRow(owner="o", name="m.onnx", format="onnx", size_bytes=1, sha256="0" * 64, info={})
        s.add(model)
        s.flush()
        job = repo.add(s, JobRow(owner="o", kind="quantize", status=JobStatus.queued.value, model_id=model.id,
                                 config={"method": "fp16"}, device_requested="cpu", queue=queue, progress=0.0,
                                 stage="queued", max_attempts=max_attempts))
        s.commit()
        return job.id


def _in_tx(rt: Runtime, fn):
    with rt.db.session() as s:
        out = fn(s)
        s.commit()
        return out


def _row(rt: Runtime, job_id: str) -> JobRow:
    with rt.db.session() as s:
        row = repo.get(s, job_id)
        s.expunge(row)
        return row


def test_claim_once_then_never_again(rt):
    job_id = _job(rt)
    first = _in_tx(rt, lambda s: lifecycle.claim(s, job_id, "w1", "cpu"))
    assert first is not None and first.status == JobStatus.running and first.attempts == 1 and first.worker == "w1"
    assert _in_tx(rt, lambda s: lifecycle.claim(s, job_id, "w2", "cpu")) is None
    assert _row(rt, job_id).worker == "w1"


def test_a_transient_failure_is_retried_until_attempts_run_out(rt):
    job_id = _job(rt, max_attempts=2)
    job = _in_tx(rt, lambda s: lifecycle.claim(s, job_id, "w", "cpu"))
    move = _in_tx(rt, lambda s: lifecycle.retry_or_fail(s, job, attempt=1, reason="broker hiccup", code="x"))
    assert move == Move.requeued
    row = _row(rt, job_id)
    assert (row.status, row.progress, row.worker, row.attempts) == (JobStatus.queued, 0.0, None, 1)
    job = _in_tx(rt, lambda s: lifecycle.claim(s, job_id, "w", "cpu"))
    assert job.attempts == 2
    move = _in_tx(rt, lambda s: lifecycle.retry_or_fail(s, job, attempt=2, reason="worker died",
                                                         code=ErrorCode.worker_lost))
    assert move == Move.failed
    row = _row(rt, job_id)
    assert (row.status, row.error_code) == (JobStatus.failed, ErrorCode.worker_lost)
    assert row.error_message == "worker died; gave up after 2 attempts"


def test_a_queued_job_without_attempts_left_fails_when_claimed(rt):
    job_id = _job(rt, max_attempts=1)
    job = _in_tx(rt, lambda s: lifecycle.claim(s, job_id, "w", "cpu"))
    assert not lifecycle.attempts_left(job)
    # a reaper that re-queued the last attempt (as an older version did) leaves a queued job with none left
    _in_tx(rt, lambda s: repo.requeue(s, job_id, attempt=1, reason="test"))
    assert _in_tx(rt, lambda s: lifecycle.claim(s, job_id, "w", "cpu")) is None
    row = _row(rt, job_id)
    assert (row.status, row.error_code) == (JobStatus.failed, ErrorCode.attempts_exhausted)
    assert row.error_message == "the job was tried 1 times without finishing"


def test_an_attempt_that_lost_the_job_records_nothing(rt):
    job_id = _job(rt, max_attempts=3)
    stale = _in_tx(rt, lambda s: lifecycle.claim(s, job_id, "w1", "cpu"))
    # the reaper gives the job to another worker
    assert _in_tx(rt, lambda s: lifecycle.retry_or_fail(s, stale, attempt=1, reason="lost", code="x")) == Move.requeued
    _in_tx(rt, lambda s: lifecycle.claim(s, job_id, "w2", "cpu"))
    for record in (lambda s: lifecycle.record_failure(s, job_id, 1, "engine_error", "boom"),
                   lambda s: lifecycle.record_cancelled(s, job_id, 1, "cancelled by request"),
                   lambda s: lifecycle.retry_or_fail(s, stale, attempt=1, reason="again", code="x")):
        assert _in_tx(rt, record) == Move.lost
    row = _row(rt, job_id)
    assert (row.status, row.worker, row.attempts) == (JobStatus.running, "w2", 2)


def _artifact(job_id: str) -> ArtifactRow:
    return ArtifactRow(owner="o", job_id=job_id, format="onnx", size_bytes=1, sha256="1" * 64, filename="m.fp16.onnx")


def test_a_success_records_its_artifact_only_while_the_attempt_holds_the_job(rt):
    job_id = _job(rt, max_attempts=3)
    stale = _in_tx(rt, lambda s: lifecycle.claim(s, job_id, "w1", "cpu"))
    assert _in_tx(rt, lambda s: lifecycle.retry_or_fail(s, stale, attempt=1, reason="lost", code="x")) == Move.requeued
    _in_tx(rt, lambda s: lifecycle.claim(s, job_id, "w2", "cpu"))
    assert _in_tx(rt, lambda s: lifecycle.record_success(s, job_id, 1, _artifact(job_id), {"a": 1})) == Move.lost
    with rt.db.session() as s:
        assert s.scalars(select(ArtifactRow).where(ArtifactRow.job_id == job_id)).all() == []
    assert _row(rt, job_id).status == JobStatus.running
    assert _in_tx(rt, lambda s: lifecycle.record_success(s, job_id, 2, _artifact(job_id), {"a": 2})) == Move.succeeded
    row = _row(rt, job_id)
    with rt.db.session() as s:
        (artifact,) = s.scalars(select(ArtifactRow).where(ArtifactRow.job_id == job_id)).all()
    assert (row.status, row.artifact_id, row.metrics, row.stage) == (JobStatus.succeeded, artifact.id, {"a": 2}, "done")


def test_cancel_a_queued_job_at_once_and_ask_a_running_one(rt):
    queued = _job(rt)
    done = _in_tx(rt, lambda s: lifecycle.cancel(s, repo.get(s, queued)))
    assert done.status == JobStatus.cancelled and done.error_code == "cancelled"
    with pytest.raises(InvalidTransition):
        _in_tx(rt, lambda s: lifecycle.cancel(s, repo.get(s, queued)))
    running = _job(rt)
    _in_tx(rt, lambda s: lifecycle.claim(s, running, "w", "cpu"))
    asked = _in_tx(rt, lambda s: lifecycle.cancel(s, repo.get(s, running)))
    assert asked.status == JobStatus.running and asked.cancel_requested


def test_dispatch_sends_to_the_jobs_queue_and_a_failed_send_leaves_it_for_the_reaper(rt, tmp_path):
    job_id = _job(rt, queue="gpu")
    before = queue_depth(rt.celery, "gpu")
    assert _in_tx(rt, lambda s: lifecycle.dispatch(rt.celery, s, repo.get(s, job_id), again=True))
    assert queue_depth(rt.celery, "gpu") == before + 1
    assert _row(rt, job_id).dispatched_at is not None

    unreachable = make_celery(rt.settings.model_copy(update={"broker_url": "redis://127.0.0.1:9/0"}))
    assert not _in_tx(rt, lambda s: lifecycle.dispatch(unreachable, s, repo.get(s, job_id)))
    assert _row(rt, job_id).dispatched_at is None  # the reaper's "never sent": dispatched on its next round


# ------------------------------------------------------------------ the supervisor's outcomes (a stand-in child)

def _running(rt: Runtime, **kw) -> JobRow:
    job_id = _job(rt, **kw)
    return _in_tx(rt, lambda s: lifecycle.claim(s, job_id, "w", "cpu"))


def test_a_transient_child_error_is_requeued_and_dispatched(rt):
    job = _running(rt, max_attempts=2)
    before = queue_depth(rt.celery, "cpu")
    outcome = supervisor.Outcome(supervisor.Kind.crash, ErrorCode.engine_crashed, "exited with code 1",
                                 transient=True)
    assert supervisor._record(rt, job, 1, outcome, {}) == Move.requeued
    assert _row(rt, job.id).status == JobStatus.queued
    assert queue_depth(rt.celery, "cpu") == before + 1


def test_a_transient_child_error_on_the_last_attempt_fails_with_its_own_code(rt):
    job = _running(rt, max_attempts=1)
    outcome = supervisor.Outcome(supervisor.Kind.crash, ErrorCode.engine_crashed, "exited with code 1",
                                 transient=True)
    assert supervisor._record(rt, job, 1, outcome, {}) == Move.failed
    row = _row(rt, job.id)
    assert (row.status, row.error_code, row.error_message) == (JobStatus.failed, "engine_crashed",
                                                                "exited with code 1")


@pytest.mark.parametrize("kind,code,status", [
    (supervisor.Kind.killed, ErrorCode.timeout, JobStatus.failed),
    (supervisor.Kind.killed, ErrorCode.cancelled, JobStatus.cancelled),
    (supervisor.Kind.error, ErrorCode.result_invalid, JobStatus.failed),
])
def test_final_child_outcomes(rt, kind, code, status):
    job = _running(rt, max_attempts=3)
    assert supervisor._record(rt, job, 1, supervisor.Outcome(kind, code, "why"), {}) in (Move.failed,
                                                                                         Move.cancelled)
    row = _row(rt, job.id)
    assert (row.status, row.error_code) == (status, code)


def test_a_lost_claim_writes_nothing(rt):
    job = _running(rt)
    assert supervisor._record(rt, job, 1, supervisor.Outcome(supervisor.Kind.lost), {}) == Move.lost
    row = _row(rt, job.id)
    assert (row.status, row.error_code) == (JobStatus.running, None)

