"""Job processes started ahead: reused once, replaced when dead, started at the configured CPU priority."""
from __future__ import annotations

import os
from pathlib import Path

import psutil

from worker import childpool


def test_spare_is_taken_once_then_topped_up(tmp_path):
    pool = childpool.ChildPool(tmp_path / "spare", 1, nice=7)
    try:
        pool.top_up()
        spare = pool._spares[0]
        assert psutil.Process(spare.proc.pid).nice() == 7  # job work yields to the API on a shared machine
        autogroup = Path(f"/proc/{spare.proc.pid}/autogroup")
        if autogroup.exists():  # its own session's scheduling group is niced too, else nice means little
            assert autogroup.read_text().split()[-1] == "7"
        assert "DISTILLERY_DATABASE_URL" not in psutil.Process(spare.proc.pid).environ()
        work = tmp_path / "job"
        work.mkdir()
        taken = pool.take(work)
        assert taken is spare and taken.log_path.parent == work and taken.log_path.exists()
        assert pool._spares == []
        pool.top_up()
        assert len(pool._spares) == 1 and pool._spares[0].proc.pid != taken.proc.pid
    finally:
        childpool.discard(taken)
        pool.close()


def test_a_dead_spare_is_replaced_by_a_fresh_process(tmp_path):
    pool = childpool.ChildPool(tmp_path / "spare", 1)
    pool.top_up()
    dead = pool._spares[0]
    dead.proc.kill()
    dead.proc.wait()
    work = tmp_path / "job"
    work.mkdir()
    fresh = pool.take(work)
    try:
        assert fresh.proc.pid != dead.proc.pid and fresh.proc.poll() is None
        assert not dead.log_path.exists()
    finally:
        childpool.discard(fresh)
        pool.close()


def test_folders_of_dead_workers_are_swept(tmp_path):
    stale = tmp_path / "prestart" / "999999999"
    stale.mkdir(parents=True)
    childpool._sweep(tmp_path / "prestart")
    assert not stale.exists()
    live = tmp_path / "prestart" / str(os.getpid())
    live.mkdir()
    childpool._sweep(tmp_path / "prestart")
    assert live.exists()
