"""The quantize methods. They share one set of keys (a config valid for one is valid for all, as the API has
always accepted); each method reads the ones it needs."""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from .base import CalibrationConfig, MethodConfig


class QuantizeBase(MethodConfig):
    kind: ClassVar[str] = "quantize"

    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig, description="static_int8 and auto: "
                                           "how activation ranges are calibrated.")
    per_channel: bool = Field(True, description="Per-channel weight scales (int8 methods).")


class DynamicInt8Config(QuantizeBase):
    """dynamic_int8: int8 weights, activations quantized at run time."""

    default: ClassVar[bool] = True
    method: Literal["dynamic_int8"] = "dynamic_int8"


class StaticInt8Config(QuantizeBase):
    """static_int8: weights and activations int8 (QDQ), calibrated on the job's dataset."""

    output_formats: ClassVar[tuple[str, ...]] = ("onnx",)
    needs_dataset: ClassVar[bool] = True
    method: Literal["static_int8"] = "static_int8"


class Fp16Config(QuantizeBase):
    """fp16: half-precision weights (the ONNX graph, or the TorchScript module, cast to float16)."""

    method: Literal["fp16"] = "fp16"


class Bf16Config(QuantizeBase):
    """bf16: bfloat16 weights and compute (TorchScript)."""

    output_formats: ClassVar[tuple[str, ...]] = ("torchscript",)
    method: Literal["bf16"] = "bf16"


class AutoConfig(QuantizeBase):
    """auto: measures the candidates that apply and keeps the fastest within max_accuracy_drop."""

    method: Literal["auto"] = "auto"
