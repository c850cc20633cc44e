"""run_job: resolve the method, load and check the inputs, run the method, verify and measure its artifact."""

from __future__ import annotations

import json
import shutil
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from app.methods import MethodConfig

from . import distill as _distill  # noqa: F401  (registers the distill method)
from . import prune as _prune  # noqa: F401  (registers the prune methods)
from . import quantize as _quantize  # noqa: F401  (registers the quantize methods)
from .core import EngineError, first_line, JobResult, JobSpec, RunContext, checkpoint, monotonic_context, scoped_context
from .data import (
    Dataset,
    TensorSpec,
    batch_of,
    check_labels_fit,
    fixed_batch_size,
    load_job_dataset,
    output_classes,
    synthetic_feeds,
)
from .measure import Evaluation, Runner, compare_models, json_safe
from .onnx_io import OnnxModel, OnnxRunner, load_onnx_model
from .registry import MODEL_FORMATS, Artifact, Method, PreparedJob, find_method
from .torch_io import (
    BATCH_DIM,
    TorchRunner,
    TorchScriptModel,
    count_macs,
    count_model_macs,
    load_torchscript,
    load_torchscript_model,
    output_specs,
    torchscript_input_names,
)
from .versions import engine_versions

#: Rows of seeded random input used to measure a model when the job has no dataset.
SYNTHETIC_ROWS = 64
#: Rows run through both models to verify an artifact.
VERIFY_ROWS = 4
SCRATCH_DIR = ".engine-scratch"


def run_job(spec: JobSpec, ctx: RunContext) -> JobResult:
    """Run one compression job. Raises EngineError (terminal) for a bad model, dataset or config, an unsupported
    method or format, cancellation, or an artifact that does not run; any other exception is a bug or transient."""
    ctx = monotonic_context(ctx)
    method, config, output_format = resolve_method(spec)
    work_dir = Path(ctx.work_dir)
    checkpoint(ctx, 0.0, "loading model")
    scratch = work_dir / SCRATCH_DIR
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        return _run(spec, ctx, method, config, output_format, work_dir, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run(
    spec: JobSpec, ctx: RunContext, method: Method, config: MethodConfig, output_format: str, work_dir: Path,
    scratch: Path,
) -> JobResult:
    model, dataset = _load_inputs(spec, ctx)
    evaluation = _evaluation(model.inputs, dataset, config)
    fixed_batch = fixed_batch_size(model.inputs)

    checkpoint(ctx, 0.06, "running the original model")
    baseline: Runner = OnnxRunner(model, ctx.device) if isinstance(model, OnnxModel) else TorchRunner(model, ctx.device)
    sample = batch_of(evaluation.feeds, fixed_batch or min(VERIFY_ROWS, len(evaluation)))
    reference = _probe_baseline(baseline, sample, dataset is not None)
    if isinstance(model, TorchScriptModel):
        model = replace(model, outputs=output_specs(reference))
        if reference and reference[0].ndim == 2:  # its output count is known only now that it has run
            check_labels_fit(dataset, int(reference[0].shape[1]))
    job = PreparedJob(
        model=model, model_format=spec.model_format, dataset=dataset, evaluation=evaluation,
        output_format=output_format, device=ctx.device, work_dir=work_dir, scratch_dir=scratch,
        builtin_dataset=spec.builtin_dataset, student_model_path=spec.student_model_path,
        student_model_format=spec.student_model_format, runners={spec.model_format: baseline},
    )

    artifact = method.handler(job, config, scoped_context(ctx, 0.1, 0.5))

    checkpoint(ctx, 0.5, "verifying the artifact")
    result = verify_artifact(artifact.path, artifact.format, work_dir, ctx.device, sample, reference, model.inputs)
    same_runtime = None
    if artifact.format != spec.model_format:
        checkpoint(ctx, 0.52, f"converting the original model to {artifact.format} for a like-with-like comparison")
        same_runtime = job.runner(artifact.format)

    checkpoint(ctx, 0.55, "measuring baseline and result")
    metrics = compare_models(
        baseline,
        result,
        evaluation,
        config.benchmark,
        fixed_batch,
        config.max_accuracy_drop,
        scoped_context(ctx, 0.55, 0.95),
        same_runtime=same_runtime,
    )
    checkpoint(ctx, 0.95, "counting multiply-accumulates")
    _add_macs(metrics, job, result)
    metrics = _finish_metrics(metrics, spec, method, config, artifact, model, baseline, ctx.device)
    ctx.progress(1.0, "done")
    return JobResult(artifact_path=artifact.path, artifact_format=artifact.format, metrics=metrics)


def resolve_method(spec: JobSpec) -> tuple[Method, MethodConfig, str]:
    """The registered method, its config and the artifact's format for this job, or EngineError("unsupported")."""
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
            f"{method.kind} method {method.name!r} does not accept {spec.model_format} models "
            f"(it accepts: {', '.join(method.input_formats)})",
        )
    config = parse_method_config(method, spec.config)
    try:
        return method, config, config.resolve_output_format(spec.model_format)
    except ValueError as exc:
        raise EngineError("unsupported", str(exc)) from None


