"""run_job: resolve the method, load and check the inputs, run the method, verify and measure its artifact."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from . import quantize as _quantize  # noqa: F401  (registers the quantize methods)
from .config import MethodConfig
from .core import EngineError, JobResult, JobSpec, RunContext, checkpoint, monotonic_context, scoped_context
from .data import Dataset, batch_of, fixed_batch_size, load_dataset, synthetic_feeds
from .measure import Evaluation, compare_models, json_safe
from .onnx_io import OnnxModel, OnnxRunner, load_onnx_model
from .registry import MODEL_FORMATS, Method, PreparedJob, find_method

#: Rows of seeded random input used to measure a model when the job has no dataset.
SYNTHETIC_ROWS = 64
#: Rows run through both models to verify an artifact.
VERIFY_ROWS = 4
SCRATCH_DIR = ".engine-scratch"


def run_job(spec: JobSpec, ctx: RunContext) -> JobResult:
    """Run one compression job. Raises EngineError (terminal) for a bad model, dataset or config, an unsupported
    method or format, cancellation, or an artifact that does not run; any other exception is a bug or transient."""
    ctx = monotonic_context(ctx)
    method, config = resolve_method(spec)
    work_dir = Path(ctx.work_dir)

    checkpoint(ctx, 0.0, "loading model")
    model = load_onnx_model(spec.model_path)
    checkpoint(ctx, 0.03, "loading dataset" if spec.dataset_path else "preparing sample inputs")
    dataset = load_dataset(Path(spec.dataset_path), model.inputs) if spec.dataset_path is not None else None
    evaluation = _evaluation(model, dataset, config)
    fixed_batch = fixed_batch_size(model.inputs)

    checkpoint(ctx, 0.06, "running the original model")
    baseline = OnnxRunner(model, ctx.device)
    sample = batch_of(evaluation.feeds, fixed_batch or min(VERIFY_ROWS, len(evaluation)))
    reference = _probe_baseline(baseline, sample, dataset is not None)

    scratch = work_dir / SCRATCH_DIR
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        job = PreparedJob(model, spec.model_format, dataset, work_dir, scratch)
        artifact = method.handler(job, config, scoped_context(ctx, 0.1, 0.5))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    checkpoint(ctx, 0.5, "verifying the artifact")
    result = verify_artifact(artifact.path, artifact.format, work_dir, ctx.device, sample, reference)

    checkpoint(ctx, 0.55, "measuring baseline and result")
    metrics = compare_models(
        baseline,
        result,
        evaluation,
        config.benchmark,
        fixed_batch,
        config.max_accuracy_drop,
        scoped_context(ctx, 0.55, 0.98),
    )
    metrics = _finish_metrics(metrics, spec, method, config, artifact.facts, model, baseline, ctx.device)
    ctx.progress(1.0, "done")
    return JobResult(artifact_path=artifact.path, artifact_format=artifact.format, metrics=metrics)


def resolve_method(spec: JobSpec) -> tuple[Method, MethodConfig]:
    """The registered method and its config for this job, or EngineError("unsupported")."""
    if not isinstance(spec.config, dict):
        raise EngineError("unsupported", "the job config must be a JSON object")
    name = spec.config.get("method")
    method = find_method(spec.kind, name)
    if spec.model_format not in MODEL_FORMATS:
        raise EngineError(
            "unsupported", f"model format {spec.model_format!r} is not supported (known: {', '.join(MODEL_FORMATS)})"
        )
    if spec.model_format not in method.input_formats:
        raise EngineError(
            "unsupported",
            f"{method.kind} method {method.name!r} does not accept {spec.model_format} models yet "
            f"(it accepts: {', '.join(method.input_formats)})",
        )
    config = method.config_cls.from_dict({k: v for k, v in spec.config.items() if k != "method"})
    if config.output_format not in method.output_formats:
        raise EngineError(
            "unsupported",
            f"{method.kind} method {method.name!r} cannot write {config.output_format!r} "
            f"(it writes: {', '.join(method.output_formats)})",
        )
    return method, config


def verify_artifact(
    path: Path, artifact_format: str, work_dir: Path, device: str, sample: dict, reference: list[np.ndarray]
) -> OnnxRunner:
    """Load the artifact back from disk, run it on the sample rows and check that its outputs have the baseline's
    count and shapes and are finite. Any failure is EngineError("result_invalid")."""
    path = Path(path)
    if not path.resolve().is_relative_to(Path(work_dir).resolve()) or not path.is_file():
        raise EngineError("result_invalid", f"the artifact {path.name} is not a file inside the work folder")
    if artifact_format != "onnx":
        raise EngineError("result_invalid", f"cannot verify an artifact in format {artifact_format!r}")
    runner = OnnxRunner(load_onnx_model(path, error_code="result_invalid"), device, error_code="result_invalid")
    try:
        outputs = runner.run(sample)
    except Exception as exc:
        raise EngineError("result_invalid", f"the artifact fails to run: {_first_line(exc)}") from None
    if len(outputs) != len(reference):
        raise EngineError(
            "result_invalid", f"the artifact has {len(outputs)} outputs; the original has {len(reference)}"
        )
    for i, (out, ref) in enumerate(zip(outputs, reference)):
        if out.shape != ref.shape:
            raise EngineError(
                "result_invalid", f"output {i} has shape {list(out.shape)}; the original gives {list(ref.shape)}"
            )
        if out.dtype.kind == "f" and not np.isfinite(out).all():
            raise EngineError("result_invalid", f"output {i} holds NaN or infinite values")
    return runner


def _evaluation(model: OnnxModel, dataset: Dataset | None, config: MethodConfig) -> Evaluation:
    if dataset is not None:
        return Evaluation(dataset.test.x, dataset.test.y, dataset.test_source)
    rows = max(SYNTHETIC_ROWS, max(config.benchmark.batch_sizes))
    return Evaluation(synthetic_feeds(model.inputs, min(rows, 4 * SYNTHETIC_ROWS)), None, "synthetic")


def _probe_baseline(baseline: OnnxRunner, sample: dict, from_dataset: bool) -> list[np.ndarray]:
    """Run the original model once, so a model or dataset that cannot run fails before any work is done."""
    try:
        return baseline.run(sample)
    except Exception as exc:
        if from_dataset:
            raise EngineError("invalid_dataset", f"the model rejects the dataset's rows: {_first_line(exc)}") from None
        raise EngineError("invalid_model", f"the model fails to run on sample inputs: {_first_line(exc)}") from None


def _finish_metrics(
    measured: dict[str, Any],
    spec: JobSpec,
    method: Method,
    config: MethodConfig,
    facts: dict[str, Any],
    model: OnnxModel,
    baseline: OnnxRunner,
    device: str,
) -> dict[str, Any]:
    import onnx
    import onnxruntime

    notes = measured.pop("notes")
    if device == "cuda" and baseline.provider != "CUDAExecutionProvider":
        notes.append("device is cuda but onnxruntime has no CUDA provider here: measured on CPU")
    metrics = {
        "kind": spec.kind,
        "method": {"name": method.name, **facts},
        **measured,
        "device": device,
        "execution_provider": baseline.provider,
        "threads": baseline.threads,
        "inputs": [s.describe() for s in model.inputs],
        "outputs": [s.describe() for s in model.outputs],
        "config": {"method": method.name, **config.to_dict()},
        "versions": {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__},
        "notes": notes,
    }
    metrics = json_safe(metrics)
    json.dumps(metrics, allow_nan=False)  # a bug, not a job error, if this fails
    return metrics


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:500]
