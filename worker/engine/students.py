"""Distillation students: an MLP or CNN built from its config, the teacher's own architecture shrunk by channel
pruning, or another uploaded model converted to a trainable module.

- {"arch": "mlp", "hidden": [256, 128]}: an MLP over the flattened input (`build_mlp`);
- {"arch": "cnn", "channels": [16, 32], "hidden": [64]}: conv3x3-BN-ReLU-maxpool2 blocks, then an MLP head
  (`build_cnn`);
- {"shrink": 0.5}: the teacher's own architecture with that fraction of channels removed (prune.prune_channels);
- {"model_id": "..."}: another uploaded model (JobSpec.student_model_path), converted to a trainable module and
  checked to take the teacher's inputs and give its output shapes.

`build_student` picks one from a DistillConfig. The API's memory admission (app/jobs/admission.py) counts an mlp or
cnn student's parameters the way `build_mlp` and `build_cnn` build it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from app.methods import CnnStudent, MlpStudent, ShrinkStudent

from .core import EngineError, first_line
from .onnx_io import load_onnx_model
from .onnx_to_fx import onnx_to_torch
from .prune import prune_channels
from .registry import PreparedJob
from .torch_io import load_torchscript_model, torchscript_to_torch
from .train import TrainData

if TYPE_CHECKING:
    from app.methods import DistillConfig


def build_mlp(in_features: int, hidden: tuple[int, ...], classes: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def build_cnn(row_shape: tuple[int, ...], channels: tuple[int, ...], hidden: tuple[int, ...], classes: int) -> nn.Module:
    """conv3x3-BN-ReLU-maxpool2 per entry of `channels` (no pooling once a side is 1), then an MLP head."""
    c_in, h, w = row_shape
    layers: list[nn.Module] = []
    for c in channels:
        layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
        if h >= 2 and w >= 2:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        c_in = c
    layers.append(nn.Flatten())
    width = c_in * h * w
    for units in hidden:
        layers += [nn.Linear(width, units), nn.ReLU()]
        width = units
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def build_student(
    job: PreparedJob, config: DistillConfig, data: TrainData, classes: int
) -> tuple[nn.Module, dict[str, Any]]:
    """The student `config.student` names, untrained (seed torch first for repeatable weights), and what it is (the
    report's `student` facts). `data` gives the input rows' shapes and dtypes (and a few rows for a shrink student's
    pruning); `classes` is the teacher's number of logits."""
    student = config.student
    if isinstance(student, (MlpStudent, CnnStudent)):
        return _arch_student(job, student, data, classes)
    if isinstance(student, ShrinkStudent):
        module = job.trainable()
        feeds = {spec.name: a[: min(len(a), 8)] for spec, a in zip(job.inputs, data.inputs)}
        pruning = prune_channels(module, feeds, ratio=student.shrink)
        return module, {"kind": "shrink", "shrink": student.shrink, "pruning": pruning}
    return _uploaded_student(job, data, classes)


def _arch_student(job: PreparedJob, student: MlpStudent | CnnStudent, data: TrainData, classes: int):
    arch = student.arch
    if len(data.inputs) != 1:
        raise EngineError(
            "unsupported",
            f"an {arch} student takes one input; the teacher has {len(data.inputs)}: use a shrink or model_id student",
        )
    if len(job.model.outputs) > 1:
        raise EngineError(
            "unsupported",
            f"the teacher has {len(job.model.outputs)} outputs; an {arch} student gives only the logits: use a shrink "
            "or model_id student",
        )
    x = data.inputs[0]
    if x.dtype != np.float32:
        raise EngineError("unsupported", f"an {arch} student needs a float32 input; the teacher's is {x.dtype}")
    if isinstance(student, MlpStudent):
        in_features = int(np.prod(x.shape[1:]))
        facts = {"kind": "mlp", "in_features": in_features, "hidden": list(student.hidden), "classes": classes}
        return build_mlp(in_features, student.hidden, classes), facts
    if x.ndim != 4:
        raise EngineError(
            "unsupported",
            f"a cnn student needs image rows (N, C, H, W); the teacher's input rows are {list(x.shape[1:])}: "
            "use an mlp student",
        )
    row = (int(x.shape[1]), int(x.shape[2]), int(x.shape[3]))
    facts = {"kind": "cnn", "input": list(row), "channels": list(student.channels), "hidden": list(student.hidden),
             "batch_norm": True, "classes": classes}
    return build_cnn(row, student.channels, student.hidden, classes), facts


def _uploaded_student(job: PreparedJob, data: TrainData, classes: int) -> tuple[nn.Module, dict[str, Any]]:
    """The job's student model file as a trainable module, checked to take the teacher's inputs and give its
    output shapes."""
    path, fmt = job.student_model_path, job.student_model_format
    if path is None or fmt not in ("onnx", "torchscript"):
        raise EngineError("unsupported", "a model_id student needs the student model's file and format in the job")
    feeds = job.example_feeds(2)
    if fmt == "onnx":
        model = load_onnx_model(Path(path))
        if len(model.inputs) != len(job.inputs):
            raise EngineError(
                "invalid_model", f"the student model takes {len(model.inputs)} inputs; the teacher takes {len(job.inputs)}"
            )
        module = onnx_to_torch(model.proto)
        params = model.params
    else:
        ts = load_torchscript_model(Path(path), job.inputs)
        module = torchscript_to_torch(ts, feeds)
        params = ts.params
    try:
        with torch.no_grad():
            outputs = module.eval()(*[torch.from_numpy(np.ascontiguousarray(a[:2])) for a in data.inputs])
    except Exception as exc:
        raise EngineError("invalid_model", f"the student model fails on the teacher's inputs: {first_line(exc)}") from None
    outputs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
    first = outputs[0]
    if first.dim() != 2 or first.shape[1] != classes:
        raise EngineError(
            "invalid_model",
            f"the student model's first output has shape {list(first.shape)} for 2 rows; the teacher gives "
            f"(rows, {classes})",
        )
    if len(outputs) != len(job.model.outputs):
        raise EngineError(
            "invalid_model", f"the student model has {len(outputs)} outputs; the teacher has {len(job.model.outputs)}"
        )
    for p in module.parameters():
        p.requires_grad_(True)
    return module, {"kind": "model", "format": fmt, "params_before": int(params)}
