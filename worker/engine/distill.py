"""Knowledge distillation (Hinton, Vinyals and Dean, 2015): train a small student to match the uploaded model.

The uploaded model is the teacher and only runs inference (ONNX in onnxruntime, TorchScript in torch.jit); its
logits are computed once over the training rows. The student minimises

    alpha * KL(softmax(teacher / T) || softmax(student / T)) * T^2  +  (1 - alpha) * CE(student, y)

and only the soft-target term when the transfer set has no labels. An optional hint loss (FitNets) adds
beta * MSE(projection(student penultimate features), teacher layer output), through a learned linear projection
when the widths differ.

The student is one of:
- {"arch": "mlp", "hidden": [256, 128]}: an MLP over the flattened input;
- {"arch": "cnn", "channels": [16, 32], "hidden": [64]}: conv3x3-BN-ReLU-maxpool2 blocks, then an MLP head;
- {"shrink": 0.5}: the teacher's own architecture with that fraction of channels removed (torch_io + prune);
- {"model_id": "..."}: another uploaded model (JobSpec.student_model_path), converted to a trainable module.

Training is seeded (weights, data order, the validation split), runs on ctx.device, reports progress per epoch
and stops on cancellation. It runs at least `min_steps` optimizer steps (1,000 by default): when `epochs`
epochs of the transfer set make fewer, whole epochs are added (10 epochs of a 1,437-row set at batch 128 are only
120 steps, and both students stayed undertrained). With early_stopping, 10% of the transfer set (seeded) is held
out: training stops after `patience` epochs without a better validation accuracy (top-1 agreement with the teacher
when there are no labels) and the best epoch's weights are kept. `compare_baseline` also trains the same student on
labels alone, with the same seed, data order and budget, on the same 90% of the rows (the same seeded validation
split), reports both test accuracies, and keeps as the artifact the student that is right on more validation rows
(the distilled one on a tie): the test rows it reports never choose. `train_samples` trains on a seeded subset of
the transfer set, for KD under a small data budget. The student is written as ONNX (or TorchScript, for a
TorchScript teacher or when output_format asks) and `run_job` then verifies and measures it against the teacher like any artifact.

`train_student` is the reusable part (a KD or labels-only training loop over arrays), e.g. for a fine-tune after
pruning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from app.methods import CnnStudent, DistillConfig, FeatureLoss, MlpStudent, ShrinkStudent

from .core import (
    EngineError,
    RunContext,
    checkpoint,
    first_line,
    raise_if_cancelled,
    scoped_context,
)
from .data import Feeds, feeds_length, fixed_batch_size, iter_batches
from .onnx_io import OnnxModel, OnnxRunner, load_onnx_model
from .prune import prune_channels
from .registry import Artifact, PreparedJob, register
from .torch_io import (
    count_trainable_params,
    export_onnx,
    export_torchscript,
    load_torchscript_model,
    onnx_to_torch,
    torch_device,
    torchscript_to_torch,
)

#: Rows per call when running the teacher or evaluating the student.
INFER_BATCH = 512
#: Fraction of the training rows held out for early stopping (seeded by config.seed).
VALIDATION_FRACTION = 0.1
#: Precomputed teacher features larger than this are refused (name a narrower feature_loss.teacher_layer).
MAX_FEATURE_BYTES = 1 << 30
#: Cancellation is also checked every this many batches within an epoch.
CANCEL_CHECK_BATCHES = 50
SGD_MOMENTUM = 0.9
#: The per-epoch curve keeps at most about this many points (every k-th epoch, and the last one), so that a long
#: run over a tiny transfer set (one step an epoch) does not make the report huge.
MAX_CURVE_POINTS = 200


# --- the training loop (reusable) ----------------------------------------------------------------------------


@dataclass
class TrainData:
    """Rows to train or validate on: one array per model input (in the model's input order), optional labels,
    optional teacher logits (None: labels only) and optional teacher features (the hint loss)."""

    inputs: list[np.ndarray]
    labels: np.ndarray | None = None
    teacher_logits: np.ndarray | None = None
    teacher_features: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.inputs[0])

    def take(self, index: np.ndarray) -> TrainData:
        def pick(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[index]

        return TrainData(
            [a[index] for a in self.inputs], pick(self.labels), pick(self.teacher_logits), pick(self.teacher_features)
        )


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"
    lr_schedule: str = "cosine"
    seed: int = 0
    temperature: float = 4.0
    alpha: float = 0.7  # weight of the soft-target term; ignored for labels-only training
    labels_only: bool = False  # CE on labels alone (the baseline), even when teacher logits are given
    patience: int | None = None  # early stopping on the validation rows; None: train every epoch
    beta: float = 0.0  # weight of the hint loss (needs teacher_features)
    min_steps: int = 0  # at least this many optimizer steps: whole epochs are added when `epochs` gives fewer

    @classmethod
    def from_config(cls, config: DistillConfig, *, labels_only: bool = False) -> TrainSettings:
        return cls(
            epochs=config.epochs,
            batch_size=config.batch_size,
            lr=config.lr,
            optimizer=config.optimizer,
            lr_schedule=config.lr_schedule,
            seed=config.seed,
            temperature=config.temperature,
            alpha=config.alpha,
            labels_only=labels_only,
            patience=config.early_stopping.patience if config.early_stopping else None,
            beta=0.0 if labels_only or config.feature_loss is None else config.feature_loss.beta,
            min_steps=config.min_steps,
        )


@dataclass
class TrainReport:
    loss: str  # which loss was minimised, in words
    epochs_run: int
    best_epoch: int
    stopped_early: bool
    curve: list[dict[str, Any]]
    seconds: float
    projection: dict[str, Any] | None = None  # the hint loss's projection, when used
    epochs_planned: int = 0  # settings.epochs, or more to reach settings.min_steps
    steps_per_epoch: int = 0
    steps: int = 0  # optimizer steps taken

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's soft-target term: KL(softmax(teacher/T) || softmax(student/T)) * T^2, averaged over rows."""
    t = temperature
    return F.kl_div(
        F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1), reduction="batchmean",
        log_target=True,
    ) * (t * t)