def parse_method_config(method: Method, data: dict) -> MethodConfig:
    """`data` as `method`'s typed config (app/methods), or EngineError("unsupported") naming the first problem."""
    try:
        return method.config_cls.model_validate({**data, "method": method.name})
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "config"
        raise EngineError("unsupported", f"invalid config: {where}: {err['msg']}") from None


def verify_artifact(
    path: Path,
    artifact_format: str,
    work_dir: Path,
    device: str,
    sample: dict,
    reference: list[np.ndarray],
    inputs: tuple[TensorSpec, ...],
) -> Runner:
    """Load the artifact back from disk (onnxruntime, or torch.jit.load), run it on the sample rows and check that
    its outputs have the baseline's count and shapes and are finite. Any failure is EngineError("result_invalid")."""
    path = Path(path)
    if not path.resolve().is_relative_to(Path(work_dir).resolve()) or not path.is_file():
        raise EngineError("result_invalid", f"the artifact {path.name} is not a file inside the work folder")
    runner: Runner
    if artifact_format == "onnx":
        runner = OnnxRunner(load_onnx_model(path, error_code="result_invalid"), device, error_code="result_invalid")
    elif artifact_format == "torchscript":
        runner = TorchRunner(load_torchscript_model(path, inputs, error_code="result_invalid"), device)
    else:
        raise EngineError("result_invalid", f"cannot verify an artifact in format {artifact_format!r}")
    try:
        outputs = runner.run(sample)
    except Exception as exc:
        raise EngineError("result_invalid", f"the artifact fails to run: {first_line(exc)}") from None
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


def _load_inputs(spec: JobSpec, ctx: RunContext) -> tuple[OnnxModel | TorchScriptModel, Dataset | None]:
    """The upload and the job's dataset. A TorchScript model declares no input shapes: they come from the dataset."""
    has_data = spec.dataset_path is not None or bool(spec.builtin_dataset)
    if spec.model_format == "onnx":
        model = load_onnx_model(spec.model_path)
        checkpoint(ctx, 0.03, "loading dataset" if has_data else "preparing sample inputs")
        return model, load_job_dataset(spec.dataset_path, spec.builtin_dataset, model.inputs,
                                       classes=output_classes(model.outputs))
    module = load_torchscript(spec.model_path)
    if not has_data:
        raise EngineError(
            "invalid_dataset",
            "a TorchScript model does not declare its input shapes: give a dataset (or a built-in one) so the engine "
            "knows what to feed it",
        )
    checkpoint(ctx, 0.03, "loading dataset")
    names = torchscript_input_names(module)
    dtypes = _npz_input_dtypes(Path(spec.dataset_path), names) if spec.dataset_path is not None else {}
    loose = tuple(TensorSpec(name, None, dtypes.get(name, np.dtype("float32"))) for name in names)
    dataset = load_job_dataset(spec.dataset_path, spec.builtin_dataset, loose)
    assert dataset is not None
    inputs = tuple(
        TensorSpec(s.name, (BATCH_DIM, *dataset.train.x[s.name].shape[1:]), dataset.train.x[s.name].dtype)
        for s in loose
    )
    return load_torchscript_model(spec.model_path, inputs), dataset


