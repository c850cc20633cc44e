"""The training loop: train a student in place on arrays, by knowledge distillation or on labels alone.

`train_student` minimises

    alpha * KL(softmax(teacher / T) || softmax(student / T)) * T^2  +  (1 - alpha) * CE(student, y)

(`kd_loss` is the first term), the soft-target term alone when there are no labels, CE alone for a labels-only run,
plus beta * MSE(projection(student penultimate features), teacher features) for a hint loss. It is seeded (data
order; the hint projection's weights), reports progress per epoch, checks for cancellation every
`CANCEL_CHECK_BATCHES` batches, fails (EngineError("unsupported")) when the loss is not finite, and can stop early on
validation rows, keeping the best epoch's weights. distill.py trains its students with it, prune.py its fine-tune.
`predict_logits` and `evaluate` run a module over rows in batches of `INFER_BATCH`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .core import EngineError, RunContext, checkpoint, raise_if_cancelled

if TYPE_CHECKING:
    from app.methods import DistillConfig

#: Rows per call when a module is evaluated (`predict_logits`); distill.py runs its teacher in batches of this too.
INFER_BATCH = 512
#: Cancellation is also checked every this many batches within an epoch.
CANCEL_CHECK_BATCHES = 50
SGD_MOMENTUM = 0.9
#: The per-epoch curve keeps at most about this many points (every k-th epoch, and the last one), so that a long
#: run over a tiny transfer set (one step an epoch) does not make the report huge.
MAX_CURVE_POINTS = 200


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
    max_curve_points: int | None = MAX_CURVE_POINTS  # the curve's length limit (None: a point for every epoch)

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
    after_step: Callable[[], None] | None = None,
) -> TrainReport:
    """Train `student` in place on `train`, seeded, reporting progress per epoch over 0..1 of `ctx`.

    Loss: CE when `settings.labels_only` or there are no teacher logits; Hinton KD with (1 - alpha) CE when there
    are both logits and labels; soft targets alone when there are no labels. With `settings.patience` and `val`,
    training stops after `patience` epochs without a better validation score (accuracy, or top-1 agreement with the
    teacher when `val` has no labels) and the best epoch's weights are restored. `after_step` runs after every
    optimizer step (e.g. to keep pruned weights at zero).

    On cuda, cuDNN is held to deterministic kernels while training, so a seed gives the same run."""
    with _deterministic_cudnn(device):
        return _train(student, train, settings, ctx, val, device, stage, after_step)


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
    after_step: Callable[[], None] | None,
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
    curve_every = max(1, math.ceil(epochs / settings.max_curve_points)) if settings.max_curve_points else 1
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
            if after_step is not None:
                after_step()
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
