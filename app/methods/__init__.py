"""Each method's config, defined once: a pydantic class per method, torch-free, read by the API (validation,
OpenAPI schema, 422 messages), the engine (the handler receives the typed config), the capabilities and the CLI.

    from app.methods import parse_config
    config = parse_config("quantize", {"method": "static_int8", "calibration": {"samples": 256}})
    config.calibration.samples, config.needs_dataset, config.output_formats   # 256, True, ("onnx",)

Adding a method is one `MethodConfig` subclass here and one handler registered for it in the engine.
"""
from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Discriminator, Tag, TypeAdapter

from .base import (
    MODEL_FORMATS,
    BenchmarkConfig,
    CalibrationConfig,
    FineTuneConfig,
    MethodConfig,
    OutputFormat,
    StrictModel,
    registered_configs,
)
from .distill import (
    STUDENT_FORMS,
    STUDENT_TAGS,
    CnnStudent,
    DistillConfig,
    EarlyStopping,
    FeatureLoss,
    MlpStudent,
    ModelStudent,
    ShrinkStudent,
    Student,
)
from .prune import ChannelsConfig, MagnitudeConfig, PruneBase
from .quantize import AutoConfig, Bf16Config, DynamicInt8Config, Fp16Config, QuantizeBase, StaticInt8Config

KINDS: tuple[str, ...] = tuple(sorted({kind for kind, _ in registered_configs()}))


def methods_of(kind: str) -> list[str]:
    """The method names of `kind`, sorted."""
    return [name for k, name in registered_configs() if k == kind]


def default_method(kind: str) -> str | None:
    """The method a `kind` config that names none gets (None: it must name one)."""
    return next((name for (k, name), cls in registered_configs().items() if k == kind and cls.default), None)


def config_class(kind: str, method: str) -> type[MethodConfig]:
    """The config class of (kind, method); KeyError if there is none."""
    return registered_configs()[(kind, method)]


def _needs_method(kind: str) -> bool:
    """A kind with one method (distill) may leave `method` out; one with several must name it."""
    return len(methods_of(kind)) > 1


def _method_tag(kind: str):
    def tag(value: Any) -> str | None:
        if isinstance(value, BaseModel):
            return getattr(value, "method_name", None)
        if not isinstance(value, dict):
            return None
        name = value.get("method")
        if name is None and not _needs_method(kind):
            return default_method(kind)
        return name if isinstance(name, str) and (kind, name) in registered_configs() else None
    return tag


def config_union(kind: str) -> Any:
    """The type of a `kind` job's config: its methods' classes, chosen by `method` (one 422 naming the choices
    when it is missing or unknown)."""
    if not _needs_method(kind):
        return config_class(kind, methods_of(kind)[0])
    classes = [Annotated[cls, Tag(name)] for (k, name), cls in registered_configs().items() if k == kind]
    choices = ", ".join(repr(n) for n in methods_of(kind))
    union = classes[0]
    for cls in classes[1:]:
        union = union | cls  # type: ignore[operator]
    return Annotated[union, Discriminator(_method_tag(kind), custom_error_type="invalid_method",
                                          custom_error_message=f"method must be one of {choices}")]


_ADAPTERS: dict[str, TypeAdapter] = {}


def parse_config(kind: str, data: Any) -> MethodConfig:
    """`data` (a job's config as JSON) as its method's typed config; pydantic's ValidationError when it is not one,
    KeyError for an unknown kind."""
    if kind not in KINDS:
        raise KeyError(kind)
    if kind not in _ADAPTERS:
        _ADAPTERS[kind] = TypeAdapter(config_union(kind))
    return _ADAPTERS[kind].validate_python(data)


#: Tags that the discriminated unions add to validation error paths (config.<method>.x, student.<arch>.y); the
#: API drops them from the field names it reports.
UNION_TAGS = frozenset({*KINDS, *(name for _, name in registered_configs()), *STUDENT_TAGS})

__all__ = [
    "AutoConfig", "Bf16Config", "BenchmarkConfig", "CalibrationConfig", "ChannelsConfig", "CnnStudent",
    "DistillConfig", "DynamicInt8Config", "EarlyStopping", "FeatureLoss", "FineTuneConfig", "Fp16Config", "KINDS",
    "MODEL_FORMATS", "MagnitudeConfig", "MethodConfig", "MlpStudent", "ModelStudent", "OutputFormat", "PruneBase",
    "QuantizeBase", "STUDENT_FORMS", "ShrinkStudent", "StaticInt8Config", "StrictModel", "Student", "UNION_TAGS",
    "config_class", "config_union", "default_method", "methods_of", "parse_config", "registered_configs",
]
