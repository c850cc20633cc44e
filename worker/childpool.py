"""Job processes started ahead of time.

A job runs in a fresh `python -m worker.runner` process. Importing the engine (torch, onnx, onnxruntime) takes
1-2 s, which every job would pay before doing any work. With `job_prestart` on, the worker keeps one such process
started ahead: it has imported the engine and waits for its job spec on stdin. A process is used for one job only,
then a new spare is started once that job is over (not during it, so it never competes with a running job for CPU).

The spare imports torch but never touches CUDA until it has its spec. It is started from a long-lived thread (the
worker's main thread or a pool thread), because the kernel kills it when the thread that started it exits
(PR_SET_PDEATHSIG), which is also what happens to it when the worker dies.

Job processes run at a lower CPU priority (`job_nice`): when workers share a machine with the API (`distillery
serve`, small deployments), a job's CPU-bound work yields to the API's requests instead of starving them.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

from app.core.procs import die_with_parent

log = logging.getLogger("distillery.worker")


@dataclass
class Child:
    proc: subprocess.Popen
    report_fd: int  # read end of the pipe the child reports on
    log_path: Path


# Credentials of the object store; the worker downloads inputs and uploads artifacts, never the job's process.
_SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


def child_env() -> dict[str, str]:
    """The job's process gets no database, broker or object-store credentials."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILLERY_") and k not in _SECRET_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _preexec(nice: int):
    base = die_with_parent()  # also setsid(): the child leads a new session

    def run() -> None:
        base()
        if nice:
            os.nice(nice)
            # With the kernel's autogroup scheduling (Linux's default on desktops and many servers) a new session
            # gets its own scheduling group, and CPU is shared fairly between groups whatever their processes' nice
            # values: the group itself must be niced too, or the job still takes as much CPU as the API.
            try:
                with open("/proc/self/autogroup", "w") as f:
                    f.write(str(nice))
            except OSError:
                pass

    return run


def spawn(folder: Path, nice: int = 0) -> Child:
    """Start a job process in `folder` at CPU priority `nice`; it imports the engine, then waits for its spec."""
    folder.mkdir(parents=True, exist_ok=True)
    read_fd, write_fd = os.pipe()
    log_path = folder / f"child-{uuid.uuid4().hex[:12]}.log"
    try:
        with open(log_path, "wb") as child_log:
            proc = subprocess.Popen([sys.executable, "-m", "worker.runner", str(write_fd)], stdin=subprocess.PIPE,
                                    stdout=child_log, stderr=subprocess.STDOUT, pass_fds=(write_fd,), cwd=folder,
                                    env=child_env(), preexec_fn=_preexec(nice))
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    return Child(proc, read_fd, log_path)


def discard(child: Child) -> None:
    if child.proc.poll() is None:
        child.proc.kill()
        child.proc.wait()
    os.close(child.report_fd)
    child.log_path.unlink(missing_ok=True)


class ChildPool:
    """At most `size` spare job processes, kept in `folder`, started at CPU priority `nice`."""

    def __init__(self, folder: Path, size: int, nice: int = 0):
        self.folder, self.size, self.nice = folder, size, nice
        self._spares: list[Child] = []
        self._lock = threading.Lock()

    def take(self, work_dir: Path) -> Child:
        """A spare that is still alive (its log moved into work_dir), else a freshly started process."""
        while True:
            with self._lock:
                child = self._spares.pop() if self._spares else None
            if child is None:
                return spawn(work_dir, self.nice)
            if child.proc.poll() is None:
                moved = work_dir / child.log_path.name
                os.replace(child.log_path, moved)
                child.log_path = moved
                return child
            log.warning("a spare job process had exited (code %s); starting another", child.proc.returncode)
            discard(child)

    def top_up(self) -> None:
        """Start spares until there are `size` of them. Call it from a thread that lives as long as the worker."""
        while True:
            with self._lock:
                if len(self._spares) >= self.size:
                    return
            try:
                child = spawn(self.folder, self.nice)
            except OSError as exc:
                log.warning("could not start a spare job process: %s", exc)
                return
            with self._lock:
                self._spares.append(child)

    def close(self) -> None:
        with self._lock:
            spares, self._spares = self._spares, []
        for child in spares:
            discard(child)


_pool: ChildPool | None = None
_pool_lock = threading.Lock()


def get_pool(data_dir: Path, enabled: bool, nice: int = 0) -> ChildPool:
    """This process's pool, in `<data dir>/prestart/<pid>`; folders left by dead workers are removed."""
    global _pool
    with _pool_lock:
        if _pool is None:
            root = data_dir / "prestart"
            _sweep(root)
            _pool = ChildPool(root / str(os.getpid()), 1 if enabled else 0, nice)
        return _pool


def _sweep(root: Path) -> None:
    if not root.is_dir():
        return
    for folder in root.iterdir():
        if folder.name.isdigit() and not _alive(int(folder.name)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
