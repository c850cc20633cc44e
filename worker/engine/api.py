"""The engine's public functions: load a model, compress it (quantize, prune, distill), measure the result against
it, save it; `run_job` composes them for the service's worker. docs/engine.md shows them in use."""

from __future__ import annotations

import json
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from app.methods import BenchmarkConfig, MethodConfig
from app.methods.datasets import builtin_name, dataset_ref

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
#: Where the method's own progress starts within `compress` (before it: running the original model once); with
#: run_job's share of 0.06..0.5 for compress, the method reports over 0.1..0.5 of the job.
HANDLER_PROGRESS_START = 1 / 11


@dataclass(frozen=True)
class Model:
    """A model loaded for compression: the file in its format, with the dataset it is calibrated, trained and
    measured on (None: measured on seeded random rows; a TorchScript model needs one, for its input shapes)."""

    loaded: OnnxModel | TorchScriptModel
    format: str  # "onnx" | "torchscript"
    dataset: Dataset | None = None
    builtin_dataset: str | None = None  # "digits" when the dataset is builtin:digits

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self.loaded.inputs


def load_model(path: str | Path, format: str | None = None, dataset: str | Path | None = None, *,
               ctx: RunContext | None = None) -> Model:
    """Load a model file (`format` "onnx" or "torchscript"; None: told from the file) and its dataset: an .npz path
    or "builtin:mnist" / "builtin:fashion-mnist" / "builtin:digits". The file is checked as an upload is (a
    TorchScript file with file or process operators is refused), but a TorchScript model is a program: load an
    untrusted one only in a sandbox, as the service does. EngineError("invalid_model" | "invalid_dataset" |
    "dataset_unavailable" | "unsupported") says what is wrong."""
    ctx = ctx or RunContext(device="cpu", work_dir=Path("."))
    path = Path(path)
    format = format or _detect_format(path)
    if format not in MODEL_FORMATS:
        raise EngineError("unsupported",
                          f"model format {format!r} is not supported (known: {', '.join(MODEL_FORMATS)})")
    builtin = builtin_name(dataset) if isinstance(dataset, str) else None
    dataset_path = Path(dataset) if dataset is not None and builtin is None else None
    checkpoint(ctx, 0.0, "loading model")
    loaded, data = _load_inputs(path, format, dataset_path, builtin, ctx)
    return Model(loaded, format, data, builtin)


def _detect_format(path: Path) -> str:
    """A TorchScript file is a zip archive; anything else is read as ONNX."""
    return "torchscript" if zipfile.is_zipfile(path) else "onnx"


def compress(model: Model, config: MethodConfig, *, device: str = "cpu", work_dir: str | Path | None = None,
             ctx: RunContext | None = None, student: Path | None = None, student_format: str | None = None
             ) -> Artifact:
    """Run the method `config` configures (any kind) on `model`; the artifact is written under `work_dir` (a new
    temporary folder when None). `student`: the student model file of a distill config with a model_id student."""
    method = find_method(config.kind, config.method_name)
    _check_input_format(method, model.format)
    output_format = _output_format(config, model.format)
    work = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="distillery-"))
    ctx = replace(ctx, device=device, work_dir=work) if ctx is not None else RunContext(device=device, work_dir=work)
    scratch = work / SCRATCH_DIR
    scratch.mkdir(parents=True, exist_ok=True)
    job = _prepare(model, config, output_format, ctx, scratch, student, student_format)
    artifact = method.handler(job, config, scoped_context(ctx, HANDLER_PROGRESS_START, 1.0))
    return replace(artifact, job=job)


def quantize(model: Model, config: MethodConfig, **options: Any) -> Artifact:
    """Quantize `model` with a quantize config (app.methods: DynamicInt8Config(), StaticInt8Config(calibration=...),
    Fp16Config(), Bf16Config(), AutoConfig()); options as `compress`."""
    return compress(model, _of_kind(config, "quantize"), **options)


def prune(model: Model, config: MethodConfig, **options: Any) -> Artifact:
    """Prune `model` with a prune config (app.methods: MagnitudeConfig(sparsity=...), ChannelsConfig(ratio=...))."""
    return compress(model, _of_kind(config, "prune"), **options)


