"""Job processes, each in its own sandbox and folder, and one started ahead of time.

A job runs in a fresh `python -m worker.runner` process inside the job sandbox (worker/sandbox), in a folder of its
own (`<data dir>/jobs/<worker pid>/<id>/`: `in/`, `work/`, `child.log`), which is removed after the job: nothing one
job writes is seen by a later one. Importing the engine (torch, onnx, onnxruntime) takes 1-2 s, which every job
would pay before doing any work. With `job_prestart` on, the worker keeps one such process started ahead: it has
applied its sandbox, imported the engine and waits for its job input on stdin. A process is used for one job only,
then a new spare is started once that job is over (not during it, so it never competes with a running job for CPU).

The spare imports torch but never touches CUDA until it has its job. It is started from a long-lived thread (the
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
import threading
from dataclasses import dataclass, field
from pathlib import Path

from app.core.procs import die_with_parent
from worker import sandbox

log = logging.getLogger("distillery.worker")


@dataclass(frozen=True)
class ChildConfig:
    """How job processes are started: CPU priority, the sandbox's layers and mode, limits and plugins."""

    nice: int = 0
    sandbox_mode: str = "strict"
    disk_limit_bytes: int = 20 * 1024**3
    plugins: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, settings) -> "ChildConfig":
        return cls(nice=settings.job_nice, sandbox_mode=settings.job_sandbox,
                   disk_limit_bytes=settings.job_disk_limit_bytes, plugins=tuple(settings.job_plugin_paths))

    @property
    def support(self) -> sandbox.Support:
        return sandbox.support(self.sandbox_mode)


@dataclass
class Child:
    proc: subprocess.Popen
    report_fd: int  # read end of the pipe the child reports on
    folder: sandbox.JobFolder = field(repr=False)

    @property
    def log_path(self) -> Path:
        return self.folder.log_path


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


def spawn(parent: Path, config: ChildConfig) -> Child:
    """Start a sandboxed job process in a new folder under `parent`; it imports the engine, then waits for its
    job input."""
    folder = sandbox.JobFolder.create(parent)
    read_fd, write_fd = os.pipe()
    argv, env = sandbox.command(folder, "worker.runner", [str(write_fd)], config.support,
                                disk_limit_bytes=config.disk_limit_bytes, plugins=list(config.plugins))
    try:
        with open(folder.log_path, "wb") as child_log:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=child_log, stderr=subprocess.STDOUT,
                                    pass_fds=(write_fd,), cwd=folder.work, env=env,
                                    preexec_fn=_preexec(config.nice))
    except BaseException:
        os.close(read_fd)
        folder.remove()
        raise
    finally:
        os.close(write_fd)
    return Child(proc, read_fd, folder)


def discard(child: Child) -> None:
    if child.proc.poll() is None:
        child.proc.kill()
        child.proc.wait()
    try:
        os.close(child.report_fd)
    except OSError:
        pass
    child.folder.remove()


class ChildPool:
    """At most `size` spare job processes, kept under `folder`."""

    def __init__(self, folder: Path, size: int, config: ChildConfig | None = None):
        self.folder, self.size, self.config = folder, size, config or ChildConfig()
        self._spares: list[Child] = []
        self._lock = threading.Lock()

    def take(self) -> Child:
        """A spare that is still alive, else a freshly started process."""
        while True:
            with self._lock:
                child = self._spares.pop() if self._spares else None
            if child is None:
                return spawn(self.folder, self.config)
            if child.proc.poll() is None:
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
                child = spawn(self.folder, self.config)
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


def get_pool(settings) -> ChildPool:
    """This process's pool, in `<data dir>/jobs/<pid>`; folders left by dead workers are removed."""
    global _pool
    with _pool_lock:
        if _pool is None:
            root = settings.data_dir / "jobs"
            _sweep(root)
            _pool = ChildPool(root / str(os.getpid()), 1 if settings.job_prestart else 0,
                              ChildConfig.from_settings(settings))
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
