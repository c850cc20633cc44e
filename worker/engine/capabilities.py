"""What this worker's engine can do, for the worker to publish to the API.

    capabilities("cuda") -> {"device": "cuda", "device_available": True, "methods": [
        {"kind": "quantize", "method": "dynamic_int8", "input_formats": ["onnx", "torchscript"],
         "output_formats": ["onnx"], "needs_dataset": False, "runs_on_device": True, "default": True}, ...]}

Call it in the job's process or at worker start-up, never at import: asking torch about CUDA initialises the driver.
"""

from __future__ import annotations

from typing import Any

import torch

from . import api as _api  # noqa: F401  (registers every method)
from .registry import all_methods, default_method

#: Output formats whose kernels exist on the CPU only, per (kind, method): torch's quantized int8 kernels.
_CPU_ONLY_OUTPUTS = {("quantize", "dynamic_int8"): ("torchscript",)}


def capabilities(device: str) -> dict[str, Any]:
    """For each registered (kind, method): the formats it reads and writes on `device` ("cpu" | "cuda"), whether it
    needs a dataset, and whether it runs there (cuda only where torch sees a GPU)."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    available = device == "cpu" or torch.cuda.is_available()
    methods = []
    for method in all_methods():
        outputs = [f for f in method.output_formats
                   if device == "cpu" or f not in _CPU_ONLY_OUTPUTS.get((method.kind, method.name), ())]
        runs = available and bool(outputs) and _runs(method.kind, method.name, device)
        methods.append({
            "kind": method.kind,
            "method": method.name,
            "input_formats": list(method.input_formats),
            "output_formats": outputs,
            "needs_dataset": method.needs_dataset,
            "runs_on_device": runs,
            "default": default_method(method.kind) == method.name,
        })
    return {"device": device, "device_available": available, "methods": methods}


def _runs(kind: str, name: str, device: str) -> bool:
    if (kind, name) == ("quantize", "bf16") and device == "cuda":
        return torch.cuda.is_bf16_supported()
    return True
