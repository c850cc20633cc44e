"""Knowledge distillation (Hinton, Vinyals and Dean, 2015): train a small student to match the uploaded model.

The uploaded model is the teacher and only runs inference (ONNX in onnxruntime, TorchScript in torch.jit); its
logits are computed once over the training rows. The student minimises

    alpha * KL(softmax(teacher / T) || softmax(student / T)) * T^2  +  (1 - alpha) * CE(student, y)

and only the soft-target term when the transfer set has no labels. An optional hint loss (FitNets) adds
beta * MSE(projection(student penultimate features), teacher layer output), through a learned linear projection
when the widths differ.

The student (built in students.py) is one of:
- {"arch": "mlp", "hidden": [256, 128]}: an MLP over the flattened input;
- {"arch": "cnn", "channels": [16, 32], "hidden": [64]}: conv3x3-BN-ReLU-maxpool2 blocks, then an MLP head;
- {"shrink": 0.5}: the teacher's own architecture, converted to torch, with that fraction of channels removed;
- {"model_id": "..."}: another uploaded model (JobSpec.student_model_path), converted to a trainable module.

Training (train.train_student) is seeded (weights, data order, the validation split), runs on ctx.device, reports
progress per epoch and stops on cancellation. It runs at least `min_steps` optimizer steps (1,000 by default): when
`epochs` epochs of the transfer set make fewer, whole epochs are added (10 epochs of a 1,437-row set at batch 128
are only 120 steps, and both students stayed undertrained). With early_stopping, 10% of the transfer set (seeded)
is held out: training stops after `patience` epochs without a better validation accuracy (top-1 agreement with the
teacher when there are no labels) and the best epoch's weights are kept. `compare_baseline` also trains the same
student on labels alone, with the same seed, data order and budget, on the same 90% of the rows (the same seeded
validation split), reports both test accuracies, and keeps as the artifact the student that is right on more
validation rows (the distilled one on a tie): the test rows it reports never choose. `train_samples` trains on a
seeded subset of the transfer set, for KD under a small data budget. The student is written as ONNX (or
TorchScript, for a TorchScript teacher or when output_format asks) and `run_job` then verifies and measures it
against the teacher like any artifact.

The report's params ratio is the student's weight and bias elements over the teacher's, both counted one way
(onnx_io.count_weights / torch_io.count_weights).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from app.methods import DistillConfig, FeatureLoss

from .core import (
    EngineError,
    RunContext,
    checkpoint,
    raise_if_cancelled,
    scoped_context,
)
from .data import Feeds, feeds_length, fixed_batch_size, iter_batches
from .onnx_io import OnnxModel, OnnxRunner
from .registry import Artifact, PreparedJob, register
from .students import build_student
from .torch_io import count_weights, export_onnx, export_torchscript, torch_device
from .train import INFER_BATCH, TrainData, TrainSettings, predict_logits, train_student

#: Fraction of the training rows held out for early stopping (seeded by config.seed).
VALIDATION_FRACTION = 0.1
#: Precomputed teacher features larger than this are refused (name a narrower feature_loss.teacher_layer).
MAX_FEATURE_BYTES = 1 << 30


@register(DistillConfig)
def distill_kd(job: PreparedJob, config: DistillConfig, ctx: RunContext) -> Artifact:
    dataset = job.dataset
    if dataset is None:
        raise EngineError("invalid_dataset", "distill needs a transfer dataset")
    device = torch_device(job.device).type
    notes: list[str] = []
    if device != job.device:
        notes.append(f"device {job.device} is not available to torch here: trained on {device}")
    input_names = [spec.name for spec in job.inputs]
    checkpoint(ctx, 0.0, "preparing the transfer set")
    train_rows = dataset.train
    if config.train_samples and config.train_samples < len(train_rows):
        index = np.sort(np.random.default_rng(config.seed).choice(len(train_rows), config.train_samples, replace=False))
        train_rows = train_rows.take(index)
    teacher = _Teacher(job, config.feature_loss)

    checkpoint(ctx, 0.02, "running the teacher over the transfer set")
    logits, feats = teacher.outputs(train_rows.x, scoped_context(ctx, 0.02, 0.12))
    classes = int(logits.shape[1])
    full = TrainData([train_rows.x[name] for name in input_names], train_rows.y, logits, feats)
    if config.compare_baseline and (full.labels is None or dataset.test.y is None):
        raise EngineError("invalid_dataset", "compare_baseline needs labels in the training and test rows")
    train, val = full, None
    if config.early_stopping is not None or config.compare_baseline:
        train, val = _validation_split(full, config.seed)

    def make_student() -> tuple[nn.Module, dict[str, Any]]:
        torch.manual_seed(config.seed)
        return build_student(job, config, full, classes)

    checkpoint(ctx, 0.12, "building the student")
    student, student_facts = make_student()
    teacher_params = int(job.model.params)
    student_params = count_weights(student)
    train_end = 0.55 if config.compare_baseline else 0.92
    report = train_student(
        student, train, TrainSettings.from_config(config), scoped_context(ctx, 0.12, train_end), val=val,
        device=device, stage="distilling",
    )
    if report.epochs_planned > config.epochs:
        notes.append(
            f"{config.epochs} epochs of {len(train):,} rows at batch {config.batch_size} are "
            f"{config.epochs * report.steps_per_epoch:,} optimizer steps, fewer than min_steps {config.min_steps:,}: "
            f"trained for up to {report.epochs_planned} epochs ({report.epochs_planned * report.steps_per_epoch:,} "
            "steps; min_steps 0 turns this off)"
        )
    facts: dict[str, Any] = {
        "name": "kd",
        "student": {**student_facts, "params": student_params},
        "teacher": {"format": job.model_format, "params": teacher_params, "classes": classes},
        "params": {
            "teacher": teacher_params,
            "student": student_params,
            "ratio": round(student_params / teacher_params, 4) if teacher_params else None,
        },
        "temperature": config.temperature,
        "alpha": config.alpha if train.labels is not None else 1.0,
        "labels_used": train.labels is not None,
        "loss": report.loss,
        "epochs": config.epochs,
        "min_steps": config.min_steps,
        "epochs_planned": report.epochs_planned,
        "steps_per_epoch": report.steps_per_epoch,
        "steps": report.steps,
        "epochs_run": report.epochs_run,
        "best_epoch": report.best_epoch,
        "stopped_early": report.stopped_early,
        "restored_best": val is not None,
        "curve": report.curve,
        "train_rows": len(train),
        "validation_rows": len(val) if val is not None else 0,
        "transfer_set": {
            "source": dataset.test_source if job.builtin_dataset else "upload",
            "builtin": job.builtin_dataset,
            "rows": len(full),
            "of": len(dataset.train),
            "subset_seed": config.seed if len(full) < len(dataset.train) else None,
        },
        "optimizer": config.optimizer,
        "lr": config.lr,
        "lr_schedule": config.lr_schedule,
        "batch_size": config.batch_size,
        "seed": config.seed,
        "training_device": device,
        "train_seconds": report.seconds,
        "feature_loss": None,
    }
    if config.feature_loss is not None:
        facts["feature_loss"] = {
            "beta": config.feature_loss.beta,
            "teacher_layer": teacher.feature_layer,
            **(report.projection or {}),
        }
    if val is not None and val.labels is not None and val.teacher_logits is not None:
        facts["teacher"]["val_accuracy"] = _accuracy(val.teacher_logits, val.labels)

    if config.compare_baseline:
        assert val is not None and val.labels is not None and dataset.test.y is not None
        checkpoint(ctx, train_end, "training the labels-only baseline")
        baseline, _ = make_student()
        base_report = train_student(
            baseline, train, TrainSettings.from_config(config, labels_only=True),
            scoped_context(ctx, train_end, 0.92), val=val, device=device, stage="labels-only baseline",
        )
        test_inputs = [dataset.test.x[name] for name in input_names]
        kd_acc = _accuracy(predict_logits(student, test_inputs, device), dataset.test.y)
        base_acc = _accuracy(predict_logits(baseline, test_inputs, device), dataset.test.y)
        kd_val = _accuracy(predict_logits(student, val.inputs, device), val.labels)
        base_val = _accuracy(predict_logits(baseline, val.inputs, device), val.labels)
        kept, reason = choose_student(kd_val, base_val, len(val))
        facts["comparison"] = {
            "kd": kd_acc,
            "labels_only": base_acc,
            "delta": round(kd_acc - base_acc, 6),
            "split": "test",
            "kept": kept,
            "kept_reason": reason,
            "chosen_on": "validation",
            "validation": {"kd": kd_val, "labels_only": base_val, "rows": len(val)},
            "labels_only_epochs_run": base_report.epochs_run,
            "labels_only_best_epoch": base_report.best_epoch,
            "labels_only_steps": base_report.steps,
            "labels_only_curve": base_report.curve,
        }
        facts["kept_student"] = kept
        if kept == "labels_only":
            notes.append(f"the artifact is the student trained on labels alone: {reason}")
            student = baseline
        del baseline
    else:
        facts["kept_student"] = "kd"

    checkpoint(ctx, 0.92, f"writing the student ({job.output_format})")
    path = _export(student, job, student_facts["kind"])
    ctx.progress(1.0, "distilled")
    if notes:
        facts["notes"] = notes
    return Artifact(path, job.output_format, facts)


def choose_student(kd_val: float, labels_only_val: float, rows: int) -> tuple[str, str]:
    """Which student compare_baseline keeps as the artifact, from their accuracy on the validation rows (never the
    test rows the report compares them on): the better one, the distilled one on a tie. ("kd" | "labels_only",
    the reason in one sentence.)"""
    kd_right, lo_right = round(kd_val * rows), round(labels_only_val * rows)
    kd = f"{kd_right:,}/{rows:,} ({100 * kd_val:.1f}%)"
    lo = f"{lo_right:,}/{rows:,} ({100 * labels_only_val:.1f}%)"
    if lo_right > kd_right:
        return "labels_only", (f"the labels-only student was right on more validation rows than the distilled one: "
                               f"{lo} vs {kd}")
    if kd_right > lo_right:
        return "kd", f"the distilled student was right on more validation rows than the labels-only one: {kd} vs {lo}"
    return "kd", f"both students were right on {kd} validation rows; on a tie the distilled student is kept"


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return round(float((logits.argmax(axis=1) == labels).mean()), 6)


def _validation_split(data: TrainData, seed: int) -> tuple[TrainData, TrainData]:
    n = len(data)
    if n < 10:
        raise EngineError("invalid_dataset", f"early_stopping and compare_baseline need at least 10 training rows for "
                                             f"a validation split, the transfer set has {n}")
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, round(VALIDATION_FRACTION * n))
    return data.take(np.sort(order[n_val:])), data.take(np.sort(order[:n_val]))


def _export(student: nn.Module, job: PreparedJob, kind: str) -> Path:
    """Write the student in job.output_format, with the teacher's input and output names."""
    student = student.cpu().eval()
    feeds = job.example_feeds(2)
    if job.output_format == "onnx":
        names = [spec.name for spec in job.model.outputs]
        return export_onnx(student, feeds, job.work_dir / f"student.{kind}.onnx", names or None)
    return export_torchscript(student, feeds, job.work_dir / f"student.{kind}.pt")


