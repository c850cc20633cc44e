"""Method configs are data: frozen dataclasses built from the job's JSON config, with the defaults filled in.

Every method's config derives from `MethodConfig` (the keys every method shares). `from_dict` fills missing keys
with defaults, checks types and ranges, and ignores keys it does not know (the API's schema owns the public shape;
"method" selects the config class and is not part of it). A bad value raises EngineError("unsupported").
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from .core import EngineError

C = TypeVar("C", bound="ConfigBase")


class ConfigError(ValueError):
    """A config value out of range (raised by `validate`; reported as EngineError("unsupported"))."""


class ConfigBase:
    """from_dict/to_dict for a (nested) config dataclass."""

    @classmethod
    def from_dict(cls: type[C], data: dict | None) -> C:
        try:
            return _build(cls, data or {}, where="config")
        except ConfigError as exc:
            raise EngineError("unsupported", f"invalid config: {exc}") from None

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))  # type: ignore[call-overload]

    def validate(self) -> None:
        """Raise ConfigError for a value out of range; nested configs validate themselves."""


@dataclass(frozen=True)
class BenchmarkConfig(ConfigBase):
    batch_sizes: tuple[int, ...] = (1, 64)
    repeats: int = 50
    warmup: int = 5

    def validate(self) -> None:
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ConfigError("benchmark.batch_sizes must be a non-empty list of integers >= 1")
        if self.repeats < 1:
            raise ConfigError("benchmark.repeats must be >= 1")
        if self.warmup < 0:
            raise ConfigError("benchmark.warmup must be >= 0")


@dataclass(frozen=True)
class CalibrationConfig(ConfigBase):
    samples: int = 512
    method: Literal["minmax", "entropy", "percentile"] = "minmax"

    def validate(self) -> None:
        if self.samples < 1:
            raise ConfigError("calibration.samples must be >= 1")


@dataclass(frozen=True)
class FineTuneConfig(ConfigBase):
    """Training after pruning: Adam, batch 128, seeded; with `distill` the original model is the teacher."""

    epochs: int = 1
    lr: float = 0.001
    distill: bool = True

    def validate(self) -> None:
        if self.epochs < 1:
            raise ConfigError("fine_tune.epochs must be >= 1")
        if self.lr <= 0:
            raise ConfigError("fine_tune.lr must be > 0")


@dataclass(frozen=True)
class MethodConfig(ConfigBase):
    """Keys every method shares: how to measure, the accuracy budget and the artifact's format (None: the upload's
    format where the method can write it, else ONNX)."""

    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    max_accuracy_drop: float = 0.01
    output_format: Literal["onnx", "torchscript"] | None = None

    def validate(self) -> None:
        if self.max_accuracy_drop < 0:
            raise ConfigError("max_accuracy_drop must be >= 0")


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            values[f.name] = _coerce(data[f.name], hints[f.name], f"{where}.{f.name}" if where != "config" else f.name)
    config = cls(**values)
    config.validate()
    return config


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):  # X | None: null (or absent) means "not given"
        if value is None:
            return None
        (inner,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return _coerce(value, inner, where)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{where} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if origin is tuple:
        item_hint = typing.get_args(hint)[0]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {type(value).__name__}")
        return tuple(_coerce(v, item_hint, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    raise TypeError(f"config field {where} has an unsupported type hint {hint!r}")  # a bug in a config class


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
