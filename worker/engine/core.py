"""The engine's contract with its caller: the job, the run context, the result and the one error type.

Nothing here knows about Celery, HTTP or a database: a child-process runner builds a `JobSpec` and a `RunContext`,
calls `run_job` and records the `JobResult` or the `EngineError`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path

#: Every code an EngineError may carry. Each one is terminal: the job fails at once, without a retry.
ERROR_CODES = frozenset({"invalid_model", "invalid_dataset", "unsupported", "cancelled", "result_invalid",
                         "dataset_unavailable"})


class EngineError(Exception):
    """Terminal error: the job fails at once with this code."""

    def __init__(self, code: str, message: str):
        if code not in ERROR_CODES:
            raise ValueError(f"unknown engine error code {code!r}")
        # Both go to Exception.__init__ so that the error pickles across a process boundary.
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


def first_line(exc: BaseException, limit: int = 500) -> str:
    """An exception in one line for a job's error message: its first line (else its type), at most `limit`
    characters."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:limit]


@dataclass
class RunContext:
    device: str  # "cpu" or "cuda" (already resolved)
    work_dir: Path  # a private empty folder to write outputs in
    progress: Callable[[float, str], None] = lambda p, stage: None  # p in 0..1, stage = short human message
    is_cancelled: Callable[[], bool] = lambda: False  # checked between steps


@dataclass
class JobSpec:
    kind: str  # "quantize" | "prune" | "distill"
    model_path: Path
    model_format: str  # "onnx" | "torchscript"
    dataset_path: Path | None  # an .npz, or None
    config: dict  # the job's config as JSON (validated by the API)
    builtin_dataset: str | None = None  # "mnist" | "fashion-mnist" | "digits" (instead of dataset_path)
    student_model_path: Path | None = None  # distill with {"student": {"model_id": ...}}: that model's file
    student_model_format: str | None = None

    _PATHS = ("model_path", "dataset_path", "student_model_path")

    def to_json(self) -> str:
        """The spec as a JSON object (paths as strings)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        return json.dumps({k: str(v) if k in self._PATHS and v is not None else v for k, v in data.items()})

    @classmethod
    def from_json(cls, text: str | bytes) -> JobSpec:
        """The spec `to_json` wrote; ValueError when it is not one."""
        data = json.loads(text)
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or not set(data) <= names:
            raise ValueError(f"a job spec is a JSON object with keys among {sorted(names)}")
        return cls(**{k: Path(v) if k in cls._PATHS and v is not None else v for k, v in data.items()})


@dataclass
class JobResult:
    artifact_path: Path  # a file inside ctx.work_dir
    artifact_format: str  # "onnx" | "torchscript"
    metrics: dict  # JSON-serialisable


def raise_if_cancelled(ctx: RunContext, stage: str) -> None:
    if ctx.is_cancelled():
        raise EngineError("cancelled", f"cancelled during: {stage}")


def checkpoint(ctx: RunContext, p: float, stage: str) -> None:
    """Stop here if the job was cancelled, else report progress `p` at `stage`."""
    raise_if_cancelled(ctx, stage)
    ctx.progress(p, stage)


#: Progress is reported rounded to this many decimals (0.18, not 0.18000000000000002).
PROGRESS_DECIMALS = 3


def round_progress(p: float) -> float:
    """Progress clamped to 0..1 and rounded to PROGRESS_DECIMALS decimals."""
    return round(min(max(float(p), 0.0), 1.0), PROGRESS_DECIMALS)


def scoped_context(ctx: RunContext, start: float, end: float) -> RunContext:
    """A context whose progress 0..1 maps onto start..end of the parent's, for a step that reports its own."""
    span = end - start

    def progress(p: float, stage: str) -> None:
        ctx.progress(round_progress(start + span * min(max(p, 0.0), 1.0)), stage)

    return replace(ctx, progress=progress)


def monotonic_context(ctx: RunContext) -> RunContext:
    """A context whose progress never goes backwards, stays in 0..1 and is rounded to PROGRESS_DECIMALS decimals,
    whatever the steps report (run_job reports through one, so every figure the engine gives out is rounded)."""
    last = [0.0]

    def progress(p: float, stage: str) -> None:
        last[0] = max(last[0], round_progress(p))
        ctx.progress(last[0], stage)

    return replace(ctx, progress=progress)