def train_student(
    student: nn.Module,
    train: TrainData,
    settings: TrainSettings,
    ctx: RunContext,
    *,
    val: TrainData | None = None,
    device: str = "cpu",
    stage: str = "training",
) -> TrainReport:
    """Train `student` in place on `train`, seeded, reporting progress per epoch over 0..1 of `ctx`.

    Loss: CE when `settings.labels_only` or there are no teacher logits; Hinton KD with (1 - alpha) CE when there
    are both logits and labels; soft targets alone when there are no labels. With `settings.patience` and `val`,
    training stops after `patience` epochs without a better validation score (accuracy, or top-1 agreement with the
    teacher when `val` has no labels) and the best epoch's weights are restored.

    On cuda, cuDNN is held to deterministic kernels while training, so a seed gives the same run."""
    with _deterministic_cudnn(device):
        return _train(student, train, settings, ctx, val, device, stage)


@contextlib.contextmanager
def _deterministic_cudnn(device: str):
    if not device.startswith("cuda"):
        yield
        return
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def _train(
    student: nn.Module,
    train: TrainData,
    settings: TrainSettings,
    ctx: RunContext,
    val: TrainData | None,
    device: str,
    stage: str,
) -> TrainReport:
    use_teacher = not settings.labels_only and train.teacher_logits is not None
    if not use_teacher and train.labels is None:
        raise EngineError("invalid_dataset", "training without a teacher needs labels")
    if use_teacher and train.labels is not None:
        loss_name = f"{settings.alpha:g} * KD(T={settings.temperature:g}) + {1 - settings.alpha:g} * CE"
    elif use_teacher:
        loss_name = f"KD(T={settings.temperature:g}) soft targets only (no labels)"
    else:
        loss_name = "CE on labels only"
    use_features = use_teacher and settings.beta > 0 and train.teacher_features is not None
    if use_features:
        loss_name += f" + {settings.beta:g} * feature MSE"
    early = settings.patience is not None and val is not None and len(val) > 0

    dev = torch.device(device)
    student.to(dev)
    inputs = [torch.from_numpy(np.ascontiguousarray(a)).to(dev) for a in train.inputs]
    labels = torch.from_numpy(train.labels).to(dev) if train.labels is not None else None
    t_logits = torch.from_numpy(train.teacher_logits).float().to(dev) if use_teacher else None
    t_feats = torch.from_numpy(train.teacher_features).float().to(dev) if use_features else None

    features = _PenultimateFeatures(student) if use_features else None
    projection: nn.Module | None = None
    projection_facts = None
    params = list(student.parameters())
    if features is not None:
        assert t_feats is not None
        torch.manual_seed(settings.seed)
        with torch.no_grad():
            student.eval()
            student(*[x[:2] for x in inputs])
        s_dim, t_dim = features.width, int(t_feats.shape[1])
        projection = (torch.nn.Linear(s_dim, t_dim) if s_dim != t_dim else torch.nn.Identity()).to(dev)
        params += list(projection.parameters())
        projection_facts = {"student_dim": s_dim, "teacher_dim": t_dim, "learned": s_dim != t_dim}

    optimizer = _optimizer(params, settings)
    n = len(train)
    steps_per_epoch = _steps_per_epoch(n, settings.batch_size)
    epochs = planned_epochs(settings.epochs, steps_per_epoch, settings.min_steps)
    total_steps = steps_per_epoch * epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(settings, epochs, steps_per_epoch, total_steps))
    generator = torch.Generator().manual_seed(settings.seed)

    curve: list[dict[str, Any]] = []
    curve_every = max(1, math.ceil(epochs / MAX_CURVE_POINTS))
    epochs_run = 0
    best_score, best_epoch, best_state = -math.inf, 0, None
    stopped_early = False
    steps_done = 0
    started = time.perf_counter()
    for epoch in range(1, epochs + 1):
        checkpoint(ctx, (epoch - 1) / epochs, f"{stage}: epoch {epoch}/{epochs}")
        student.train()
        order = torch.randperm(n, generator=generator).to(dev)
        total_loss, seen, correct = 0.0, 0, 0
        for step in range(steps_per_epoch):
            if step and step % CANCEL_CHECK_BATCHES == 0:
                raise_if_cancelled(ctx, stage)
            idx = order[step * settings.batch_size : (step + 1) * settings.batch_size]
            if step == steps_per_epoch - 1:
                idx = order[step * settings.batch_size :]  # the last batch takes a remainder of one row
            logits = _first_output(student(*[x[idx] for x in inputs]))
            if use_teacher:
                assert t_logits is not None
                loss = kd_loss(logits, t_logits[idx], settings.temperature)
                if labels is not None:
                    loss = settings.alpha * loss + (1 - settings.alpha) * F.cross_entropy(logits, labels[idx])
            else:
                assert labels is not None
                loss = F.cross_entropy(logits, labels[idx])
            if features is not None and projection is not None and t_feats is not None:
                loss = loss + settings.beta * F.mse_loss(projection(features.value), t_feats[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            steps_done += 1
            total_loss += float(loss.detach()) * len(idx)
            seen += len(idx)
            if labels is not None:
                correct += int((logits.detach().argmax(dim=1) == labels[idx]).sum())
        if not math.isfinite(total_loss):
            raise EngineError("unsupported", f"{stage}: the loss diverged (not finite) in epoch {epoch}: lower lr")
        point: dict[str, Any] = {"epoch": epoch, "train_loss": round(total_loss / seen, 6)}
        if labels is not None:
            point["train_accuracy"] = round(correct / seen, 6)
        point["lr"] = float(optimizer.param_groups[0]["lr"])
        if val is not None and len(val) > 0:
            scores = evaluate(student, val, device)
            point.update(scores)
            score = scores.get("val_accuracy", scores.get("val_agreement", 0.0))
            if score > best_score:
                best_score, best_epoch = score, epoch
                if early:
                    best_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
        epochs_run = epoch
        stop = early and epoch - best_epoch >= settings.patience  # type: ignore[operator]
        if epoch % curve_every == 0 or epoch == epochs or stop:
            curve.append(point)
        if stop:
            stopped_early = epoch < epochs
            break
    if features is not None:
        features.remove()
    if early and best_state is not None:
        student.load_state_dict(best_state)
    else:
        best_epoch = epochs_run  # the weights kept are the last epoch's
    student.eval()
    ctx.progress(1.0, f"{stage}: done")
    return TrainReport(
        loss=loss_name,
        epochs_run=epochs_run,
        best_epoch=best_epoch,
        stopped_early=stopped_early,
        curve=curve,
        seconds=round(time.perf_counter() - started, 3),
        projection=projection_facts,
        epochs_planned=epochs,
        steps_per_epoch=steps_per_epoch,
        steps=steps_done,
    )


def predict_logits(module: nn.Module, inputs: list[np.ndarray], device: str = "cpu") -> np.ndarray:
    """The module's first output over all rows, in eval mode, as float32 numpy."""
    module.eval()
    dev = torch.device(device)
    parts = []
    with torch.no_grad():
        for start in range(0, len(inputs[0]), INFER_BATCH):
            batch = [torch.from_numpy(np.ascontiguousarray(a[start : start + INFER_BATCH])).to(dev) for a in inputs]
            parts.append(_first_output(module(*batch)).float().cpu().numpy())
    return np.concatenate(parts)


def evaluate(module: nn.Module, data: TrainData, device: str = "cpu") -> dict[str, float]:
    """val_accuracy (with labels) and val_agreement (top-1 agreement with the teacher, with teacher logits)."""
    pred = predict_logits(module, data.inputs, device).argmax(axis=1)
    out = {}
    if data.labels is not None:
        out["val_accuracy"] = round(float((pred == data.labels).mean()), 6)
    if data.teacher_logits is not None:
        out["val_agreement"] = round(float((pred == data.teacher_logits.argmax(axis=1)).mean()), 6)
    return out


def _first_output(out: Any) -> torch.Tensor:
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


class _PenultimateFeatures:
    """Captures the input of the module's last nn.Linear (the penultimate features), flattened per row."""

    def __init__(self, module: nn.Module):
        linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise EngineError("unsupported", "feature_loss needs a student with a Linear (fully connected) last layer")
        self.value: torch.Tensor | None = None
        self.width = int(linears[-1].in_features)
        self._handle = linears[-1].register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        self.value = args[0].reshape(args[0].shape[0], -1)

    def remove(self) -> None:
        self._handle.remove()


def _optimizer(params: list, settings: TrainSettings):
    if settings.optimizer == "adam":
        return torch.optim.Adam(params, lr=settings.lr)
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=settings.lr)
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params, lr=settings.lr, momentum=SGD_MOMENTUM, nesterov=True)
    raise EngineError("unsupported", f"unknown optimizer {settings.optimizer!r}")


