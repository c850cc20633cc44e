"""The job's own process: `python -m worker.runner REPORT_FD`, the spec as JSON on stdin (read once the engine
is imported).

It has no database or broker credentials; it reports JSON lines on REPORT_FD: progress, device, then one
result or error. CUDA is first touched here, in a fresh interpreter, never in the worker.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    report = os.fdopen(int(argv[1]), "w", buffering=1, encoding="utf-8")

    def emit(**msg) -> None:
        report.write(json.dumps(msg, allow_nan=False) + "\n")
        report.flush()

    # Import first, then wait for the spec: a worker may start this process ahead of its job (worker/childpool.py).
    try:
        from worker.engine import EngineError, JobSpec, RunContext, run_job
    except Exception as exc:  # noqa: BLE001 - a broken install is the worker's problem, not the job's
        emit(type="error", code="engine_unavailable", message=f"the engine could not be imported: {exc}",
             transient=True)
        return 75
    raw = sys.stdin.read()
    if not raw:  # the worker discarded this spare process
        return 0
    spec = json.loads(raw)
    from app.core.logs import setup_child_logging

    setup_child_logging(spec.get("log"))  # the worker's log format, with the job id on every line
    os.chdir(spec["work_dir"])
    device = _resolve_device(spec.get("device", "auto"))
    if device is None:
        emit(type="error", code="cuda_unavailable", message="the job asked for device 'cuda' but this worker "
             "has no usable CUDA device")
        return 3
    emit(type="device", device=device)
    ctx = RunContext(device=device.split(":")[0], work_dir=Path(spec["work_dir"]),
                     progress=lambda p, stage: emit(type="progress", progress=float(p), stage=str(stage)))
    job = JobSpec(kind=spec["kind"], model_path=Path(spec["model_path"]), model_format=spec["model_format"],
                  dataset_path=Path(spec["dataset_path"]) if spec.get("dataset_path") else None,
                  config=spec.get("config") or {}, builtin_dataset=spec.get("builtin_dataset"),
                  student_model_path=Path(spec["student_model_path"]) if spec.get("student_model_path") else None,
                  student_model_format=spec.get("student_model_format"))
    try:
        result = run_job(job, ctx)
    except EngineError as exc:
        emit(type="error", code=exc.code, message=exc.message)
        return 3
    except MemoryError:
        emit(type="error", code="out_of_memory", message="the job ran out of memory")
        return 4
    except Exception as exc:  # noqa: BLE001 - an engine bug: fail the job with the message, no traceback leak
        emit(type="error", code="engine_error", message=f"{type(exc).__name__}: {exc}"[:2000])
        return 5
    emit(type="result", artifact_path=str(result.artifact_path), artifact_format=result.artifact_format,
         metrics=result.metrics)
    return 0


def _resolve_device(requested: str) -> str | None:
    """cpu -> cpu; cuda -> the first GPU or None; auto -> the first GPU if any, else cpu."""
    if requested == "cpu":
        return "cpu"
    try:
        import torch

        if torch.cuda.is_available():
            return f"cuda:0 ({torch.cuda.get_device_name(0)})"
    except Exception:  # noqa: BLE001
        pass
    return None if requested == "cuda" else "cpu"


if __name__ == "__main__":
    sys.exit(main(sys.argv))
