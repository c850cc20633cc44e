"""The distill method: Hinton knowledge distillation of a student from the uploaded teacher."""
from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, Discriminator, Field, Tag

from app.core.ids import ID_PATTERN

from .base import MethodConfig, StrictModel

Width = Annotated[int, Field(ge=1, le=65536)]


class MlpStudent(StrictModel):
    kind: ClassVar[str] = "mlp"
    arch: Literal["mlp"]
    hidden: list[Width] = Field(default_factory=lambda: [256, 128], min_length=1, max_length=8)


class CnnStudent(StrictModel):
    kind: ClassVar[str] = "cnn"
    arch: Literal["cnn"]
    channels: list[Width] = Field(default_factory=lambda: [16, 32], min_length=1, max_length=8)
    hidden: list[Width] = Field(default_factory=lambda: [64], max_length=4)


class ShrinkStudent(StrictModel):
    kind: ClassVar[str] = "shrink"
    shrink: float = Field(gt=0.0, lt=1.0, description="The teacher's architecture with this fraction of channels "
                                                     "removed (structured pruning), then distilled.")


class ModelStudent(StrictModel):
    kind: ClassVar[str] = "model"
    model_id: Annotated[str, Field(pattern=ID_PATTERN)] = Field(description="Another uploaded model as the student.")


class EarlyStopping(StrictModel):
    patience: int = Field(3, ge=1, le=1000, description="Epochs without validation improvement before stopping.")


class FeatureLoss(StrictModel):
    beta: float = Field(0.5, ge=0.0, le=100.0, description="Weight of the feature (hint) loss.")
    teacher_layer: str | None = Field(None, max_length=255, description="ONNX tensor name of the teacher's "
                                      "feature layer (default: the input of its last linear layer).")


def _student_tag(value: Any) -> str | None:
    if isinstance(value, BaseModel):
        return getattr(value, "kind", None)
    if not isinstance(value, dict):
        return None
    if "arch" in value:
        return value["arch"] if value["arch"] in ("mlp", "cnn") else None
    if "shrink" in value:
        return "shrink"
    if "model_id" in value:
        return "model"
    return None


STUDENT_FORMS = ('student must be {"arch": "mlp", "hidden": [...]}, {"arch": "cnn", "channels": [...], "hidden": '
                 '[...]}, {"shrink": 0.5} or {"model_id": "..."}')
Student = Annotated[
    Annotated[MlpStudent, Tag("mlp")] | Annotated[CnnStudent, Tag("cnn")] | Annotated[ShrinkStudent, Tag("shrink")]
    | Annotated[ModelStudent, Tag("model")],
    Discriminator(_student_tag, custom_error_type="invalid_student", custom_error_message=STUDENT_FORMS),
]
STUDENT_TAGS = ("mlp", "cnn", "shrink", "model")


class DistillConfig(MethodConfig):
    """kd: a student trained on the teacher's soft targets (temperature T) and the labels."""

    kind: ClassVar[str] = "distill"
    needs_dataset: ClassVar[bool] = True
    default: ClassVar[bool] = True

    method: Literal["kd"] = "kd"
    student: Student
    temperature: float = Field(4.0, gt=0.0, le=100.0)
    alpha: float = Field(0.7, ge=0.0, le=1.0, description="Weight of the soft-target term (1 - alpha: hard labels).")
    epochs: int = Field(10, ge=1, le=1000)
    batch_size: int = Field(128, ge=1, le=65536)
    # 0.003, not 0.001: measured better for both students on MNIST and Fashion-MNIST (docs/benchmarks.md).
    lr: float = Field(0.003, gt=0.0, le=10.0)
    # 1000: on small transfer sets a few epochs are a few dozen steps (10 epochs of the 1,437-row digits example at
    # batch 128: 120 steps) and leave both students undertrained (docs/benchmarks.md, "Distillation defaults").
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

