"""Pruning: zero the smallest weights (magnitude) or remove whole channels (channels), optionally fine-tuning after.

- magnitude: unstructured. The `sparsity` fraction of the Conv/Linear (ONNX: Conv, Gemm, MatMul) weights with the
  smallest |w| is set to zero, ranked across all layers ("global") or within each ("layer"). An ONNX artifact is
  the upload with its initializers zeroed in place (no conversion); otherwise the trainable module is masked. The
  file stays dense: zeros are stored and multiplied like any other weight, so neither size nor speed improves without
  a sparse runtime (neither ONNX Runtime's CPU kernels nor torch's dense ones skip zeros). The report says so and
  gives the compressed sizes, which do show the zeros.
- channels: structured, with torch-pruning: MagnitudeImportance (L2) groups coupled layers through its dependency
  graph, removes `ratio` of each group's channels (kept counts rounded to `round_to`), and leaves the layer that
  produces the output alone so the output shape is unchanged. The model really shrinks: fewer params and MACs.
- fine_tune: train.train_student (the loop distillation trains its students with) over the training split: Adam at
  a constant lr, batches of 128, seed 0. With `distill` the unpruned model is a teacher: 0.5 * KL(T=4) * T^2 + 0.5 *
  cross-entropy when there are labels (the same Adam steps as the unweighted sum: Adam does not see a constant factor
  of the loss), the KL term alone when not; else cross-entropy on the labels. Magnitude pruning re-applies its masks
  after every step, so pruned weights stay zero.
"""

from __future__ import annotations

import copy
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from app.methods import ChannelsConfig, FineTuneConfig, MagnitudeConfig

from .core import EngineError, first_line, RunContext, checkpoint, raise_if_cancelled, scoped_context
from .data import Feeds
from .onnx_io import OnnxModel
from .registry import Artifact, PreparedJob, register
from .torch_io import count_macs, count_weights, export_onnx, export_torchscript, to_tensors, torch_device
from .train import TrainData, TrainSettings, train_student

FINE_TUNE_BATCH = 128
FINE_TUNE_SEED = 0
DISTILL_TEMPERATURE = 4.0
#: Weight of the KD term against cross-entropy when fine_tune distills with labels: equal weights.
DISTILL_ALPHA = 0.5
#: Rows per call when the teacher labels the training split or a model is evaluated.
TEACHER_BATCH = 512

_PRUNABLE = (nn.modules.conv._ConvNd, nn.Linear)
_DENSE_NOTE = (
    "unstructured sparsity does not shrink a dense file or speed it up: the zeros are stored and multiplied like any "
    "other weight (a sparse runtime or a compressed store is needed to gain from them; compressed_size_bytes shows "
    "what compression makes of them)"
)


@register(MagnitudeConfig)
def prune_magnitude(job: PreparedJob, config: MagnitudeConfig, ctx: RunContext) -> Artifact:
    if config.fine_tune is None and job.output_format == "onnx":
        return _magnitude_onnx(job, config, ctx)
    checkpoint(ctx, 0.0, "converting the model to torch")
    module = job.trainable()
    layers = {name: m for name, m in module.named_modules() if isinstance(m, _PRUNABLE)}
    if not layers:
        raise EngineError("unsupported", "the model has no Conv or Linear layers to prune")
    checkpoint(ctx, 0.1, "pruning (magnitude)")
    masks = magnitude_masks({name: m.weight.detach().cpu().numpy() for name, m in layers.items()},
                            config.sparsity, config.scope)
    tensors = {name: torch.from_numpy(mask) for name, mask in masks.items()}

    def apply_masks() -> None:
        with torch.no_grad():
            for name, m in layers.items():
                m.weight.mul_(tensors[name].to(m.weight.device))

    apply_masks()
    facts = {"name": "magnitude", **_sparsity_facts(masks, config), "notes": [_DENSE_NOTE]}
    if config.fine_tune is not None:
        facts["fine_tune"] = fine_tune(module, job, config.fine_tune, scoped_context(ctx, 0.2, 0.9),
                                       after_step=apply_masks)
    checkpoint(ctx, 0.9, f"writing the pruned model ({job.output_format})")
    path = _export(module, job, "magnitude")
    facts["compressed_size_bytes"] = _compressed_sizes(job, path)
    ctx.progress(1.0, "pruned")
    return Artifact(path, job.output_format, facts)


