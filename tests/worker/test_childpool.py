"""Job processes: each in its own sandboxed folder, started ahead once, replaced when dead, at the configured CPU
priority, and with nothing of the worker's environment."""
from __future__ import annotations

import os
from pathlib import Path

import psutil

from worker import childpool


def _tree_env(pid: int) -> dict:
    """The environment of the job's python process (under bubblewrap, the child of the bwrap processes)."""
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    python = next((p for p in procs if "worker.runner" in " ".join(p.cmdline())), procs[-1])
    return python.environ()


def test_spare_is_taken_once_then_topped_up(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLERY_DATABASE_URL", "postgresql://secret@db/x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "canary")
    pool = childpool.ChildPool(tmp_path / "jobs", 1, childpool.ChildConfig(nice=7))
    taken = None
    try:
        pool.top_up()
        spare = pool._spares[0]
        assert psutil.Process(spare.proc.pid).nice() == 7  # job work yields to the API on a shared machine
        autogroup = Path(f"/proc/{spare.proc.pid}/autogroup")
        if autogroup.exists():  # its own session's scheduling group is niced too, else nice means little
            assert autogroup.read_text().split()[-1] == "7"
        env = _tree_env(spare.proc.pid)
        assert not any(k.startswith(("DISTILLERY_", "AWS_")) for k in env), env
        assert spare.folder.root.parent == tmp_path / "jobs" and spare.folder.work.is_dir()
        taken = pool.take()
        assert taken is spare and taken.log_path.exists()
        assert pool._spares == []
        pool.top_up()
        assert len(pool._spares) == 1 and pool._spares[0].proc.pid != taken.proc.pid
        assert pool._spares[0].folder != taken.folder  # no two processes share a folder
    finally:
        if taken is not None:
            childpool.discard(taken)
            assert not taken.folder.root.exists()
        pool.close()


def test_a_dead_spare_is_replaced_by_a_fresh_process(tmp_path):
    pool = childpool.ChildPool(tmp_path / "jobs", 1)
    pool.top_up()
    dead = pool._spares[0]
    dead.proc.kill()
    dead.proc.wait()
    fresh = pool.take()
    try:
        assert fresh.proc.pid != dead.proc.pid and fresh.proc.poll() is None
        assert not dead.folder.root.exists()
    finally:
        childpool.discard(fresh)
        pool.close()


def test_folders_of_dead_workers_are_swept(tmp_path):
    stale = tmp_path / "jobs" / "999999999"
    stale.mkdir(parents=True)
    childpool._sweep(tmp_path / "jobs")
    assert not stale.exists()
    live = tmp_path / "jobs" / str(os.getpid())
    live.mkdir()
    childpool._sweep(tmp_path / "jobs")
    assert live.exists()