def _steps_per_epoch(n: int, batch_size: int) -> int:
    steps = max(1, math.ceil(n / batch_size))
    if steps > 1 and n % batch_size == 1:
        steps -= 1  # a last batch of one row joins the previous one (BatchNorm cannot train on a single row)
    return steps


def planned_epochs(epochs: int, steps_per_epoch: int, min_steps: int) -> int:
    """`epochs`, or the fewest whole epochs that make at least `min_steps` optimizer steps if that is more."""
    return max(epochs, math.ceil(min_steps / steps_per_epoch)) if min_steps > 0 else epochs


def _schedule(settings: TrainSettings, epochs: int, steps_per_epoch: int, total_steps: int):
    if settings.lr_schedule == "constant":
        return lambda step: 1.0
    if settings.lr_schedule == "cosine":
        return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
    if settings.lr_schedule == "step":
        every = max(1, math.ceil(epochs / 3))  # x0.1 after each third of the epochs
        return lambda step: 0.1 ** ((step // steps_per_epoch) // every)
    raise EngineError("unsupported", f"unknown lr_schedule {settings.lr_schedule!r}")


# --- students ------------------------------------------------------------------------------------------------


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


# --- the method ----------------------------------------------------------------------------------------------


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
        return _build_student(job, config, full, classes)

    checkpoint(ctx, 0.12, "building the student")
    student, student_facts = make_student()
    teacher_params = int(job.model.params)
    student_params = count_trainable_params(student)
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


def _build_student(
    job: PreparedJob, config: DistillConfig, data: TrainData, classes: int
) -> tuple[nn.Module, dict[str, Any]]:
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