def distill(teacher: Model, config: MethodConfig, **options: Any) -> Artifact:
    """Distill a student from `teacher` on its dataset (app.methods.DistillConfig(student=...))."""
    return compress(teacher, _of_kind(config, "distill"), **options)


def _of_kind(config: MethodConfig, kind: str) -> MethodConfig:
    if not isinstance(config, MethodConfig) or config.kind != kind:
        raise TypeError(f"expected a {kind} config from app.methods, got {type(config).__name__}")
    return config


def measure(model: Model, artifact: Artifact, *, benchmark: BenchmarkConfig | None = None,
            max_accuracy_drop: float = 0.01, ctx: RunContext | None = None) -> dict[str, Any]:
    """Verify `artifact` (loaded back from disk and run on sample rows) and measure it against `model`, side by side
    in one run: accuracy (or fidelity without labels), latency at each batch size (each model also in the other's
    runtime when the formats differ), size, parameters and multiply-accumulates. Returns the report's
    baseline / result / ratios / accuracy sections."""
    job = artifact.job
    if job is None or job.model_format != model.format:
        raise ValueError("measure() takes an artifact that compress/quantize/prune/distill made from `model`")
    ctx = replace(ctx, device=job.device, work_dir=job.work_dir) if ctx is not None else RunContext(
        device=job.device, work_dir=job.work_dir)
    checkpoint(ctx, 0.0, "verifying the artifact")
    result = verify_artifact(artifact.path, artifact.format, job.work_dir, job.device, job.sample, job.reference,
                             job.inputs)
    same_runtime = None
    if artifact.format != job.model_format:
        checkpoint(ctx, 0.04, f"converting the original model to {artifact.format} for a like-with-like comparison")
        same_runtime = job.runner(artifact.format)
    checkpoint(ctx, 0.1, "measuring baseline and result")
    metrics = compare_models(job.runner(job.model_format), result, job.evaluation, benchmark or BenchmarkConfig(),
                             fixed_batch_size(job.inputs), max_accuracy_drop, scoped_context(ctx, 0.1, 0.9),
                             same_runtime=same_runtime)
    checkpoint(ctx, 0.9, "counting multiply-accumulates")
    _add_macs(metrics, job, result)
    return metrics


def save(artifact: Artifact, path: str | Path) -> Path:
    """Copy the artifact's file to `path` (a file, or a folder to put it in under its own name)."""
    target = Path(path)
    if target.is_dir():
        target = target / artifact.path.name
    shutil.copyfile(artifact.path, target)
    return target


def run_job(spec: JobSpec, ctx: RunContext) -> JobResult:
    """Run one compression job: load, compress, verify and measure, as the functions above. Raises EngineError
    (terminal) for a bad model, dataset or config, an unsupported method or format, cancellation, or an artifact
    that does not run; any other exception is a bug or transient."""
    ctx = monotonic_context(ctx)
    method, config, _ = resolve_method(spec)
    work_dir = Path(ctx.work_dir)
    try:
        dataset = dataset_ref(str(spec.dataset_path) if spec.dataset_path else None, spec.builtin_dataset)
        model = load_model(spec.model_path, spec.model_format, dataset, ctx=scoped_context(ctx, 0.0, 0.06))
        artifact = compress(model, config, device=ctx.device, work_dir=work_dir, ctx=scoped_context(ctx, 0.06, 0.5),
                            student=spec.student_model_path, student_format=spec.student_model_format)
        measured = measure(model, artifact, benchmark=config.benchmark, max_accuracy_drop=config.max_accuracy_drop,
                           ctx=scoped_context(ctx, 0.5, 1.0))
        job = artifact.job
        metrics = _finish_metrics(measured, spec, method, config, artifact, job.model, job.runner(spec.model_format),
                                  ctx.device)
    finally:
        shutil.rmtree(work_dir / SCRATCH_DIR, ignore_errors=True)
    ctx.progress(1.0, "done")
    return JobResult(artifact_path=artifact.path, artifact_format=artifact.format, metrics=metrics)


