"""The hand-off between the worker and a job process, typed on both sides.

The worker writes one `JobInput` (JSON, bounded) to the process's stdin. The process writes JSON lines on its report
pipe: `Device`, any number of `Progress`, then exactly one `Result` or `Failure`, and exits.

The process is untrusted (its model may be a program, see worker/sandbox), so the worker believes nothing it says:
`ReportReader` bounds the length and number of lines, and `parse_report` validates each line against these models
(unknown fields, wrong types, oversized or non-finite values, and lines out of order are violations). A violation
fails the job `result_invalid` and is logged as a security event. The artifact is never named by the process: it
is `work/artifact` in the process's folder (worker/sandbox.ARTIFACT_NAME), checked by the worker itself.
"""
from __future__ import annotations

import json
import math
import os
import queue
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

#: Longest line the worker reads from a job process (the result line with its metrics is the longest).
MAX_LINE_BYTES = 4 * 1024 * 1024
#: Most lines a job process may write (progress is throttled by the process to a few lines a second).
MAX_LINES = 200_000
#: Largest job input the process reads from stdin.
MAX_INPUT_BYTES = 1024 * 1024
#: Shape bounds of a result's metrics.
MAX_METRICS_DEPTH = 12
MAX_METRICS_ITEMS = 100_000
MAX_STRING = 20_000

#: Codes a job process may fail a job with; any other is recorded as engine_error.
CHILD_ERROR_CODES = frozenset({"invalid_model", "invalid_dataset", "unsupported", "result_invalid",
                               "dataset_unavailable", "out_of_memory", "engine_error", "engine_unavailable",
                               "cuda_unavailable", "sandbox_unavailable", "labels_out_of_range"})
#: Of those, the ones worth another attempt (a broken install may be fixed by the next worker).
TRANSIENT_CHILD_CODES = frozenset({"engine_unavailable"})
ARTIFACT_FORMATS = ("onnx", "torchscript")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class JobInput(_Strict):
    """What the worker tells a job process: the job, and where its inputs are (inside the process's `in/`)."""

    kind: str = Field(max_length=64)
    model_path: str
    model_format: str = Field(max_length=32)
    dataset_path: str | None = None
    config: dict = Field(default_factory=dict)
    builtin_dataset: str | None = Field(None, max_length=64)
    student_model_path: str | None = None
    student_model_format: str | None = Field(None, max_length=32)
    device: str = Field("auto", max_length=16)
    log: dict | None = None


class Device(_Strict):
    type: Literal["device"]
    device: str = Field(max_length=200, pattern=r"^(cpu|cuda:\d{1,3}( \([^\x00-\x1f]{0,160}\))?)$")


class Progress(_Strict):
    type: Literal["progress"]
    progress: float = Field(ge=0.0, le=1.0, allow_inf_nan=False)
    stage: str = Field(max_length=300)

    @field_validator("stage")
    @classmethod
    def _printable(cls, v: str) -> str:
        return _printable(v)


class Result(_Strict):
    type: Literal["result"]
    artifact_format: Literal["onnx", "torchscript"]
    metrics: dict[str, Any]

    @field_validator("metrics")
    @classmethod
    def _bounded(cls, v: dict) -> dict:
        check_metrics(v)
        return v


class Failure(_Strict):
    type: Literal["error"]
    code: str = Field(max_length=64, pattern=r"^[a-z_]{1,64}$")
    message: str = Field(max_length=4000)
    transient: bool = False

    @field_validator("message")
    @classmethod
    def _printable(cls, v: str) -> str:
        return _printable(v)

    def recorded_code(self) -> str:
        return self.code if self.code in CHILD_ERROR_CODES else "engine_error"

    def recorded_transient(self) -> bool:
        return self.transient and self.code in TRANSIENT_CHILD_CODES


Message = Annotated[Union[Device, Progress, Result, Failure], Field(discriminator="type")]
_message = TypeAdapter(Message)


class Violation(Exception):
    """The job process broke the protocol (a forged, oversized or malformed report)."""


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() or c == "\n" else " " for c in text)


def check_metrics(value: Any, depth: int = 0, count: list[int] | None = None) -> None:
    """A result's metrics: JSON values only, finite numbers, bounded depth, item count and string length."""
    count = count if count is not None else [0]
    count[0] += 1
    if count[0] > MAX_METRICS_ITEMS:
        raise ValueError(f"the metrics hold more than {MAX_METRICS_ITEMS} values")
    if depth > MAX_METRICS_DEPTH:
        raise ValueError(f"the metrics nest deeper than {MAX_METRICS_DEPTH}")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str) or len(key) > 200:
                raise ValueError("a metrics key is not a short string")
            check_metrics(item, depth + 1, count)
    elif isinstance(value, list):
        for item in value:
            check_metrics(item, depth + 1, count)
    elif isinstance(value, str):
        if len(value) > MAX_STRING:
            raise ValueError(f"a metrics string is longer than {MAX_STRING} characters")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("the metrics hold a non-finite number")
    elif value is not None and not isinstance(value, (bool, int)):
        raise ValueError(f"the metrics hold a {type(value).__name__}")


def parse_report(line: bytes) -> Device | Progress | Result | Failure:
    """One report line, validated; Violation otherwise."""
    try:
        return _message.validate_python(json.loads(line))
    except (ValueError, ValidationError, RecursionError) as exc:
        raise Violation(f"the job process wrote an invalid report line: {_short(exc)}") from None


def _short(exc: BaseException) -> str:
    if isinstance(exc, ValidationError) and exc.errors():
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        return f"{where}: {first.get('msg', '')}"[:300]
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


class ReportReader:
    """Reads a job process's report pipe into a queue: validated messages, then None at the end of the pipe, or a
    Violation (then None) as soon as the process breaks the protocol. Memory stays bounded by MAX_LINE_BYTES."""

    def __init__(self, fd: int, out: queue.Queue, *, max_line_bytes: int = MAX_LINE_BYTES,
                 max_lines: int = MAX_LINES):
        self.fd, self.out, self.max_line_bytes, self.max_lines = fd, out, max_line_bytes, max_lines

    def run(self) -> None:
        try:
            self._read()
        except Violation as exc:
            self.out.put(exc)
        finally:
            os.close(self.fd)
            self.out.put(None)

    def _read(self) -> None:
        buf = bytearray()
        lines = 0
        finished = False
        while chunk := os.read(self.fd, 65536):
            buf += chunk
            while (end := buf.find(b"\n")) >= 0:
                line = bytes(buf[:end])
                del buf[:end + 1]
                lines += 1
                if lines > self.max_lines:
                    raise Violation(f"the job process wrote more than {self.max_lines} report lines")
                if finished:
                    raise Violation("the job process wrote after its result")
                msg = parse_report(line)
                finished = isinstance(msg, (Result, Failure))
                self.out.put(msg)
            if len(buf) > self.max_line_bytes:
                raise Violation(f"the job process wrote a report line longer than {self.max_line_bytes} bytes")
        # A partial last line (the process died mid-write) is dropped: the exit code tells what happened.


def encode(msg: BaseModel) -> str:
    """A message as the job process writes it: one line of JSON."""
    return json.dumps(msg.model_dump(mode="json"), allow_nan=False, separators=(",", ":")) + "\n"
