"""What every method config shares: strict validation, the measurement settings, the artifact's format, and the
class-level facts (kind, method, formats, dataset) that the API, the engine, the capabilities and the CLI read.

A method is one subclass of `MethodConfig` with `kind`, `method` and its formats set; defining it registers it
(`registered_configs()`); the engine registers one handler for it (a test checks each has exactly one).
"""
from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, field_validator

MODEL_FORMATS: tuple[str, ...] = ("onnx", "torchscript")
OutputFormat = Literal["onnx", "torchscript"]


class StrictModel(BaseModel):
    # strict: no coercion of wrong JSON types (true or "3" for a number); NaN and infinities are refused. frozen:
    # a config is a value, handed from the API to the engine unchanged.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True, frozen=True)


class BenchmarkConfig(StrictModel):
    batch_sizes: list[Annotated[int, Field(ge=1, le=4096)]] = Field(
        default_factory=lambda: [1, 64], min_length=1, max_length=8, description="Batch sizes timed.")
    repeats: int = Field(50, ge=1, le=10_000, description="Timed runs per batch size and model.")
    warmup: int = Field(5, ge=0, le=1_000, description="Untimed runs before timing.")

    @field_validator("batch_sizes")
    @classmethod
    def _unique(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError("batch sizes must be distinct")
        return v


class CalibrationConfig(StrictModel):
    samples: int = Field(512, ge=1, le=100_000, description="Calibration samples taken from the dataset.")
    method: Literal["minmax", "entropy", "percentile"] = Field("minmax", description="Range estimator.")


class FineTuneConfig(StrictModel):
    """Training after pruning (Adam, batch 128, seeded); with `distill` the original model is the teacher."""

    epochs: int = Field(1, ge=1, le=1000)
    lr: float = Field(0.001, gt=0.0, le=10.0)
    distill: bool = Field(True, description="Use the original model as a teacher while fine-tuning.")


_CONFIGS: dict[tuple[str, str], type[MethodConfig]] = {}


class MethodConfig(StrictModel):
    """The keys every method takes: how to measure, the accuracy budget and the artifact's format (None: the
    upload's format where the method writes it, else ONNX)."""

    #: The job kind, and the method (a subclass's `method: Literal["name"] = "name"` field sets it).
    kind: ClassVar[str]
    method_name: ClassVar[str]
    #: The model formats the method reads and writes.
    input_formats: ClassVar[tuple[str, ...]] = MODEL_FORMATS
    output_formats: ClassVar[tuple[str, ...]] = MODEL_FORMATS
    #: A job of this method must name a dataset (calibration or training data).
    needs_dataset: ClassVar[bool] = False
    #: The method of its kind that a config naming none gets.
    default: ClassVar[bool] = False

    max_accuracy_drop: float = Field(0.01, ge=0.0, le=1.0, description="Accuracy drop (fraction) allowed; auto "
                                     "keeps only candidates within it (a fidelity floor without labels).")
    output_format: OutputFormat | None = Field(None, description="Format of the artifact: the input's format "
                                               "where the method allows, else ONNX, unless set here.")
    benchmark: BenchmarkConfig = Field(default_factory=BenchmarkConfig)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        field = cls.model_fields.get("method")
        if field is None:  # a shared base (one per kind), not a method
            return
        names = get_args(field.annotation) if get_origin(field.annotation) is Literal else ()
        if len(names) != 1 or field.default != names[0]:
            raise TypeError(f'{cls.__name__}.method must be declared `method: Literal["name"] = "name"`')
        key = (cls.kind, names[0])
        if key in _CONFIGS:
            raise TypeError(f"method {key[0]}/{key[1]} has two config classes: {_CONFIGS[key].__name__} and "
                            f"{cls.__name__}")
        cls.method_name = names[0]
        _CONFIGS[key] = cls

    def resolve_output_format(self, model_format: str) -> str:
        """The artifact's format: `output_format`, else the upload's where this method writes it, else ONNX (else
        the first it writes). ValueError when `output_format` is one it cannot write."""
        if self.output_format is None:
            for candidate in (model_format, "onnx"):
                if candidate in self.output_formats:
                    return candidate
            return self.output_formats[0]
        if self.output_format not in self.output_formats:
            raise ValueError(f"{self.kind} method {self.method_name!r} cannot write {self.output_format!r} "
                             f"(it writes: {', '.join(self.output_formats)})")
        return self.output_format


def registered_configs() -> dict[tuple[str, str], type[MethodConfig]]:
    """{(kind, method): config class} for every method, sorted."""
    return dict(sorted(_CONFIGS.items()))
