"""The job state machine, in one table."""
from enum import StrEnum


class JobStatus(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


ALLOWED_TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.queued: frozenset({JobStatus.running, JobStatus.cancelled, JobStatus.failed}),
    # running -> queued: a retry after a transient error, or the reaper re-queueing a job whose worker died.
    JobStatus.running: frozenset({JobStatus.queued, JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled}),
    JobStatus.succeeded: frozenset(),
    JobStatus.failed: frozenset(),
    JobStatus.cancelled: frozenset(),
}

TERMINAL: frozenset[JobStatus] = frozenset(s for s, nxt in ALLOWED_TRANSITIONS.items() if not nxt)
ACTIVE: frozenset[JobStatus] = frozenset({JobStatus.queued, JobStatus.running})


def sources_of(dst: JobStatus) -> list[str]:
    """Every status from which `dst` may be reached: the WHERE clause of a conditional update."""
    return [s.value for s, nxt in ALLOWED_TRANSITIONS.items() if dst in nxt]


class ErrorCode(StrEnum):
    worker_lost = "worker_lost"
    attempts_exhausted = "attempts_exhausted"
    timeout = "timeout"
    out_of_memory = "out_of_memory"
    engine_crashed = "engine_crashed"
    cancelled = "cancelled"
    input_missing = "input_missing"
    disk_limit = "disk_limit"
    result_invalid = "result_invalid"  # also the engine's own code for an artifact that fails verification
    sandbox_unavailable = "sandbox_unavailable"