def _prepare(model: Model, config: MethodConfig, output_format: str, ctx: RunContext, scratch: Path,
             student: Path | None, student_format: str | None) -> PreparedJob:
    """Run the original model once on sample rows (a model or dataset that cannot run fails here, before any work)
    and gather what a handler works on."""
    loaded, dataset = model.loaded, model.dataset
    evaluation = _evaluation(loaded.inputs, dataset, config)
    checkpoint(ctx, 0.0, "running the original model")
    baseline: Runner = OnnxRunner(loaded, ctx.device) if isinstance(loaded, OnnxModel) else TorchRunner(loaded,
                                                                                                        ctx.device)
    sample = batch_of(evaluation.feeds, fixed_batch_size(loaded.inputs) or min(VERIFY_ROWS, len(evaluation)))
    reference = _probe_baseline(baseline, sample, dataset is not None)
    if isinstance(loaded, TorchScriptModel):
        loaded = replace(loaded, outputs=output_specs(reference))
        if reference and reference[0].ndim == 2:  # its output count is known only now that it has run
            check_labels_fit(dataset, int(reference[0].shape[1]))
    return PreparedJob(
        model=loaded, model_format=model.format, dataset=dataset, evaluation=evaluation, output_format=output_format,
        device=ctx.device, work_dir=Path(ctx.work_dir), scratch_dir=scratch, builtin_dataset=model.builtin_dataset,
        student_model_path=student, student_model_format=student_format, runners={model.format: baseline},
        sample=sample, reference=reference,
    )


def resolve_method(spec: JobSpec) -> tuple[Method, MethodConfig, str]:
    """The registered method, its config and the artifact's format for this job, or EngineError("unsupported")."""
    if not isinstance(spec.config, dict):
        raise EngineError("unsupported", "the job config must be a JSON object")
    method = find_method(spec.kind, spec.config.get("method"))
    if spec.model_format not in MODEL_FORMATS:
        raise EngineError(
            "unsupported", f"model format {spec.model_format!r} is not supported (known: {', '.join(MODEL_FORMATS)})"
        )
    _check_input_format(method, spec.model_format)
    config = parse_method_config(method, spec.config)
    return method, config, _output_format(config, spec.model_format)


def _check_input_format(method: Method, model_format: str) -> None:
    if model_format not in method.input_formats:
        raise EngineError("unsupported", f"{method.kind} method {method.name!r} does not accept {model_format} "
                                         f"models (it accepts: {', '.join(method.input_formats)})")


def _output_format(config: MethodConfig, model_format: str) -> str:
    """The artifact's format (MethodConfig.resolve_output_format), or EngineError("unsupported")."""
    try:
        return config.resolve_output_format(model_format)
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


def _load_inputs(model_path: Path, model_format: str, dataset_path: Path | None, builtin: str | None,
                 ctx: RunContext) -> tuple[OnnxModel | TorchScriptModel, Dataset | None]:
    """The upload and the job's dataset. A TorchScript model declares no input shapes: they come from the dataset."""
    has_data = dataset_path is not None or bool(builtin)
    if model_format == "onnx":
        model = load_onnx_model(model_path)
        checkpoint(ctx, 0.5, "loading dataset" if has_data else "preparing sample inputs")
        return model, load_job_dataset(dataset_path, builtin, model.inputs,
                                       classes=output_classes(model.outputs))
    module = load_torchscript(model_path)
    if not has_data:
        raise EngineError(
            "invalid_dataset",
            "a TorchScript model does not declare its input shapes: give a dataset (or a built-in one) so the engine "
            "knows what to feed it",
        )
    checkpoint(ctx, 0.5, "loading dataset")
    names = torchscript_input_names(module)
    dtypes = _npz_input_dtypes(Path(dataset_path), names) if dataset_path is not None else {}
    loose = tuple(TensorSpec(name, None, dtypes.get(name, np.dtype("float32"))) for name in names)
    dataset = load_job_dataset(dataset_path, builtin, loose)
    assert dataset is not None
    inputs = tuple(
        TensorSpec(s.name, (BATCH_DIM, *dataset.train.x[s.name].shape[1:]), dataset.train.x[s.name].dtype)
        for s in loose
    )
    return load_torchscript_model(model_path, inputs), dataset


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