class _Teacher:
    """The uploaded model in inference only: its logits (first output) and, for the hint loss, one inner tensor
    (from the upload as ONNX, with that tensor added as an output)."""

    def __init__(self, job: PreparedJob, feature_loss: FeatureLoss | None):
        self.feature_layer: str | None = None
        self.feature_index = -1
        self.fixed_batch = fixed_batch_size(job.inputs)
        self.input_names = [spec.name for spec in job.inputs]
        if feature_loss is None:
            self.runner = job.runner(job.model_format)
            return
        model = job.onnx
        self.feature_layer = feature_loss.teacher_layer or _default_feature_layer(model.proto)
        model, self.feature_index = _with_extra_output(model, self.feature_layer)
        self.runner = OnnxRunner(model, job.device, error_code="unsupported")

    def outputs(self, feeds: Feeds, ctx: RunContext) -> tuple[np.ndarray, np.ndarray | None]:
        """(logits (rows, classes) float32, features (rows, width) float32 or None) over every row."""
        logits, feats = [], []
        total = feeds_length(feeds)
        done = 0
        for batch, real in iter_batches(feeds, INFER_BATCH, self.fixed_batch):
            raise_if_cancelled(ctx, "running the teacher")
            out = self.runner.run(batch)
            first = np.asarray(out[0])
            if first.ndim != 2 or first.shape[0] != feeds_length(batch) or first.shape[1] < 2:
                raise EngineError(
                    "unsupported",
                    f"distill needs a classifier: the teacher's first output has shape {list(first.shape)}, "
                    "not (rows, classes)",
                )
            logits.append(first[:real].astype(np.float32))
            if self.feature_layer is not None:
                f = np.asarray(out[self.feature_index])[:real]
                feats.append(f.reshape(len(f), -1).astype(np.float32))
                if done == 0 and feats[0][0].nbytes * total > MAX_FEATURE_BYTES:
                    raise EngineError(
                        "unsupported",
                        f"feature_loss: the teacher layer {self.feature_layer!r} has {feats[0].shape[1]} values per "
                        f"row, too many to hold for {total} rows: name a narrower layer",
                    )
            done += real
            ctx.progress(done / total, f"running the teacher ({done}/{total})")
        return np.concatenate(logits), (np.concatenate(feats) if feats else None)


