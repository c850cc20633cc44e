"""Claim a job, run it in a supervised, sandboxed child process, record progress and the outcome.

The child (`python -m worker.runner`, inside the job sandbox: worker/sandbox) gets its inputs as read-only files in
its folder's `in/`, the job on stdin, and no database, broker or object-store credentials; it reports JSON lines on
a pipe (worker/protocol.py). The child is untrusted: the supervisor bounds and validates every line, reads the
artifact only from the one fixed name in the child's work folder (no link followed, a regular file within the disk
limit), and fails the job `result_invalid` with a security event in the log when the child breaks the protocol. It
enforces the time, memory and disk limits, heartbeats the job row, honours cancellation, and writes artifact +
metrics + `succeeded` in one commit.
"""
from __future__ import annotations

import hashlib
import logging
import os
import queue
import signal
import stat
import subprocess
import threading
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO

import psutil
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from app.core.logs import child_log_spec, job_context
from app.core.storage import ContentCorrupt, StorageUnavailable
from app.core.tables import ArtifactRow, DatasetRow, JobRow, ModelRow
from app.jobs import lifecycle, repository as repo
from app.jobs.states import ErrorCode
from worker import childpool, protocol, sandbox
from worker.runtime import Runtime

log = logging.getLogger("distillery.worker")
POLL_S = 0.1
PROGRESS_MIN_INTERVAL_S = 0.25
KILL_GRACE_S = 3.0
TRANSIENT_EXIT = 75  # EX_TEMPFAIL: the child hit a transient error; the job may be retried


#: Files and folders a job's work folder may hold (the disk check walks them).
MAX_WORK_ENTRIES = 100_000


class Kind(StrEnum):
    result = "result"  # the child reported a result (checked before it is believed)
    error = "error"    # the job failed for a reason it or the worker knows (a code of ErrorCode or the engine's)
    crash = "crash"    # the child exited without a result
    killed = "killed"  # the supervisor stopped the child (a limit, a cancel)
    lost = "lost"      # the job stopped being ours (its claim expired and was taken over): nothing is recorded


@dataclass
class Outcome:
    kind: Kind
    code: str = ""
    message: str = ""
    result: protocol.Result | None = None
    transient: bool = False
    artifact: BinaryIO | None = field(default=None, repr=False)  # the checked artifact, open (kind "result")


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
    job = _with_db_retry(rt, lambda s: lifecycle.claim(s, job_id, worker_name, _device_for))
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
    pool = childpool.get_pool(rt.settings)
    refusal = next(filter(None, (pool.config.support.refusal(fmt) for fmt in (
        inputs["model_format"], inputs["student_model_format"]) if fmt)), None)
    if refusal is not None:
        return _record(rt, job, attempt, Outcome(Kind.error, ErrorCode.sandbox_unavailable, refusal), provenance)
    child = pool.take()
    try:
        outcome = _supervise(rt, job, attempt, inputs, child)
        try:
            return _record(rt, job, attempt, outcome, provenance)
        finally:
            if outcome.artifact is not None:
                outcome.artifact.close()
    finally:
        child.folder.remove()
        pool.top_up()  # the next job's process starts now that this one is over


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
                return Outcome(Kind.error, ErrorCode.input_missing, f"the {label}'s file is missing from storage")
            spec[key] = str(rt.storage.local_path(sha256))
        except FileNotFoundError:
            return Outcome(Kind.error, ErrorCode.input_missing, f"the {label}'s file is missing from storage")
        except ContentCorrupt as exc:
            return Outcome(Kind.error, ErrorCode.input_missing, f"the {label}'s stored file is corrupt: {exc.message}")
        except StorageUnavailable as exc:
            return Outcome(Kind.error, "storage_unavailable", f"could not fetch the {label}: {exc.message}",
                           transient=True)
    return spec


def _rss_tree(pid: int) -> int:
    try:
        proc = psutil.Process(pid)
        return proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
    except psutil.Error:
        return 0


