"""The public job contract: request bodies (one config schema per kind) and the job resource."""
from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator

from app.core.ids import ID_PATTERN
from app.webhooks.schemas import WebhookOut


class StrictModel(BaseModel):
    # strict: no coercion of wrong JSON types (true or "3" for a number); NaN and infinities are refused.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class CalibrationConfig(StrictModel):
    samples: int = Field(512, ge=1, le=100_000, description="Calibration samples taken from the dataset.")
    method: Literal["minmax", "entropy", "percentile"] = Field("minmax", description="Range estimator.")


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


OutputFormat = Literal["onnx", "torchscript"]
OUTPUT_FORMAT_FIELD = Field(None, description="Format of the artifact: the input's format where the method allows, "
                                              "else ONNX, unless set here.")


class QuantizeConfig(StrictModel):
    method: Literal["dynamic_int8", "static_int8", "fp16", "bf16", "auto"] = Field(
        description="dynamic_int8: int8 weights, activations quantized at run time. static_int8: weights and "
                    "activations int8 (QDQ), calibrated on the job's dataset. fp16 / bf16: half-precision weights. "
                    "auto: measures the candidates that apply and keeps the fastest within max_accuracy_drop.")
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    per_channel: bool = Field(True, description="Per-channel weight scales.")
    max_accuracy_drop: float = Field(0.01, ge=0.0, le=1.0, description="Accuracy drop (fraction) allowed; auto "
                                     "keeps only candidates within it (a fidelity floor without labels).")
    output_format: OutputFormat | None = OUTPUT_FORMAT_FIELD
    benchmark: BenchmarkConfig = Field(default_factory=BenchmarkConfig)


class FineTuneConfig(StrictModel):
    epochs: int = Field(1, ge=1, le=1000)
    lr: float = Field(0.001, gt=0.0, le=10.0)
    distill: bool = Field(True, description="Use the original model as a teacher while fine-tuning.")


class PruneConfig(StrictModel):
    method: Literal["magnitude", "channels"] = Field(
        description="magnitude: unstructured, zeroes the smallest weights to `sparsity`. channels: structured, "
                    "removes `ratio` of the channels/neurons across dependent layers.")
    sparsity: float = Field(0.5, ge=0.0, le=0.99, description="Target sparsity (magnitude).")
    ratio: float = Field(0.5, gt=0.0, le=0.9, description="Fraction of channels removed (channels).")
    scope: Literal["global", "layer"] = Field("global", description="Rank weights across all layers or per layer.")
    round_to: int = Field(8, ge=1, le=256, description="Kept channel counts are rounded to a multiple of this.")
    fine_tune: FineTuneConfig | None = Field(None, description="Train after pruning (needs a dataset).")
    output_format: OutputFormat | None = OUTPUT_FORMAT_FIELD
    benchmark: BenchmarkConfig = Field(default_factory=BenchmarkConfig)


Width = Annotated[int, Field(ge=1, le=65536)]


class MlpStudent(StrictModel):
    arch: Literal["mlp"]
    hidden: list[Width] = Field(default_factory=lambda: [256, 128], min_length=1, max_length=8)


class CnnStudent(StrictModel):
    arch: Literal["cnn"]
    channels: list[Width] = Field(default_factory=lambda: [16, 32], min_length=1, max_length=8)
    hidden: list[Width] = Field(default_factory=lambda: [64], max_length=4)


class ShrinkStudent(StrictModel):
    shrink: float = Field(gt=0.0, lt=1.0, description="The teacher's architecture with this fraction of channels "
                                                     "removed (structured pruning), then distilled.")


class ModelStudent(StrictModel):
    model_id: Annotated[str, Field(pattern=ID_PATTERN)] = Field(description="Another uploaded model as the student.")


class EarlyStopping(StrictModel):
    patience: int = Field(3, ge=1, le=1000, description="Epochs without validation improvement before stopping.")


class FeatureLoss(StrictModel):
    beta: float = Field(0.5, ge=0.0, le=100.0, description="Weight of the feature (hint) loss.")
    teacher_layer: str | None = Field(None, max_length=255, description="ONNX tensor name of the teacher's "
                                      "feature layer (default: the input of its last linear layer).")


def _student_tag(value: Any) -> str | None:
    if isinstance(value, BaseModel):
        value = value.model_dump()
    if not isinstance(value, dict):
        return None
    if "arch" in value:
        return value["arch"] if value["arch"] in ("mlp", "cnn") else None
    if "shrink" in value:
        return "shrink"
    if "model_id" in value:
        return "model"
    return None


