"""The job's own process: `python -I -B -u -m worker.runner PLAN REPORT_FD`, started by the worker inside the job
sandbox (worker/sandbox), its `JobInput` as JSON on stdin (read once the engine is imported).

In this order, so that nothing of the upload is read before every layer holds:
1. resource limits and Landlock, while the process has one thread (`sandbox.confine`);
2. the engine (torch, onnx, onnxruntime) and any configured plugins are imported;
3. the system-call filter (`sandbox.confine_syscalls`);
4. the job input is read from stdin (a worker may start this process ahead of its job: worker/childpool.py), the
   job runs, and its artifact is moved to the one name the worker reads (`work/artifact`).

It has no database, broker or object-store credentials; it reports JSON lines on REPORT_FD (worker/protocol.py):
device, progress, then one result or error. CUDA is first touched here, in a fresh interpreter, never in the worker.
"""
from __future__ import annotations

import faulthandler
import os
import signal
import sys
import time
from pathlib import Path

from worker import protocol, sandbox

PROGRESS_MIN_INTERVAL_S = 0.1


class _Reporter:
    def __init__(self, fd: int):
        self.report = os.fdopen(fd, "w", buffering=1, encoding="utf-8")
        self.last_progress = (0.0, "")
        self.last_progress_at = 0.0

    def emit(self, msg) -> None:
        self.report.write(protocol.encode(msg))
        self.report.flush()

    def error(self, code: str, message: str, transient: bool = False) -> None:
        self.emit(protocol.Failure(type="error", code=code, message=message[:4000], transient=transient))

    def progress(self, p: float, stage: str) -> None:
        """At most a few lines a second: the latest progress, and every change of stage."""
        now = time.monotonic()
        stage = str(stage)[:300]
        if stage == self.last_progress[1] and p < 1.0 and now - self.last_progress_at < PROGRESS_MIN_INTERVAL_S:
            return
        self.last_progress, self.last_progress_at = (p, stage), now
        self.emit(protocol.Progress(type="progress", progress=min(max(float(p), 0.0), 1.0), stage=stage))


def main(argv: list[str]) -> int:
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the worker asks for the stacks of a job it kills
    plan = sandbox.Plan.from_json(argv[1])
    try:
        applied = sandbox.confine(plan)
    except Exception as exc:  # noqa: BLE001 - never run a job without a planned layer
        _Reporter(int(argv[2])).error("sandbox_unavailable", f"the job sandbox could not be applied: {exc}")
        return 71
    out = _Reporter(int(argv[2]))

    # Import first, then wait for the spec: a worker may start this process ahead of its job (worker/childpool.py).
    try:
        import worker.engine as engine
        from worker.engine import EngineError, JobSpec, RunContext
        from worker.plugins import load_plugins

        load_plugins(plan.plugins)  # after the engine: a plugin may register methods or wrap engine.run_job
    except Exception as exc:  # noqa: BLE001 - a broken install is the worker's problem, not the job's
        out.error("engine_unavailable", f"the engine could not be imported: {exc}", transient=True)
        return 75
    try:
        sandbox.confine_syscalls(plan, applied)
    except Exception as exc:  # noqa: BLE001
        out.error("sandbox_unavailable", f"the job sandbox could not be applied: {exc}")
        return 71
    raw = sys.stdin.buffer.read(protocol.MAX_INPUT_BYTES + 1)
    if not raw:  # the worker discarded this spare process
        return 0
    job_input = protocol.JobInput.model_validate_json(raw)
    from app.core.logs import setup_child_logging

    setup_child_logging(job_input.log)  # the worker's log format, with the job id on every line
    folder = sandbox.JobFolder(Path(plan.folder))
    device = _resolve_device(job_input.device)
    if device is None:
        out.error("cuda_unavailable", "the job asked for device 'cuda' but this worker has no usable CUDA device")
        return 3
    out.emit(protocol.Device(type="device", device=device))
    ctx = RunContext(device=device.split(":")[0], work_dir=folder.work, progress=out.progress)
    job = JobSpec(kind=job_input.kind, model_path=Path(job_input.model_path), model_format=job_input.model_format,
                  dataset_path=Path(job_input.dataset_path) if job_input.dataset_path else None,
                  config=job_input.config, builtin_dataset=job_input.builtin_dataset,
                  student_model_path=Path(job_input.student_model_path) if job_input.student_model_path else None,
                  student_model_format=job_input.student_model_format)
    try:
        result = engine.run_job(job, ctx)
        artifact = Path(result.artifact_path)
        if artifact.parent.resolve() != folder.work.resolve():
            raise RuntimeError(f"the engine wrote its artifact outside the work folder: {artifact}")
        os.replace(artifact, folder.work / sandbox.ARTIFACT_NAME)
        message = protocol.Result(type="result", artifact_format=result.artifact_format, metrics=result.metrics)
    except Exception as exc:  # noqa: BLE001 - an engine bug: fail the job with the message, no traceback leak
        if _out_of_memory(exc):
            out.error("out_of_memory", f"the job ran out of memory: {_first_line(_out_of_memory(exc))}")
            return 4
        if isinstance(exc, EngineError):
            out.error(exc.code, exc.message)
            return 3
        out.error("engine_error", f"{type(exc).__name__}: {exc}"[:2000])
        return 5
    except MemoryError as exc:
        out.error("out_of_memory", f"the job ran out of memory: {_first_line(exc)}")
        return 4
    out.emit(message)
    return 0


def _out_of_memory(exc: BaseException | None) -> BaseException | None:
    """The allocation failure behind `exc` (itself, or what it was raised from or while handling), if any: numpy's
    MemoryError, torch's OutOfMemoryError, or the CPU allocator's RuntimeError. However a step wrapped it (an
    EngineError saying the dataset or model is bad), running out of memory is what happened."""
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or (
                isinstance(exc, RuntimeError) and ("not enough memory" in str(exc) or "allocate" in str(exc)
                                                   and "memory" in str(exc))):
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def _resolve_device(requested: str) -> str | None:
    """cpu -> cpu; cuda -> the first GPU or None; auto -> the first GPU if any, else cpu."""
    if requested == "cpu":
        return "cpu"
    try:
        import torch

        if torch.cuda.is_available():
            return f"cuda:0 ({torch.cuda.get_device_name(0)[:150]})"
    except Exception:  # noqa: BLE001
        pass
    return None if requested == "cuda" else "cpu"


if __name__ == "__main__":
    sys.exit(main(sys.argv))
