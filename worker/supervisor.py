"""Claim a job, run it in a supervised child process, record progress and the outcome.

The child (`python -m worker.runner`) gets the model path and config on stdin and no database or broker
credentials; it reports progress as JSON lines on a pipe. The supervisor enforces the time and memory limits,
heartbeats the job row, honours cancellation, and writes artifact + metrics + `succeeded` in one commit.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from app.core.broker import send_run_job
from app.core.logs import child_log_spec, job_context
from app.core.storage import ContentCorrupt, StorageUnavailable
from app.core.tables import ArtifactRow, DatasetRow, JobRow, ModelRow
from app.jobs import repository as repo
from app.jobs.states import ErrorCode, JobStatus
from worker import childpool
from worker.runtime import Runtime

log = logging.getLogger("distillery.worker")
POLL_S = 0.1
PROGRESS_MIN_INTERVAL_S = 0.25
KILL_GRACE_S = 3.0
TRANSIENT_EXIT = 75  # EX_TEMPFAIL: the child hit a transient error; the job may be retried


@dataclass
class Outcome:
    kind: str  # "result" | "error" | "crash" | "killed"
    code: str = ""
    message: str = ""
    result: dict = field(default_factory=dict)
    transient: bool = False


# How long a finished job's outcome (artifact row + metrics + succeeded, or its failure) is retried while the
# database is unreachable: the work is done, so it is worth waiting for an outage to end rather than redoing it.
RECORD_PATIENCE_S = 900.0


def _db_unreachable(exc: BaseException) -> bool:
    return isinstance(exc, (OperationalError, InterfaceError)) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated)


def _with_db_retry(rt: Runtime, fn, *, attempts: int = 8, patience_s: float | None = None):
    """Run fn(session) in a fresh transaction, retrying while the database is unreachable: `attempts` times with
    back-off up to 10 s, or (`patience_s`) until that many seconds have passed, with back-off capped at a quarter of
    worker_lost_after_s so the write lands within the reapers' grace after the database returns."""
    delay = 0.5 if patience_s is None else 0.25
    cap = 10.0 if patience_s is None else max(0.25, min(5.0, rt.settings.worker_lost_after_s / 4))
    deadline = None if patience_s is None else time.monotonic() + patience_s
    i = 0
    while True:
        i += 1
        try:
            with rt.db.session() as session:
                out = fn(session)
                session.commit()
                return out
        except DBAPIError as exc:
            out_of_tries = i >= attempts if deadline is None else time.monotonic() + delay > deadline
            if not _db_unreachable(exc) or out_of_tries:
                raise
            log.warning("database unavailable (%s); retrying in %.1fs", exc.orig, delay)
            time.sleep(delay)
            delay = min(delay * 2, cap)


def _device_for(job: JobRow) -> str:
    return "cuda" if job.queue == "gpu" or job.device_requested == "cuda" else "cpu"


def run_job(rt: Runtime, job_id: str, worker_name: str) -> str:
    with job_context(job_id):  # every line logged while this job is claimed, run and recorded names it
        return _run_job(rt, job_id, worker_name)


def _run_job(rt: Runtime, job_id: str, worker_name: str) -> str:
    job = _with_db_retry(rt, lambda s: _claim(s, job_id, worker_name))
    if job is None:
        return "skipped"
    log.info("job %s: claimed (attempt %d/%d)", job_id, job.attempts, job.max_attempts)
    attempt = job.attempts
    inputs = _with_db_retry(rt, lambda s: _inputs(rt, s, job))
    if not isinstance(inputs, Outcome):
        inputs = _fetch_inputs(rt, inputs)  # outside the transaction: a download from object storage may be long
    if isinstance(inputs, Outcome):
        return _record(rt, job, attempt, inputs, {})
    provenance = inputs.pop("provenance")
    return _record(rt, job, attempt, _supervise(rt, job, attempt, inputs), provenance)


def _claim(session, job_id: str, worker_name: str) -> JobRow | None:
    current = repo.get(session, job_id)
    if current is None or current.status != JobStatus.queued:
        return None
    if current.attempts >= current.max_attempts:
        repo.fail(session, job_id, ErrorCode.attempts_exhausted,
                  f"the job was tried {current.attempts} times without finishing")
        return None
    return repo.claim(session, job_id, worker_name, _device_for(current))


def _inputs(rt: Runtime, session, job: JobRow) -> dict | Outcome:
    model = session.get(ModelRow, job.model_id)
    dataset = session.get(DatasetRow, job.dataset_id) if job.dataset_id else None
    student = session.get(ModelRow, job.student_model_id) if job.student_model_id else None
    fetch = {f"{label.replace(' ', '_')}_path": (label, row.sha256)
             for label, row in (("model", model), ("dataset", dataset), ("student model", student)) if row is not None}
    return {"kind": job.kind, "fetch": fetch, "model_path": None, "model_format": model.format,
            "model_name": model.name, "dataset_path": None, "config": job.config,
            "builtin_dataset": job.builtin_dataset, "student_model_path": None,
            "student_model_format": student.format if student else None, "device": job.device_requested,
            "provenance": {f"{label.replace(' ', '_')}_sha256": row.sha256 for label, row in (
                ("model", model), ("dataset", dataset), ("student model", student)) if row is not None}}