def _dump_stacks(proc: subprocess.Popen, job: JobRow, folder: sandbox.JobFolder) -> None:
    """Before a job is killed for its time: its Python stacks (the runner dumps them on SIGUSR1 into its log),
    logged for the operator, so that a job that hangs says where."""
    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        runner = next((p for p in procs if p.name() != "bwrap" and "worker.runner" in " ".join(p.cmdline())), None)
        if runner is None:
            return
        size = folder.log_path.stat().st_size if folder.log_path.exists() else 0
        runner.send_signal(signal.SIGUSR1)
        time.sleep(0.5)
        with open(folder.log_path, "rb") as f:
            f.seek(size)
            stacks = f.read(20_000).decode(errors="replace")
        log.warning("job %s: over its time limit; its stacks:\n%s", job.id,
                    "\n".join(f"  | {line}" for line in stacks.splitlines()))
    except (psutil.Error, OSError):
        pass


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


_INPUT_NAMES = {"model_path": "model", "dataset_path": "dataset.npz", "student_model_path": "student_model"}


def _supervise(rt: Runtime, job: JobRow, attempt: int, spec: dict, child: childpool.Child) -> Outcome:
    settings = rt.settings
    proc, folder = child.proc, child.folder
    for key, name in _INPUT_NAMES.items():  # read-only to the child: hard links (or copies) in its in/
        if spec.get(key):
            spec[key] = str(folder.place_input(name, Path(spec[key])))
    spec["log"] = child_log_spec(settings.log_format, settings.log_level, job.id)
    job_input = protocol.JobInput(**{k: v for k, v in spec.items() if k in protocol.JobInput.model_fields})
    reports: queue.Queue = queue.Queue()
    threading.Thread(target=protocol.ReportReader(child.report_fd, reports).run, daemon=True).start()
    try:
        proc.stdin.write(job_input.model_dump_json().encode())
        proc.stdin.close()
    except BrokenPipeError:
        pass
    try:
        outcome = _Watch(rt, job, attempt, proc, reports, folder).run()
    finally:
        _kill(proc)  # a child that outlived its outcome (lost claim) must not keep running
    if outcome.kind == Kind.result:
        outcome = _checked_result(rt, job, outcome, proc.returncode, folder)
    if outcome.kind == Kind.crash:
        tail = folder.log_path.read_text(errors="replace")[-2000:] if folder.log_path.exists() else ""
        log.warning("job %s: child crashed: %s\n%s", job.id, outcome.message,
                    "\n".join(f"  | {line}" for line in tail.splitlines()))
    return outcome


def security_event(job: JobRow, message: str) -> None:
    """A job process broke the rules: logged for the operator with the job and its owner."""
    log.warning("security event: job %s of owner %s: %s", job.id, job.owner, message,
                extra={"security_event": True, "owner": job.owner})


def _checked_result(rt: Runtime, job: JobRow, outcome: Outcome, returncode: int | None,
                    folder: sandbox.JobFolder) -> Outcome:
    """The child's claimed result, once the worker itself has checked it: a clean exit, and an artifact at the one
    fixed name in its work folder (not followed through a link, a regular file with no other name, within the disk
    limit). The child is dead by now, so the file cannot change under the check."""
    if returncode != 0:
        return _violation(job, f"the job process reported a result, then exited with code {returncode}")
    try:
        outcome.artifact = open_artifact(folder, rt.settings.job_disk_limit_bytes)
    except ValueError as exc:
        return _violation(job, str(exc))
    return outcome


def _violation(job: JobRow, message: str) -> Outcome:
    security_event(job, message)
    return Outcome(Kind.error, ErrorCode.result_invalid, message)


