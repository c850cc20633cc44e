"""A job plugin (DISTILLERY_JOB_PLUGINS) that stands in for a job process under an attacker's control.

A TorchScript model is a program; the allow-list of operators stops the known ways out (torch.save, from_file), but
the sandbox must hold even if one day it does not. So this plugin does, in Python inside the real job process, what
such a model would do once it ran code, whenever the uploaded model's bytes carry one of these markers:

- PROBE: try every way out (files outside the work folder, code another process would import, the worker's
  environment and credentials, the database file, other owners' files, the network, new processes, signals) and
  report which worked as the job's error message, `probe:{"attempt": succeeded, ...}`;
- FORGE_PATH: the attack run's forged result: a result line naming `/proc/self/environ` as the artifact, written
  straight to the report pipe, then a crash;
- FORGE_LINK: a well-formed result, with `work/artifact` a symbolic link to the worker's environment;
- DISK: fill the work folder with files each under the per-file limit, then wait to be stopped.

Models without a marker run normally, so the same worker serves other jobs.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
from pathlib import Path

import worker.engine as engine

PROBE = b"hostile-probe-marker"
FORGE_PATH = b"hostile-forge-path-marker"
FORGE_LINK = b"hostile-forge-link-marker"
DISK = b"hostile-disk-marker"
SECRET = "canary-secret-0f3a9c"  # the tests give the worker this as AWS_SECRET_ACCESS_KEY
CANARY = "distillery_canary_written_by_job.py"

_real_run_job = engine.run_job


def run_job(spec, ctx):
    data = Path(spec.model_path).read_bytes()
    if PROBE in data:
        _report({"type": "error", "code": "engine_error", "message": "probe:" + json.dumps(_probe(ctx))})
        os._exit(5)
    if FORGE_PATH in data:
        _report({"type": "result", "artifact_path": "/proc/self/environ", "artifact_format": "onnx",
                 "metrics": {"baseline": {}, "result": {}, "ratios": {}}})
        os.abort()
    if FORGE_LINK in data:
        os.symlink(f"/proc/{os.getppid()}/environ", Path(ctx.work_dir) / "artifact")
        _report({"type": "result", "artifact_format": "onnx", "metrics": {"baseline": {}, "result": {}}})
        os._exit(0)
    if DISK in data:
        for i in range(256):  # 256 MiB at most; the supervisor stops it long before
            (Path(ctx.work_dir) / f"fill-{i}").write_bytes(b"\xff" * (1024 * 1024))
        threading.Event().wait()  # until the worker kills the process
    return _real_run_job(spec, ctx)


if __name__.startswith("distillery_plugin_"):  # loaded by a job process (worker/plugins.py), not by a test's import
    engine.run_job = run_job


def _report(msg: dict) -> None:
    os.write(int(sys.argv[2]), (json.dumps(msg) + "\n").encode())


def _worked(fn) -> bool:
    try:
        return fn() is not False
    except (OSError, RuntimeError, ValueError):
        return False


def _probe(ctx) -> dict[str, bool]:
    import torch

    work = Path(ctx.work_dir)
    folder = work.parent  # <data dir>/jobs/<worker pid>/<id>
    spares, data_dir = folder.parent, folder.parents[2]
    code = Path(engine.__file__).resolve().parents[2]
    site = Path(json.__file__).resolve().parent.parent
    out: dict[str, bool] = {}

    # Code another process would import: the next job process's folder, the code, the installation.
    for name, where in (("write_spares_folder", spares), ("write_data_dir", data_dir), ("write_code", code / "worker"),
                        ("write_stdlib", site), ("write_site_packages", Path(torch.__file__).parents[1])):
        out[name] = _worked(lambda where=where: (where / CANARY).write_text("print('pwned')"))
    out["torch_from_file_outside"] = _worked(
        lambda: torch.from_file(str(data_dir / f"{CANARY}.from_file"), shared=True, size=16).fill_(1))
    out["torch_save_outside"] = _worked(lambda: torch.save(torch.zeros(1), str(data_dir / f"{CANARY}.save")))

    # Secrets: the worker's environment and its files.
    out["credentials_in_own_env"] = any(k.startswith(("DISTILLERY_", "AWS_")) for k in os.environ) or any(
        SECRET in v for v in os.environ.values())

    def read_environs() -> bool:
        found = False
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    found |= SECRET.encode() in Path(f"/proc/{entry}/environ").read_bytes()
                except OSError:
                    continue
        return found or False

    out["read_any_environ_with_secret"] = _worked(read_environs)
    out["read_parent_environ"] = _worked(lambda: Path(f"/proc/{os.getppid()}/environ").read_bytes() and True)
    out["read_database_file"] = _worked(lambda: (data_dir / "distillery.db").read_bytes()[:16] and True)
    out["list_storage"] = _worked(lambda: bool(os.listdir(data_dir / "storage" / "objects")))
    out["list_other_jobs"] = _worked(lambda: bool(os.listdir(spares)))

    # The network (PostgreSQL and Redis listen here) and other processes.
    for name, port in (("connect_postgres", 5432), ("connect_redis", 6379)):
        out[name] = _worked(lambda port=port: socket.create_connection(("127.0.0.1", port), timeout=2).close())
    def fork() -> None:
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)

    out["fork"] = _worked(fork)
    out["exec_shell"] = _worked(lambda: os.execv("/bin/sh", ["sh", "-c", "true"]))
    out["signal_parent"] = _worked(lambda: os.kill(os.getppid(), 0))

    # The control: the job may write in its own work folder (else every attempt above fails vacuously).
    out["control_write_own_work"] = _worked(lambda: (work / "mine.txt").write_text("ok"))
    return out
