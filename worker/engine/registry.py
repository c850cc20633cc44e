"""Methods are found through a registry keyed by (kind, method name), each with its config class.

    @register("quantize", "dynamic_int8", DynamicInt8Config, default=True)
    def quantize_dynamic_int8(job: PreparedJob, config: DynamicInt8Config, ctx: RunContext) -> Artifact: ...

A handler gets the loaded, validated model and dataset, writes its artifact under `job.work_dir` (scratch files
under `job.scratch_dir`, which is removed afterwards) and returns an `Artifact`; `run_job` then verifies and
measures it the same way for every method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .core import EngineError, RunContext

if TYPE_CHECKING:
    from .data import Dataset
    from .onnx_io import OnnxModel

MODEL_FORMATS = ("onnx", "torchscript")


@dataclass(frozen=True)
class PreparedJob:
    """What a handler works on: the loaded model, the loaded dataset (or None) and where to write."""

    model: OnnxModel
    model_format: str
    dataset: Dataset | None
    work_dir: Path
    scratch_dir: Path


@dataclass(frozen=True)
class Artifact:
    """A handler's output: the file, its format, and facts about how it was made (metrics["method"])."""

    path: Path
    format: str
    facts: dict[str, Any] = field(default_factory=dict)


Handler = Callable[[PreparedJob, Any, RunContext], Artifact]


@dataclass(frozen=True)
class Method:
    kind: str
    name: str
    config_cls: type
    handler: Handler
    input_formats: tuple[str, ...]
    output_formats: tuple[str, ...]


_METHODS: dict[tuple[str, str], Method] = {}
_DEFAULT_METHODS: dict[str, str] = {}


def register(
    kind: str,
    name: str,
    config_cls: type,
    *,
    input_formats: tuple[str, ...] = ("onnx",),
    output_formats: tuple[str, ...] = ("onnx",),
    default: bool = False,
) -> Callable[[Handler], Handler]:
    """Register `handler` for (kind, name); `default` makes it the method used when the config names none."""

    def decorator(handler: Handler) -> Handler:
        key = (kind, name)
        if key in _METHODS:
            raise ValueError(f"method {kind}/{name} is registered twice")
        _METHODS[key] = Method(kind, name, config_cls, handler, tuple(input_formats), tuple(output_formats))
        if default:
            _DEFAULT_METHODS[kind] = name
        return handler

    return decorator


def find_method(kind: str, name: str | None) -> Method:
    """The registered method, or EngineError("unsupported") naming what is available."""
    kinds = sorted({k for k, _ in _METHODS})
    if kind not in kinds:
        raise EngineError("unsupported", f"job kind {kind!r} is not supported (supported: {', '.join(kinds)})")
    if name is None:
        name = _DEFAULT_METHODS.get(kind)
    method = _METHODS.get((kind, name)) if isinstance(name, str) else None
    if method is None:
        names = sorted(n for k, n in _METHODS if k == kind)
        raise EngineError("unsupported", f"{kind} method {name!r} is not supported (supported: {', '.join(names)})")
    return method


def registered_methods() -> dict[str, list[str]]:
    """{kind: [method, ...]} for every registered method."""
    out: dict[str, list[str]] = {}
    for kind, name in sorted(_METHODS):
        out.setdefault(kind, []).append(name)
    return out