def _default_feature_layer(proto: onnx.ModelProto) -> str:
    """The input of the teacher's last Gemm/MatMul: the features its classifier head reads."""
    initializers = {t.name for t in proto.graph.initializer}
    for node in reversed(proto.graph.node):
        if node.op_type in ("Gemm", "MatMul"):
            data = next((i for i in node.input if i and i not in initializers), None)
            if data:
                return data
    raise EngineError(
        "unsupported", "feature_loss: the teacher has no Gemm/MatMul layer; name a tensor in feature_loss.teacher_layer"
    )


def _with_extra_output(model: OnnxModel, name: str) -> tuple[OnnxModel, int]:
    """The model with tensor `name` among its outputs (so onnxruntime returns it), and that output's index."""
    graph = model.proto.graph
    produced = {o for node in graph.node for o in node.output} | {i.name for i in graph.input}
    if name not in produced:
        raise EngineError("unsupported", f"feature_loss: the teacher has no tensor named {name!r}")
    outputs = [o.name for o in graph.output]
    if name in outputs:
        return model, outputs.index(name)
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
        info = next((v for v in inferred.graph.value_info if v.name == name), None)
    except Exception:
        info = None
    if info is None:
        info = onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
    proto.graph.output.append(info)
    return dataclasses.replace(model, proto=proto, raw=proto.SerializeToString()), len(outputs)

