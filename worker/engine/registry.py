"""Methods are found through a registry keyed by (kind, method name): one handler per config class.

    @register(DynamicInt8Config)
    def quantize_dynamic_int8(job: PreparedJob, config: DynamicInt8Config, ctx: RunContext) -> Artifact: ...

The config class (app/methods, torch-free, shared with the API) says the method's kind, name, the formats it reads
and writes and whether it needs a dataset; the handler receives the validated, typed config.

A handler gets the loaded, validated model and dataset, writes its artifact under `job.work_dir` (scratch files
under `job.scratch_dir`, which is removed afterwards) in `job.output_format` and returns an `Artifact`; `run_job`
then verifies and measures it the same way for every method.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from torch import nn

from app.methods import MethodConfig

from .core import EngineError, RunContext
from .data import Dataset, Feeds, batch_of, fixed_batch_size
from .measure import Evaluation, Runner
from .onnx_io import OnnxModel, OnnxRunner
from .onnx_to_fx import onnx_to_torch
from .torch_io import (
    TorchRunner,
    TorchScriptModel,
    export_torchscript,
    load_torchscript_model,
    torchscript_to_onnx,
    torchscript_to_torch,
)

MODEL_FORMATS = ("onnx", "torchscript")


@dataclass(frozen=True)
class PreparedJob:
    """What a handler works on: the upload (loaded and run once), the dataset (or None), the rows models are
    measured on, the format to write and where to write it.

    The upload in other shapes is built on first use and kept: `onnx` (the upload as ONNX), `trainable()` (a fresh
    trainable copy each call) and `runner(format)` (the upload running in that format's runtime)."""

    model: OnnxModel | TorchScriptModel  # the upload, in `model_format`
    model_format: str  # "onnx" | "torchscript"
    dataset: Dataset | None
    evaluation: Evaluation  # the test split, or seeded random rows without a dataset
    output_format: str  # the artifact's format: config.output_format, else the upload's where the method allows
    device: str  # "cpu" | "cuda"
    work_dir: Path
    scratch_dir: Path
    builtin_dataset: str | None = None
    student_model_path: Path | None = None
    student_model_format: str | None = None
    runners: dict[str, Runner] = field(default_factory=dict, repr=False, compare=False)
    #: The rows the original model was run on once before the method, and its outputs: the artifact is verified
    #: against them.
    sample: Feeds = field(default_factory=dict, repr=False, compare=False)
    reference: list = field(default_factory=list, repr=False, compare=False)

    @property
    def inputs(self):
        return self.model.inputs

    def example_feeds(self, rows: int = 2) -> Feeds:
        """`rows` rows of the training split (or of the evaluation rows); a fixed batch dim's size if the model has
        one. For tracing, exporting and counting."""
        source = self.dataset.train.x if self.dataset is not None else self.evaluation.feeds
        return batch_of(source, fixed_batch_size(self.inputs) or rows)

    @cached_property
    def onnx(self) -> OnnxModel:
        """The upload as ONNX: itself, or the TorchScript upload exported (EngineError("unsupported") if it cannot)."""
        if isinstance(self.model, OnnxModel):
            return self.model
        return torchscript_to_onnx(self.model, self.scratch_dir / "upload.onnx", self.example_feeds())

    @cached_property
    def _trainable(self) -> nn.Module:
        if isinstance(self.model, OnnxModel):
            return onnx_to_torch(self.model.proto)
        return torchscript_to_torch(self.model, self.example_feeds())

    def trainable(self) -> nn.Module:
        """A fresh trainable torch module with the upload's weights (fx GraphModule; `input_names` and
        `output_names` as the upload's). EngineError("unsupported") names an op that cannot be converted."""
        return copy.deepcopy(self._trainable)

    def runner(self, model_format: str) -> Runner:
        """The upload running in `model_format`'s runtime on the job's device (converted if needed)."""
        if model_format not in self.runners:
            self.runners[model_format] = self._make_runner(model_format)
        return self.runners[model_format]

    def _make_runner(self, model_format: str) -> Runner:
        if model_format == "onnx":
            return OnnxRunner(self.onnx, self.device, error_code="unsupported")
        if isinstance(self.model, TorchScriptModel):
            return TorchRunner(self.model, self.device)
        path = export_torchscript(self.trainable(), self.example_feeds(), self.scratch_dir / "upload.pt")
        return TorchRunner(load_torchscript_model(path, self.inputs, error_code="unsupported"), self.device)


@dataclass(frozen=True)
class Artifact:
    """A handler's output: the file, its format, and facts about how it was made (metrics["method"])."""

    path: Path
    format: str
    facts: dict[str, Any] = field(default_factory=dict)
    #: The job it was made in (set by `compress`): `measure` reuses its loaded baseline and runners.
    job: PreparedJob | None = field(default=None, repr=False, compare=False)


Handler = Callable[[PreparedJob, Any, RunContext], Artifact]


@dataclass(frozen=True)
class Method:
    """A registered method: its config class (which says its kind, name, formats and dataset rule) and handler."""

    config_cls: type[MethodConfig]
    handler: Handler
    kind: str = field(init=False)
    name: str = field(init=False)
    input_formats: tuple[str, ...] = field(init=False)
    output_formats: tuple[str, ...] = field(init=False)
    needs_dataset: bool = field(init=False)

    def __post_init__(self) -> None:
        cls = self.config_cls
        for attr, value in (("kind", cls.kind), ("name", cls.method_name), ("input_formats", cls.input_formats),
                            ("output_formats", cls.output_formats), ("needs_dataset", cls.needs_dataset)):
            object.__setattr__(self, attr, value)


_METHODS: dict[tuple[str, str], Method] = {}


def register(config_cls: type[MethodConfig]) -> Callable[[Handler], Handler]:
    """Register `handler` as the method that `config_cls` configures."""

    def decorator(handler: Handler) -> Handler:
        key = (config_cls.kind, config_cls.method_name)
        if key in _METHODS:
            raise ValueError(f"method {key[0]}/{key[1]} is registered twice")
        _METHODS[key] = Method(config_cls, handler)
        return handler

    return decorator


def find_method(kind: str, name: str | None) -> Method:
    """The registered method, or EngineError("unsupported") naming what is available."""
    kinds = sorted({k for k, _ in _METHODS})
    if kind not in kinds:
        raise EngineError("unsupported", f"job kind {kind!r} is not supported (supported: {', '.join(kinds)})")
    if name is None:
        name = default_method(kind)
    method = _METHODS.get((kind, name)) if isinstance(name, str) else None
    if method is None:
        names = sorted(n for k, n in _METHODS if k == kind)
        raise EngineError("unsupported", f"{kind} method {name!r} is not supported (supported: {', '.join(names)})")
    return method


def default_method(kind: str) -> str | None:
    """The registered method a job of `kind` gets when its config names none (None: it must name one)."""
    return next((m.name for m in all_methods() if m.kind == kind and m.config_cls.default), None)


def all_methods() -> list[Method]:
    """Every registered method, sorted by (kind, name)."""
    return [_METHODS[key] for key in sorted(_METHODS)]


def registered_methods() -> dict[str, list[str]]:
    """{kind: [method, ...]} for every registered method."""
    out: dict[str, list[str]] = {}
    for method in all_methods():
        out.setdefault(method.kind, []).append(method.name)
    return out