def _magnitude_onnx(job: PreparedJob, config: MagnitudeConfig, ctx: RunContext) -> Artifact:
    """Zero the smallest weights of the ONNX graph's Conv/Gemm/MatMul initializers in place."""
    checkpoint(ctx, 0.0, "pruning (magnitude)")
    proto = copy.deepcopy(job.onnx.proto)
    initializers = {t.name: t for t in proto.graph.initializer}
    weights: dict[str, np.ndarray] = {}
    for node in proto.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1 and node.input[1] in initializers:
            array = numpy_helper.to_array(initializers[node.input[1]])
            if array.dtype.kind == "f" and (node.op_type != "MatMul" or array.ndim == 2):
                weights[node.input[1]] = array
    if not weights:
        raise EngineError("unsupported", "the model has no Conv, Gemm or MatMul weights to prune")
    masks = magnitude_masks(weights, config.sparsity, config.scope)
    for name, array in weights.items():
        initializers[name].CopyFrom(numpy_helper.from_array(np.where(masks[name], array, 0).astype(array.dtype), name))
    path = job.work_dir / "model.magnitude.onnx"
    onnx.save(proto, str(path))
    ctx.progress(1.0, "pruned")
    facts = {"name": "magnitude", **_sparsity_facts(masks, config), "notes": [_DENSE_NOTE],
             "compressed_size_bytes": _compressed_sizes(job, path)}
    return Artifact(path, "onnx", facts)


def magnitude_masks(weights: dict[str, np.ndarray], sparsity: float, scope: str) -> dict[str, np.ndarray]:
    """Boolean keep-masks that zero exactly round(sparsity * n) of the weights with the smallest |w|: n counted over
    all the weights together ("global") or each layer's alone ("layer")."""
    if scope == "layer":
        return {name: _keep_largest(np.abs(w).ravel(), sparsity).reshape(w.shape) for name, w in weights.items()}
    magnitudes = np.concatenate([np.abs(w).ravel() for w in weights.values()])
    keep = _keep_largest(magnitudes, sparsity)
    masks, start = {}, 0
    for name, w in weights.items():
        masks[name] = keep[start : start + w.size].reshape(w.shape)
        start += w.size
    return masks


def _keep_largest(magnitudes: np.ndarray, sparsity: float) -> np.ndarray:
    keep = np.ones(magnitudes.size, dtype=bool)
    k = int(round(sparsity * magnitudes.size))
    if k > 0:
        keep[np.argpartition(magnitudes, k - 1)[:k]] = False
    return keep


def _sparsity_facts(masks: dict[str, np.ndarray], config: MagnitudeConfig) -> dict[str, Any]:
    total = sum(m.size for m in masks.values())
    zeros = sum(int((~m).sum()) for m in masks.values())
    return {
        "target_sparsity": config.sparsity,
        "scope": config.scope,
        "sparsity": round(zeros / total, 6),
        "pruned_weights": zeros,
        "weights": total,
        "layers": [
            {"layer": name, "weights": int(m.size), "sparsity": round(float((~m).mean()), 6)}
            for name, m in masks.items()
        ],
    }


def _compressed_sizes(job: PreparedJob, path: Path) -> dict[str, int]:
    """zlib (level 6) sizes of the upload and the artifact: what the zeros are worth to a compressed store."""
    upload = job.model.raw if isinstance(job.model, OnnxModel) else job.model.path.read_bytes()
    return {"baseline": len(zlib.compress(upload, 6)), "result": len(zlib.compress(path.read_bytes(), 6))}


