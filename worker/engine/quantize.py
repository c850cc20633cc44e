"""Post-training int8 quantization of ONNX models with onnxruntime.quantization.

- dynamic_int8: int8 weights, activations quantized on the fly (ConvInteger/MatMulInteger, Gather for embeddings).
  Good for MatMul-heavy models (transformers, MLPs); on CNNs ONNX Runtime's ConvInteger is usually slower than fp32.
- static_int8: QDQ format, int8 weights and activations with ranges calibrated on the dataset's training split.
  Activations are signed int8 (S8S8, ORT's default for QDQ): on the example CNN it was as accurate as uint8
  activations and as fast, within noise, on x86 CPUs. The calibration methods are onnxruntime's own: note that its
  "entropy" calibrator, with the 128 histogram bins quantize_static gives it, often picks the same ranges as minmax.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.version_converter

from .config import CalibrationConfig, MethodConfig
from .core import EngineError, RunContext, checkpoint, raise_if_cancelled
from .data import Feeds, feeds_length, fixed_batch_size, iter_batches
from .registry import Artifact, PreparedJob, register

#: Seed of the calibration subset when the training split has more rows than `calibration.samples`.
CALIBRATION_SEED = 0
CALIBRATION_BATCH = 32

# The op types dynamic quantization covers: onnxruntime's IntegerOps registry (Conv, MatMul, Gather for
# embeddings, Attention, LSTM, ...) plus Gemm, which the quantizer rewrites to MatMulInteger.
_DYNAMIC_EXTRA_OPS = ("Gemm",)


@dataclass(frozen=True)
class DynamicInt8Config(MethodConfig):
    per_channel: bool = True


@dataclass(frozen=True)
class StaticInt8Config(MethodConfig):
    per_channel: bool = True
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)


@register("quantize", "dynamic_int8", DynamicInt8Config, default=True)
def quantize_dynamic_int8(job: PreparedJob, config: DynamicInt8Config, ctx: RunContext) -> Artifact:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    source, facts = _prepare(job, ctx, min_opset=11)  # DynamicQuantizeLinear exists from opset 11
    checkpoint(ctx, 0.3, "quantizing (dynamic int8)")
    op_types = sorted(set(IntegerOpsRegistry) | set(_DYNAMIC_EXTRA_OPS))
    output = job.work_dir / "model.dynamic_int8.onnx"
    _quantize(
        lambda: quantize_dynamic(
            source,
            output,
            op_types_to_quantize=op_types,
            per_channel=config.per_channel,
            weight_type=QuantType.QInt8,
            extra_options={"MatMulConstBOnly": True},
        ),
        output,
    )
    ctx.progress(1.0, "quantized")
    facts.update(
        name="dynamic_int8",
        per_channel=config.per_channel,
        weight_type="int8",
        activations="dynamic (quantized at run time)",
        op_types=op_types,
        quantized_ops=_quantized_op_counts(output),
    )
    return Artifact(output, "onnx", facts)


@register("quantize", "static_int8", StaticInt8Config)
def quantize_static_int8(job: PreparedJob, config: StaticInt8Config, ctx: RunContext) -> Artifact:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if job.dataset is None:
        raise EngineError("invalid_dataset", "static_int8 needs a calibration dataset")
    calibration = _calibration_feeds(job.dataset.train.x, config.calibration.samples)
    # Per-channel QDQ (DequantizeLinear with an axis) exists from opset 13; per-tensor from opset 10.
    source, facts = _prepare(job, ctx, min_opset=13 if config.per_channel else 10)
    checkpoint(ctx, 0.2, "calibrating")
    reader = _CalibrationReader(calibration, fixed_batch_size(job.model.inputs), ctx, start=0.2, end=0.8)
    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[config.calibration.method]
    output = job.work_dir / "model.static_int8.onnx"
    _quantize(
        lambda: quantize_static(
            source,
            output,
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=config.per_channel,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=method,
        ),
        output,
    )
    ctx.progress(1.0, "quantized")
    facts.update(
        name="static_int8",
        per_channel=config.per_channel,
        weight_type="int8",
        activation_type="int8",
        quant_format="QDQ",
        calibration={
            "method": config.calibration.method,
            "samples": feeds_length(calibration),
            "requested_samples": config.calibration.samples,
            "split": "train",
        },
        quantized_ops=_quantized_op_counts(output),
    )
    return Artifact(output, "onnx", facts)


def _prepare(job: PreparedJob, ctx: RunContext, min_opset: int | None = None) -> tuple[Path, dict[str, Any]]:
    """Write the checked model to the scratch folder, upgrade its opset to `min_opset` if it is older, and run
    onnxruntime's pre-processing (shape inference and graph cleanup). If pre-processing fails the model is quantized
    as it is."""
    from onnxruntime.quantization import quant_pre_process

    checkpoint(ctx, 0.0, "preparing the model for quantization")
    facts: dict[str, Any] = {}
    original = job.scratch_dir / "model.onnx"
    opset = job.model.opset
    if min_opset is not None and opset is not None and opset < min_opset:
        try:
            upgraded = onnx.version_converter.convert_version(job.model.proto, min_opset)
            onnx.checker.check_model(upgraded)
        except Exception as exc:
            raise EngineError(
                "unsupported",
                f"the model uses opset {opset}; this method needs opset >= {min_opset} and the upgrade failed: "
                f"{_first_line(exc)}",
            ) from None
        onnx.save(upgraded, str(original))
        facts["opset_upgraded"] = {"from": opset, "to": min_opset}
    else:
        original.write_bytes(job.model.raw)
    prepared = job.scratch_dir / "model.prepared.onnx"
    try:
        with _quiet():
            quant_pre_process(str(original), str(prepared))
        onnx.checker.check_model(onnx.load(str(prepared), load_external_data=False))
    except Exception as exc:
        return original, {**facts, "preprocessed": False, "preprocess_error": _first_line(exc)}
    return prepared, {**facts, "preprocessed": True}


def _drop_unused_opsets(path: Path) -> None:
    """Pre-processing declares every onnxruntime domain (training, nchwc, ...); keep only those a node uses, so
    the artifact does not claim to need runtimes it does not."""
    proto = onnx.load(str(path), load_external_data=False)
    used = {"", "ai.onnx"} | {f.domain for f in proto.functions}
    used |= {node.domain for node in _all_nodes(proto)}
    kept = [o for o in proto.opset_import if o.domain in used]
    if len(kept) != len(proto.opset_import):
        del proto.opset_import[:]
        proto.opset_import.extend(kept)
        onnx.save(proto, str(path))


def _all_nodes(proto: onnx.ModelProto):
    graphs = [proto.graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            yield node
            for attr in node.attribute:
                if attr.HasField("g"):
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)
    for function in proto.functions:
        yield from function.node


def _quantize(call, output: Path) -> None:
    try:
        with _quiet():
            call()
        _drop_unused_opsets(output)
    except EngineError:
        raise
    except Exception as exc:
        raise EngineError("unsupported", f"onnxruntime could not quantize this model: {_first_line(exc)}") from None


def _calibration_feeds(train: Feeds, samples: int) -> Feeds:
    """`samples` rows of the training split (a seeded random subset when there are more)."""
    n = feeds_length(train)
    if samples >= n:
        return train
    index = np.sort(np.random.default_rng(CALIBRATION_SEED).choice(n, size=samples, replace=False))
    return {k: v[index] for k, v in train.items()}


class _CalibrationReader:
    """onnxruntime's CalibrationDataReader over in-memory rows, reporting progress and honouring cancellation."""

    def __init__(self, feeds: Feeds, fixed_batch: int | None, ctx: RunContext, start: float, end: float):
        self.feeds, self.fixed_batch, self.ctx = feeds, fixed_batch, ctx
        self.start, self.end = start, end
        self.total = feeds_length(feeds)
        self.rewind()

    def rewind(self) -> None:
        self._batches = iter_batches(self.feeds, CALIBRATION_BATCH, self.fixed_batch)
        self._done = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        raise_if_cancelled(self.ctx, "calibrating")
        batch = next(self._batches, None)
        if batch is None:
            self.ctx.progress(self.end, "quantizing")
            return None
        feeds, real = batch
        self._done += real
        fraction = self._done / self.total
        self.ctx.progress(self.start + (self.end - self.start) * fraction, f"calibrating ({self._done}/{self.total})")
        return feeds

    def __iter__(self):
        return iter(self.get_next, None)


def _quantized_op_counts(path: Path) -> dict[str, int]:
    """How many nodes of each quantized op type the artifact holds (to show what was quantized)."""
    counts: dict[str, int] = {}
    proto = onnx.load(str(path), load_external_data=False)
    for node in proto.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear") or "Integer" in node.op_type:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


@contextlib.contextmanager
def _quiet():
    """onnxruntime.quantization logs and prints freely; keep the worker's output readable."""
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:500]