def _fetch_inputs(rt: Runtime, spec: dict) -> dict | Outcome:
    """Local files for the job's inputs: the store's own files, or (object storage) copies downloaded into the
    worker's cache and checked against their sha256."""
    for key, (label, sha256) in spec.pop("fetch").items():
        try:
            if not rt.storage.exists(sha256):
                return Outcome("error", ErrorCode.input_missing, f"the {label}'s file is missing from storage")
            spec[key] = str(rt.storage.local_path(sha256))
        except FileNotFoundError:
            return Outcome("error", ErrorCode.input_missing, f"the {label}'s file is missing from storage")
        except ContentCorrupt as exc:
            return Outcome("error", ErrorCode.input_missing, f"the {label}'s stored file is corrupt: {exc.message}")
        except StorageUnavailable as exc:
            return Outcome("error", "storage_unavailable", f"could not fetch the {label}: {exc.message}",
                           transient=True)
    return spec


def _reader(fd: int, out: queue.Queue) -> None:
    with os.fdopen(fd, "r", encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                out.put(json.loads(line))
            except json.JSONDecodeError:
                continue
    out.put(None)


def _rss_tree(pid: int) -> int:
    try:
        proc = psutil.Process(pid)
        return proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
    except psutil.Error:
        return 0


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(KILL_GRACE_S)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def _supervise(rt: Runtime, job: JobRow, attempt: int, spec: dict) -> Outcome:
    settings = rt.settings
    work_dir = settings.data_dir / "work" / f"{job.id}-{attempt}"
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    spec["work_dir"] = str(work_dir)
    spec["log"] = child_log_spec(settings.log_format, settings.log_level, job.id)
    pool = childpool.get_pool(settings.data_dir, settings.job_prestart, settings.job_nice)
    child = pool.take(work_dir)
    proc, log_path = child.proc, child.log_path
    reports: queue.Queue = queue.Queue()
    threading.Thread(target=_reader, args=(child.report_fd, reports), daemon=True).start()
    try:
        proc.stdin.write(json.dumps(spec).encode())
        proc.stdin.close()
    except BrokenPipeError:
        pass
    try:
        outcome = _Watch(rt, job, attempt, proc, reports).run()
    finally:
        _kill(proc)  # a child that outlived its outcome (lost claim) must not keep running
    if outcome.kind == "crash":
        tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
        log.warning("job %s: child crashed: %s\n%s", job.id, outcome.message, tail)
    pool.top_up()  # the next job's process starts now that this one is over
    return outcome


class _Watch:
    """Follows one child process: its reports, its limits, the job's heartbeat and cancellation."""

    def __init__(self, rt: Runtime, job: JobRow, attempt: int, proc: subprocess.Popen, reports: queue.Queue):
        self.rt, self.job, self.attempt, self.proc, self.reports = rt, job, attempt, proc, reports
        self.deadline = time.monotonic() + rt.settings.job_time_limit_s
        self.next_beat = 0.0
        self.last_progress_at = 0.0
        self.pending: tuple[float, str] | None = None
        self.final: Outcome | None = None
        self.eof = False

    def handle(self, msg: dict | None) -> None:
        if msg is None:
            self.eof = True
            return
        kind = msg.get("type")
        if kind == "progress":
            self.pending = (float(msg.get("progress", 0.0)), str(msg.get("stage", "")))
        elif kind == "device":
            device = str(msg.get("device", ""))
            _safe_db(self.rt, lambda s: repo.set_device(s, self.job.id, device))
        elif kind == "result":
            self.final = Outcome("result", result=msg)
        elif kind == "error":
            self.final = Outcome("error", str(msg.get("code", "engine_error")), str(msg.get("message", "")),
                                 transient=bool(msg.get("transient")))

    def flush_progress(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.pending and (force or now - self.last_progress_at >= PROGRESS_MIN_INTERVAL_S):
            progress, stage = self.pending
            _safe_db(self.rt, lambda s: repo.record_progress(s, self.job.id, self.attempt, progress, stage))
            self.pending, self.last_progress_at = None, now

    def exited(self) -> Outcome:
        while not self.eof:  # drain what the child wrote before it exited
            try:
                self.handle(self.reports.get(timeout=5.0))
            except queue.Empty:
                break
        self.flush_progress(force=True)
        if self.final is not None:
            return self.final
        rc = self.proc.returncode
        if rc == -signal.SIGKILL:
            return Outcome("crash", ErrorCode.out_of_memory,
                           "the job's process was killed by the system (most likely out of memory)")
        return Outcome("crash", ErrorCode.engine_crashed, f"the job's process exited with code {rc}",
                       transient=True)

    def check(self) -> Outcome | None:
        """Limits, heartbeat and cancellation; an Outcome when the child had to be stopped."""
        settings, now = self.rt.settings, time.monotonic()
        if now > self.deadline:
            _kill(self.proc)
            return Outcome("killed", ErrorCode.timeout,
                           f"the job exceeded its time limit of {settings.job_time_limit_s:g} s")
        rss = _rss_tree(self.proc.pid)
        if rss > settings.job_memory_limit_bytes:
            _kill(self.proc)
            return Outcome("killed", ErrorCode.out_of_memory, f"the job used {rss} bytes, over its memory limit "
                           f"of {settings.job_memory_limit_bytes} bytes")
        if now < self.next_beat:
            return None
        self.next_beat = now + settings.heartbeat_interval_s
        beat = _safe_db(self.rt, lambda s: repo.heartbeat(s, self.job.id, self.attempt))
        if beat is None:  # database down: keep running, try again next beat
            return None
        ours, cancel = beat
        if not ours:
            _kill(self.proc)
            return Outcome("killed", "lost_claim", "the job was taken over (its heartbeat had expired)")
        if cancel:
            _kill(self.proc)
            return Outcome("killed", ErrorCode.cancelled, "cancelled by request")
        return None

    def run(self) -> Outcome:
        while True:
            try:
                self.handle(self.reports.get(timeout=POLL_S))
            except queue.Empty:
                pass
            self.flush_progress()
            if self.proc.poll() is not None:
                return self.exited()
            stopped = self.check()
            if stopped is not None:
                return stopped


def _safe_db(rt: Runtime, fn):
    """Progress and heartbeats: best effort while the database is down (the job keeps running)."""
    try:
        with rt.db.session() as session:
            out = fn(session)
            session.commit()
            return out
    except DBAPIError as exc:
        if not _db_unreachable(exc):
            raise
        log.warning("could not record progress: %s", exc.orig)
        return None


def _record(rt: Runtime, job: JobRow, attempt: int, outcome: Outcome, provenance: dict) -> str:
    work_dir = rt.settings.data_dir / "work" / f"{job.id}-{attempt}"
    try:
        if outcome.code == "lost_claim":
            return "lost"
        if outcome.kind == "result":
            return _record_success(rt, job, attempt, outcome.result, provenance)
        if outcome.code == ErrorCode.cancelled:
            _with_db_retry(rt, lambda s: repo.fail(s, job.id, ErrorCode.cancelled, outcome.message, attempt=attempt,
                                                   status=JobStatus.cancelled), patience_s=RECORD_PATIENCE_S)
            return "cancelled"
        if outcome.transient and attempt < job.max_attempts:
            requeued = _with_db_retry(rt, lambda s: repo.requeue(s, job.id, attempt=attempt, reason=outcome.message),
                                      patience_s=RECORD_PATIENCE_S)
            if requeued is not None:
                send_run_job(rt.celery, job.id, job.queue)
            return "requeued"
        _with_db_retry(rt, lambda s: repo.fail(s, job.id, outcome.code, outcome.message, attempt=attempt),
                       patience_s=RECORD_PATIENCE_S)
        return "failed"
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def _record_success(rt: Runtime, job: JobRow, attempt: int, result: dict, provenance: dict) -> str:
    """Store the artifact, then artifact row + metrics + succeeded in one commit. The metrics carry the sha256 of
    every input and of the artifact, beside the library versions the engine reports, so a result can be traced."""
    path = Path(result["artifact_path"])
    sha, size = rt.storage.put_file(path)
    fmt = str(result.get("artifact_format", "onnx"))

    def commit(session):
        model = session.get(ModelRow, job.model_id)
        stem = Path(model.name).stem if model else "model"
        method = (job.config or {}).get("method", job.kind)
        artifact = ArtifactRow(owner=job.owner, job_id=job.id, format=fmt, size_bytes=size, sha256=sha,
                               filename=f"{stem}.{method}.{'onnx' if fmt == 'onnx' else 'pt'}")
        metrics = {**result.get("metrics", {}), "provenance": {**provenance, "artifact_sha256": sha}}
        return repo.succeed(session, job.id, attempt, artifact, metrics)

    done = _with_db_retry(rt, commit, patience_s=RECORD_PATIENCE_S)
    if done is None:
        log.warning("job %s: finished but no longer ours; result dropped", job.id)
        return "lost"
    log.info("job %s: succeeded", job.id)
    return "succeeded"
