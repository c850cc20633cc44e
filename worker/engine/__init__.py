"""The compression engine: a plain library (no web, queue or database code), called by the worker's job runner.

    result = run_job(JobSpec(kind="quantize", model_path=..., model_format="onnx", dataset_path=..., config={...}),
                     RunContext(device="cpu", work_dir=...))
"""

from .api import run_job
from .core import EngineError, JobResult, JobSpec, RunContext
from .registry import registered_methods

__all__ = ["EngineError", "JobResult", "JobSpec", "RunContext", "registered_methods", "run_job"]