@register(ChannelsConfig)
def prune_channels_method(job: PreparedJob, config: ChannelsConfig, ctx: RunContext) -> Artifact:
    checkpoint(ctx, 0.0, "converting the model to torch")
    module = job.trainable()
    checkpoint(ctx, 0.1, "pruning (channels)")
    facts: dict[str, Any] = {"name": "channels", **prune_channels(module, job.example_feeds(), config.ratio,
                                                                  config.round_to)}
    if config.fine_tune is not None:
        facts["fine_tune"] = fine_tune(module, job, config.fine_tune, scoped_context(ctx, 0.3, 0.9))
    else:
        facts["notes"] = ["channel pruning without fine_tune usually costs accuracy: add "
                          '"fine_tune": {"epochs": 2} with a dataset to recover it']
    checkpoint(ctx, 0.9, f"writing the pruned model ({job.output_format})")
    path = _export(module, job, "channels")
    ctx.progress(1.0, "pruned")
    return Artifact(path, job.output_format, facts)


def prune_channels(module: nn.Module, example_feeds: dict[str, np.ndarray], ratio: float, round_to: int = 8) -> dict:
    """Remove `ratio` of the channels of `module`'s Conv/Linear layers in place (torch-pruning, L2 magnitude,
    coupled layers pruned together, kept counts rounded to `round_to`), leaving the layer that produces the output
    whole. `example_feeds` are input rows (positional, in key order). Returns what changed: channels per layer,
    params and MACs before and after. EngineError("unsupported") if the model cannot be pruned this way."""
    import torch_pruning as tp

    module.cpu().eval()
    args = to_tensors(example_feeds, list(example_feeds))
    with torch.no_grad():
        shapes_before = [tuple(o.shape) for o in _outputs(module(*args))]
    widths_before = _widths(module)
    ignored = _output_layers(module, args)
    params_before = count_weights(module)
    macs_before = count_macs(module, example_feeds)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner = tp.pruner.MetaPruner(
                module, args, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio,
                ignored_layers=ignored, round_to=round_to,
            )
            pruner.step()
        with torch.no_grad():
            shapes_after = [tuple(o.shape) for o in _outputs(module(*args))]
    except Exception as exc:
        raise EngineError(
            "unsupported", f"torch-pruning cannot prune this model's channels: {first_line(exc)}"
        ) from None
    if shapes_after != shapes_before:
        raise EngineError("unsupported", f"channel pruning changed the output shapes {shapes_before} -> {shapes_after}")
    widths_after = _widths(module)
    params_after = count_weights(module)
    macs_after = count_macs(module, example_feeds)
    return {
        "ratio": ratio,
        "round_to": round_to,
        "ignored_layers": [name for name, m in module.named_modules() if m in ignored],
        "layers": [
            {"layer": name, "type": kind, "channels_before": before, "channels_after": widths_after[name][1]}
            for name, (kind, before) in widths_before.items()
        ],
        "params_before": params_before,
        "params_after": params_after,
        "macs_before": macs_before,
        "macs_after": macs_after,
    }


def _widths(module: nn.Module) -> dict[str, tuple[str, int]]:
    """{layer: (type, output channels or features)} for the Conv/Linear layers."""
    out = {}
    for name, m in module.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            out[name] = (type(m).__name__, int(m.out_channels))
        elif isinstance(m, nn.Linear):
            out[name] = (type(m).__name__, int(m.out_features))
    return out


def _output_layers(module: nn.Module, args: tuple[torch.Tensor, ...]) -> list[nn.Module]:
    """The Conv/Linear layers whose outputs are the model's outputs; else the last one run (the classifier)."""
    calls: list[tuple[nn.Module, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda m, i, o: calls.append((m, o))) for m in module.modules()
             if isinstance(m, _PRUNABLE)]
    try:
        with torch.no_grad():
            outputs = list(_outputs(module(*args)))
    finally:
        for hook in hooks:
            hook.remove()
    direct = [m for m, o in calls if any(o is out for out in outputs)]
    if direct or not calls:
        return direct
    return [calls[-1][0]]


def _outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for item in out for t in _outputs(item)]


