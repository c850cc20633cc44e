"""`python -m worker.sandbox.selftest PLAN CANARY WORKER_PID PORT`: run inside the job sandbox by the worker at
start-up, tries what a hostile job would, and prints one JSON object: for each check, whether the sandbox held.

Checks: read a file outside the job folder (the canary), write beside it, reach a TCP port the worker listens on,
start a process, read the worker's environment through /proc, signal the worker, find a credential in the
environment; and, as a control, write in its own work folder.
"""
from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

from worker import sandbox


def _fails(fn) -> bool:
    try:
        fn()
    except OSError:
        return True
    return False


def main(argv: list[str]) -> int:
    plan = sandbox.Plan.from_json(argv[1])
    canary, worker_pid, port = Path(argv[2]), int(argv[3]), int(argv[4])
    applied = sandbox.confine(plan)
    sandbox.confine_syscalls(plan, applied)
    folder = sandbox.JobFolder(Path(plan.folder))

    def connect() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass

    def spawn() -> None:
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)

    checks = {
        "read_outside": _fails(lambda: canary.read_bytes()),
        "write_outside": _fails(lambda: (canary.parent / "written-by-job").write_bytes(b"x")),
        "network": _fails(connect),
        "new_process": _fails(spawn),
        "worker_environ": _fails(lambda: Path(f"/proc/{worker_pid}/environ").read_bytes()),
        "signal_worker": _fails(lambda: os.kill(worker_pid, 0)),
        "no_credentials": not any(k.startswith(("DISTILLERY_", "AWS_")) for k in os.environ),
        "own_folder_writable": not _fails(lambda: (folder.work / "ok").write_bytes(b"ok")),
    }
    json.dump({"checks": checks, "applied": applied}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
