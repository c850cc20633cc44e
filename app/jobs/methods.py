"""What each (kind, method) accepts, as the API checks it at submit time.

The engine is the authority (worker/engine registry); a test keeps this table equal to it, since the API never
imports the engine.
"""
from __future__ import annotations

from dataclasses import dataclass

BOTH = frozenset({"onnx", "torchscript"})


@dataclass(frozen=True)
class MethodRule:
    input_formats: frozenset[str]
    output_formats: frozenset[str]
    needs_dataset: bool = False


METHODS: dict[tuple[str, str], MethodRule] = {
    ("quantize", "dynamic_int8"): MethodRule(BOTH, BOTH),
    ("quantize", "static_int8"): MethodRule(BOTH, frozenset({"onnx"}), needs_dataset=True),
    ("quantize", "fp16"): MethodRule(BOTH, BOTH),
    ("quantize", "bf16"): MethodRule(BOTH, frozenset({"torchscript"})),
    ("quantize", "auto"): MethodRule(BOTH, BOTH),
    ("prune", "magnitude"): MethodRule(BOTH, BOTH),
    ("prune", "channels"): MethodRule(BOTH, BOTH),
    ("distill", "kd"): MethodRule(BOTH, BOTH, needs_dataset=True),
}


def method_of(kind: str, config) -> str:
    """Distill has one method (Hinton KD); quantize and prune name theirs in config.method."""
    return getattr(config, "method", None) or "kd"