def fine_tune(
    module: nn.Module, job: PreparedJob, config: FineTuneConfig, ctx: RunContext,
    after_step: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Train `module` in place on the job's training split with train.train_student (see the module docstring);
    `after_step` runs after each optimizer step (e.g. to keep pruned weights at zero). Returns the settings, the
    mean loss per epoch and, with labelled evaluation rows, the accuracy before and after."""
    if job.dataset is None:
        raise EngineError("invalid_dataset", "fine_tune needs a dataset")
    train = job.dataset.train
    if train.y is None and not config.distill:
        raise EngineError("invalid_dataset", "fine_tune without distill needs labels (y) in the dataset")
    device = torch_device(job.device)
    names = [spec.name for spec in job.inputs]
    module.to(device)
    with torch.no_grad():  # a classifier: (rows, classes) first output
        _classifier_logits(module.eval()(*to_tensors(job.example_feeds(), names, device)))
    teacher_logits = _teacher_logits(job, device, ctx) if config.distill else None
    accuracy_before = _evaluation_accuracy(module, job, device)
    settings = TrainSettings(
        epochs=config.epochs, batch_size=FINE_TUNE_BATCH, lr=config.lr, optimizer="adam", lr_schedule="constant",
        seed=FINE_TUNE_SEED, temperature=DISTILL_TEMPERATURE, alpha=DISTILL_ALPHA, labels_only=not config.distill,
        max_curve_points=None,
    )
    data = TrainData([train.x[name] for name in names], train.y, teacher_logits)
    torch.manual_seed(FINE_TUNE_SEED)  # the global generator: dropout, if the model has any
    report = train_student(module, data, settings, ctx, device=device.type, stage="fine-tuning",
                           after_step=after_step)
    ctx.progress(1.0, "fine-tuned")
    facts: dict[str, Any] = {
        "epochs": config.epochs,
        "lr": config.lr,
        "batch_size": settings.batch_size,
        "seed": settings.seed,
        "optimizer": settings.optimizer,
        "distill": config.distill,
        "temperature": settings.temperature if config.distill else None,
        "labels_used": data.labels is not None,
        "train_rows": len(data),
        "loss_per_epoch": [point["train_loss"] for point in report.curve],
        "device": device.type,
        "seconds": report.seconds,
    }
    if accuracy_before is not None:
        facts["accuracy"] = {"before": accuracy_before, "after": _evaluation_accuracy(module, job, device),
                             "rows": job.evaluation.source}
    return facts


def _evaluation_accuracy(module: nn.Module, job: PreparedJob, device: torch.device) -> float | None:
    """Top-1 accuracy of `module` on the job's evaluation rows (None without labels)."""
    labels = job.evaluation.labels
    if labels is None:
        return None
    names = [spec.name for spec in job.inputs]
    module.eval()
    predictions = []
    with torch.no_grad():
        for start in range(0, len(labels), TEACHER_BATCH):
            batch = {name: job.evaluation.feeds[name][start : start + TEACHER_BATCH] for name in names}
            predictions.append(_classifier_logits(module(*to_tensors(batch, names, device))).argmax(dim=1).cpu())
    return round(float((torch.cat(predictions).numpy() == labels).mean()), 6)


def _teacher_logits(job: PreparedJob, device: torch.device, ctx: RunContext) -> np.ndarray:
    """The unpruned model's logits over the training split, computed once."""
    assert job.dataset is not None
    teacher = job.trainable().to(device).eval()
    names = [spec.name for spec in job.inputs]
    x = job.dataset.train.x
    parts = []
    with torch.no_grad():
        for start in range(0, len(job.dataset.train), TEACHER_BATCH):
            raise_if_cancelled(ctx, "running the teacher")
            batch = {name: x[name][start : start + TEACHER_BATCH] for name in names}
            parts.append(_classifier_logits(teacher(*to_tensors(batch, names, device))).cpu())
    return torch.cat(parts).numpy()


def _classifier_logits(out: Any) -> torch.Tensor:
    logits = _outputs(out)[0]
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise EngineError("unsupported", f"fine_tune needs a classifier: the first output has shape "
                                         f"{list(logits.shape)}, not (rows, classes)")
    return logits


def _export(module: nn.Module, job: PreparedJob, name: str) -> Path:
    feeds: Feeds = job.example_feeds()
    if job.output_format == "onnx":
        return export_onnx(module, feeds, job.work_dir / f"model.{name}.onnx")
    return export_torchscript(module, feeds, job.work_dir / f"model.{name}.pt")