def open_artifact(folder: sandbox.JobFolder, max_bytes: int) -> BinaryIO:
    """The artifact, open for reading; ValueError saying what is wrong with it."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    dir_fd = os.open(folder.work, flags | os.O_DIRECTORY)
    try:
        fd = os.open(sandbox.ARTIFACT_NAME, flags | os.O_NONBLOCK, dir_fd=dir_fd)
    except FileNotFoundError:
        raise ValueError("the job process reported a result but wrote no artifact") from None
    except OSError as exc:
        raise ValueError(f"the artifact cannot be opened safely ({exc.strerror}; a symbolic link?)") from None
    finally:
        os.close(dir_fd)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        problem = "the artifact is not a regular file"
    elif st.st_nlink != 1:
        problem = "the artifact has other names (hard links)"
    elif st.st_size > max_bytes:
        problem = f"the artifact is larger than the disk limit of {max_bytes} bytes"
    elif st.st_size == 0:
        problem = "the artifact is empty"
    else:
        return os.fdopen(fd, "rb")
    os.close(fd)
    raise ValueError(problem)


def _usage(root: Path) -> tuple[int, int]:
    """(bytes allocated, entries) under `root`, links not followed; stops counting past MAX_WORK_ENTRIES."""
    used, entries, stack = 0, 0, [root]
    while stack and entries <= MAX_WORK_ENTRIES:
        try:
            with os.scandir(stack.pop()) as it:
                for entry in it:
                    entries += 1
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    used += st.st_blocks * 512
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(Path(entry.path))
        except OSError:
            continue
    return used, entries


class _Watch:
    """Follows one child process: its reports, its limits, the job's heartbeat and cancellation."""

    def __init__(self, rt: Runtime, job: JobRow, attempt: int, proc: subprocess.Popen, reports: queue.Queue,
                 folder: sandbox.JobFolder):
        self.rt, self.job, self.attempt, self.proc, self.reports = rt, job, attempt, proc, reports
        self.folder = folder
        self.deadline = time.monotonic() + rt.settings.job_time_limit_s
        self.next_beat = 0.0
        self.last_progress_at = 0.0
        self.pending: tuple[float, str] | None = None
        self.final: Outcome | None = None
        self.eof = False

    def handle(self, msg) -> None:
        if msg is None:
            self.eof = True
        elif isinstance(msg, protocol.Violation):
            if self.final is None or self.final.code != ErrorCode.result_invalid:
                self.final = _violation(self.job, str(msg))
        elif self.final is not None and self.final.code == ErrorCode.result_invalid:
            return  # after a violation nothing the child says counts
        elif isinstance(msg, protocol.Progress):
            self.pending = (msg.progress, msg.stage)
        elif isinstance(msg, protocol.Device):
            _safe_db(self.rt, lambda s: repo.set_device(s, self.job.id, msg.device))
        elif isinstance(msg, protocol.Result):
            self.final = Outcome(Kind.result, result=msg)
        elif isinstance(msg, protocol.Failure):
            self.final = Outcome(Kind.error, msg.recorded_code(), msg.message, transient=msg.recorded_transient())

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
        if self.proc.returncode == 71:  # the sandbox could not be applied (its message was lost)
            return Outcome(Kind.error, ErrorCode.sandbox_unavailable, "the job sandbox could not be applied")
        rc = self.proc.returncode
        if rc == -signal.SIGKILL:
            return Outcome(Kind.crash, ErrorCode.out_of_memory,
                           "the job's process was killed by the system (most likely out of memory)")
        return Outcome(Kind.crash, ErrorCode.engine_crashed, f"the job's process exited with code {rc}",
                       transient=True)

    def check(self) -> Outcome | None:
        """Limits, heartbeat and cancellation; an Outcome when the child had to be stopped."""
        settings, now = self.rt.settings, time.monotonic()
        if now > self.deadline:
            _dump_stacks(self.proc, self.job, self.folder)
            _kill(self.proc)
            return Outcome(Kind.killed, ErrorCode.timeout,
                           f"the job exceeded its time limit of {settings.job_time_limit_s:g} s")
        rss = _rss_tree(self.proc.pid)
        if rss > settings.job_memory_limit_bytes:
            _kill(self.proc)
            return Outcome(Kind.killed, ErrorCode.out_of_memory, f"the job used {rss} bytes, over its memory limit "
                           f"of {settings.job_memory_limit_bytes} bytes")
        if now < self.next_beat:
            return None
        self.next_beat = now + settings.heartbeat_interval_s
        used, entries = _usage(self.folder.work)
        if used > settings.job_disk_limit_bytes or entries > MAX_WORK_ENTRIES:
            _kill(self.proc)
            return Outcome(Kind.killed, ErrorCode.disk_limit,
                           f"the job wrote {used} bytes in {entries} files, over its disk limit of "
                           f"{settings.job_disk_limit_bytes} bytes or {MAX_WORK_ENTRIES} files")
        beat = _safe_db(self.rt, lambda s: repo.heartbeat(s, self.job.id, self.attempt))
        if beat is None:  # database down: keep running, try again next beat
            return None
        ours, cancel = beat
        if not ours:
            _kill(self.proc)
            return Outcome(Kind.lost, message="the job was taken over (its heartbeat had expired)")
        if cancel:
            _kill(self.proc)
            return Outcome(Kind.killed, ErrorCode.cancelled, "cancelled by request")
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
            if self.final is not None and self.final.code == ErrorCode.result_invalid:
                _kill(self.proc)
                return self.final
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
    """The attempt's outcome, through the job lifecycle (app/jobs/lifecycle.py), retried while the database is
    unreachable (the work is done: worth waiting for an outage to end)."""
    if outcome.kind == Kind.lost:
        return lifecycle.Move.lost
    if outcome.kind == Kind.result:
        return _record_success(rt, job, attempt, outcome, provenance)
    if outcome.code == ErrorCode.cancelled:
        def record(s):
            return lifecycle.record_cancelled(s, job.id, attempt, outcome.message)
    elif outcome.transient:
        def record(s):
            return lifecycle.retry_or_fail(s, job, attempt=attempt, reason=outcome.message, code=outcome.code,
                                           message=outcome.message)
    else:
        def record(s):
            return lifecycle.record_failure(s, job.id, attempt, outcome.code, outcome.message)
    move = _with_db_retry(rt, record, patience_s=RECORD_PATIENCE_S)
    if move == lifecycle.Move.requeued:
        _with_db_retry(rt, lambda s: lifecycle.dispatch(rt.celery, s, job))
    return move