def _npz_input_dtypes(path: Path, names: list[str]) -> dict[str, np.dtype]:
    """The dtype to feed each input, from the .npy headers in the .npz (nothing is loaded): float32 for floats,
    int64 for integers (what embeddings take), bool for bools. Inputs without a readable array are left out (the
    dataset loader reports them)."""
    keys = {names[0]: ("x", names[0])} if len(names) == 1 else {name: (name,) for name in names}
    out: dict[str, np.dtype] = {}
    try:
        with zipfile.ZipFile(path) as archive:
            members = set(archive.namelist())
            for name, candidates in keys.items():
                key = next((k for k in candidates if f"{k}.npy" in members), None)
                if key is None:
                    continue
                with archive.open(f"{key}.npy") as f:
                    version = np.lib.format.read_magic(f)
                    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else (
                        np.lib.format.read_array_header_2_0)
                    _, _, dtype = read_header(f)
                kind = {"f": "float32", "i": "int64", "u": "int64", "b": "bool"}.get(dtype.kind)
                if kind is not None:
                    out[name] = np.dtype(kind)
    except (OSError, ValueError, zipfile.BadZipFile):
        return {}
    return out


def _evaluation(inputs: tuple[TensorSpec, ...], dataset: Dataset | None, config: MethodConfig) -> Evaluation:
    if dataset is not None:
        return Evaluation(dataset.test.x, dataset.test.y, dataset.test_source)
    rows = max(SYNTHETIC_ROWS, max(config.benchmark.batch_sizes))
    return Evaluation(synthetic_feeds(inputs, min(rows, 4 * SYNTHETIC_ROWS)), None, "synthetic")


def _probe_baseline(baseline: Runner, sample: dict, from_dataset: bool) -> list[np.ndarray]:
    """Run the original model once, so a model or dataset that cannot run fails before any work is done."""
    try:
        return baseline.run(sample)
    except Exception as exc:
        if from_dataset:
            raise EngineError("invalid_dataset", f"the model rejects the dataset's rows: {first_line(exc)}") from None
        raise EngineError("invalid_model", f"the model fails to run on sample inputs: {first_line(exc)}") from None


def _add_macs(metrics: dict[str, Any], job: PreparedJob, result: Runner) -> None:
    """MACs of one row for the upload and the result (None where they cannot be counted, e.g. quantized graphs)."""
    example = job.example_feeds(1)
    try:
        base = count_macs(job.trainable(), example)
    except EngineError:
        base = None
    res = count_model_macs(result.model, example)
    metrics["baseline"]["macs"] = base
    metrics["result"]["macs"] = res
    metrics["ratios"]["macs"] = round(res / base, 4) if base and res is not None else None


def _finish_metrics(
    measured: dict[str, Any],
    spec: JobSpec,
    method: Method,
    config: MethodConfig,
    artifact: Artifact,
    model: OnnxModel | TorchScriptModel,
    baseline: Runner,
    device: str,
) -> dict[str, Any]:
    facts = {key: value for key, value in artifact.facts.items() if key != "notes"}
    notes = measured.pop("notes") + list(artifact.facts.get("notes", []))
    if device == "cuda" and "cuda" not in baseline.provider.lower():
        notes.append(f"device is cuda but {baseline.provider} has no CUDA support here: measured on CPU")
    metrics = {
        "kind": spec.kind,
        "method": {"name": method.name, **facts},
        **measured,
        "model_format": spec.model_format,
        "artifact_format": artifact.format,
        "device": device,
        "execution_provider": baseline.provider,
        "threads": baseline.threads,
        "inputs": [s.describe() for s in model.inputs],
        "outputs": [s.describe() for s in model.outputs],
        "config": config.model_dump(mode="json"),
        "versions": engine_versions(),
        "notes": notes,
    }
    metrics = json_safe(metrics)
    json.dumps(metrics, allow_nan=False)  # a bug, not a job error, if this fails
    return metrics

