"""The compression engine: a plain library (no web, queue or database code). The service's worker calls `run_job`;
the same steps are public functions (docs/engine.md):

    from app.methods import StaticInt8Config
    from worker.engine import load_model, measure, quantize, save

    model = load_model("cnn.onnx", dataset="builtin:digits")
    artifact = quantize(model, StaticInt8Config(), work_dir="out")
    report = measure(model, artifact)
    save(artifact, "cnn.int8.onnx")
"""

from .api import Model, compress, distill, load_model, measure, prune, quantize, run_job, save
from .core import EngineError, JobResult, JobSpec, RunContext
from .registry import Artifact, registered_methods

__all__ = ["Artifact", "EngineError", "JobResult", "JobSpec", "Model", "RunContext", "compress", "distill",
           "load_model", "measure", "prune", "quantize", "registered_methods", "run_job", "save"]