def store_artifact(storage, f: BinaryIO) -> tuple[str, int]:
    """Copy the open, checked artifact into the store (hashing as it goes); (sha256, size)."""
    h, n = hashlib.sha256(), 0
    out, temp = storage.new_temp()
    try:
        with out:
            while chunk := f.read(1024 * 1024):
                h.update(chunk)
                out.write(chunk)
                n += len(chunk)
        digest = h.hexdigest()
        storage.commit_temp(temp, digest)
        return digest, n
    finally:
        Path(temp).unlink(missing_ok=True)


def _record_success(rt: Runtime, job: JobRow, attempt: int, outcome: Outcome, provenance: dict) -> str:
    """Store the artifact, then artifact row + metrics + succeeded in one commit. The metrics carry the sha256 of
    every input and of the artifact, beside the library versions the engine reports, so a result can be traced."""
    result = outcome.result
    sha, size = store_artifact(rt.storage, outcome.artifact)
    fmt = result.artifact_format

    def commit(session):
        model = session.get(ModelRow, job.model_id)
        stem = Path(model.name).stem if model else "model"
        method = (job.config or {}).get("method", job.kind)
        artifact = ArtifactRow(owner=job.owner, job_id=job.id, format=fmt, size_bytes=size, sha256=sha,
                               filename=f"{stem}.{method}.{'onnx' if fmt == 'onnx' else 'pt'}")
        metrics = {**result.metrics, "provenance": {**provenance, "artifact_sha256": sha}}
        return lifecycle.record_success(session, job.id, attempt, artifact, metrics)

    move = _with_db_retry(rt, commit, patience_s=RECORD_PATIENCE_S)
    if move == lifecycle.Move.lost:
        log.warning("job %s: finished but no longer ours; result dropped", job.id)
    else:
        log.info("job %s: succeeded", job.id)
    return move