Student = Annotated[
    Annotated[MlpStudent, Tag("mlp")] | Annotated[CnnStudent, Tag("cnn")] | Annotated[ShrinkStudent, Tag("shrink")]
    | Annotated[ModelStudent, Tag("model")],
    Discriminator(_student_tag, custom_error_type="invalid_student", custom_error_message=(
        'student must be {"arch": "mlp", "hidden": [...]}, {"arch": "cnn", "channels": [...], "hidden": [...]}, '
        '{"shrink": 0.5} or {"model_id": "..."}')),
]
# Tags of the discriminated unions; validation errors drop them from field paths (config.student.hidden).
UNION_TAGS = frozenset({"quantize", "prune", "distill", "mlp", "cnn", "shrink", "model"})


class DistillConfig(StrictModel):
    student: Student
    temperature: float = Field(4.0, gt=0.0, le=100.0)
    alpha: float = Field(0.7, ge=0.0, le=1.0, description="Weight of the soft-target term (1 - alpha: hard labels).")
    epochs: int = Field(10, ge=1, le=1000)
    batch_size: int = Field(128, ge=1, le=65536)
    lr: float = Field(0.003, gt=0.0, le=10.0)
    min_steps: int = Field(1000, ge=0, le=1_000_000, description="Train at least this many optimizer steps, adding "
                           "whole epochs when `epochs` gives fewer (small datasets); 0: exactly `epochs`.")
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr_schedule: Literal["constant", "cosine", "step"] = "cosine"
    seed: int = Field(0, ge=0, le=2**31 - 1)
    early_stopping: EarlyStopping | None = None
    compare_baseline: bool = Field(False, description="Also train the same student from labels alone and report both.")
    train_samples: int = Field(0, ge=0, le=100_000_000, description="Train on a seeded subset of this many rows of "
                               "the transfer set (0: all of it).")
    feature_loss: FeatureLoss | None = None
    output_format: OutputFormat | None = OUTPUT_FORMAT_FIELD
    benchmark: BenchmarkConfig = Field(default_factory=BenchmarkConfig)


Device = Literal["auto", "cpu", "cuda"]
Id = Annotated[str, Field(pattern=ID_PATTERN)]
BUILTIN_DATASETS = ("mnist", "fashion-mnist", "digits")
DatasetRef = Annotated[str, Field(
    pattern=r"^([0-9a-f]{32}|builtin:(mnist|fashion-mnist|digits))$",
    description="An uploaded dataset's id, or a built-in: builtin:mnist, builtin:fashion-mnist, builtin:digits.")]


class _JobCreateBase(StrictModel):
    model_id: Id | None = Field(None, description="The input model. Give exactly one of model_id and artifact_id.")
    artifact_id: Id | None = Field(None, description="An artifact of an earlier job as the input model (no download: "
                                   "a model row pointing at the same stored file is made, or reused).")
    dataset_id: DatasetRef | None = Field(None, description="Calibration / evaluation / training data.")
    device: Device = Field("auto", description="auto: a GPU worker when one is live, else CPU.")
    labels: dict[str, str] | None = Field(None, description="Up to 20 labels, keys [a-z0-9_.-]{1,63}, values up to "
                                          "255 characters; filter lists with ?label=key:value.")
    callback_url: str | None = Field(None, max_length=2048, description="POSTed the job JSON, signed, when the job "
                                     "ends; its host must be on the server's webhook allow-list.")


class QuantizeJobCreate(_JobCreateBase):
    kind: Literal["quantize"]
    config: QuantizeConfig


class PruneJobCreate(_JobCreateBase):
    kind: Literal["prune"]
    config: PruneConfig


class DistillJobCreate(_JobCreateBase):
    kind: Literal["distill"]
    config: DistillConfig


JobCreate = Annotated[QuantizeJobCreate | PruneJobCreate | DistillJobCreate, Field(discriminator="kind")]


class JobError(BaseModel):
    code: str
    message: str


class JobOut(BaseModel):
    id: str
    kind: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    model_id: str
    dataset_id: str | None
    config: dict[str, Any]
    device_requested: str
    queue: str | None = Field(None, description="The queue the job was sent to: `gpu` (`device: cuda`, or `auto` "
                              "while a live worker consumed `gpu`) or `cpu`; only a worker consuming it claims the "
                              "job. Once claimed, `worker` names that worker and `device` where the job runs.")
    progress: float = Field(ge=0.0, le=1.0)
    stage: str
    attempts: int
    max_attempts: int
    error: JobError | None
    metrics: dict[str, Any] | None
    artifact_id: str | None
    worker: str | None
    device: str | None
    owner: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    labels: dict[str, str] = {}
    webhook: WebhookOut | None = Field(None, description="Delivery of the callback_url webhook, when the job has one.")


class JobEventOut(BaseModel):
    seq: int
    status: str
    progress: float
    stage: str
    at: datetime
