"""Post-training quantization: int8 with onnxruntime.quantization or torch, and half precision.

- dynamic_int8: int8 weights, activations quantized on the fly. ONNX: onnxruntime's ConvInteger/MatMulInteger (and
  Gather for embeddings). Good for MatMul-heavy models (transformers, MLPs); on CNNs ONNX Runtime's ConvInteger is
  usually slower than fp32. TorchScript: torch's quantize_dynamic on the Linear and Embedding layers of the
  trainable module (convolutions stay fp32; torch's quantized kernels run on the CPU only).
- static_int8: QDQ format, int8 weights and activations with ranges calibrated on the dataset's training split; always
  written as ONNX (a TorchScript upload is exported to ONNX first). Activations are signed int8 (S8S8, ORT's default
  for QDQ): on the example CNN it was as accurate as uint8 activations and as fast, within noise, on x86 CPUs. The
  calibration methods are onnxruntime's own: note that its "entropy" calibrator, with the 128 histogram bins
  quantize_static gives it, often picks the same ranges as minmax.
- fp16: half-precision weights. ONNX: onnxconverter-common with float32 inputs and outputs kept (ONNX Runtime on CPU
  has few fp16 kernels and computes most ops in fp32 between casts: the file halves, the speed rarely improves).
  TorchScript: the module in float16 behind float32 inputs and outputs.
- bf16: the module in bfloat16 behind float32 inputs and outputs, TorchScript only (ONNX Runtime has almost no bf16
  kernels on CPU). Fast on CPUs with AVX512-BF16/AMX and on recent GPUs; refused where torch cannot run it.
- auto: builds every candidate that applies (dynamic_int8, static_int8 with a dataset, fp16), measures each against
  the upload in the candidate's runtime, and keeps the fastest within the accuracy budget (see `quantize_auto`).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.version_converter
import torch
from torch import nn

from app.methods import (
    AutoConfig,
    Bf16Config,
    CalibrationConfig,
    DynamicInt8Config,
    Fp16Config,
    MethodConfig,
    StaticInt8Config,
)

from .core import EngineError, first_line, RunContext, checkpoint, raise_if_cancelled, scoped_context
from .data import Feeds, batch_of, feeds_length, fixed_batch_size, iter_batches
from .measure import classification_metrics, fidelity_metrics, measure_latency, plan_batch_sizes, predict
from .onnx_io import OnnxRunner, load_onnx_model
from .registry import Artifact, PreparedJob, register
from .torch_io import TorchRunner, export_torchscript, load_torchscript_model, torch_device

#: Seed of the calibration subset when the training split has more rows than `calibration.samples`.
CALIBRATION_SEED = 0
CALIBRATION_BATCH = 32
#: auto: a candidate counts as faster than the baseline only with a speedup of at least this (timing noise).
AUTO_MIN_SPEEDUP = 1.05
#: auto without labels: the fidelity floor (top-1 agreement and cosine similarity with the baseline's outputs).
AUTO_FIDELITY_FLOOR = 0.99

# The op types dynamic quantization covers: onnxruntime's IntegerOps registry (Conv, MatMul, Gather for
# embeddings, Attention, LSTM, ...) plus Gemm, which the quantizer rewrites to MatMulInteger.
_DYNAMIC_EXTRA_OPS = ("Gemm",)


Builder = Callable[[PreparedJob, Any, RunContext, str], Artifact]


@register(DynamicInt8Config)
def quantize_dynamic_int8(job: PreparedJob, config: DynamicInt8Config, ctx: RunContext) -> Artifact:
    return _dynamic_int8(job, config, ctx, job.output_format)


@register(StaticInt8Config)
def quantize_static_int8(job: PreparedJob, config: StaticInt8Config, ctx: RunContext) -> Artifact:
    return _static_int8(job, config, ctx, job.output_format)


@register(Fp16Config)
def quantize_fp16(job: PreparedJob, config: Fp16Config, ctx: RunContext) -> Artifact:
    return _fp16(job, config, ctx, job.output_format)


@register(Bf16Config)
def quantize_bf16(job: PreparedJob, config: Bf16Config, ctx: RunContext) -> Artifact:
    device = torch_device(job.device)
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise EngineError("unsupported", "this GPU has no bf16 support in torch: use fp16")
    checkpoint(ctx, 0.0, "converting the model to torch")
    module = _HalfPrecision(job.trainable(), torch.bfloat16)
    checkpoint(ctx, 0.5, "checking that bf16 runs")
    feeds = job.example_feeds()
    try:
        with torch.inference_mode():
            module.to(device)(*[torch.from_numpy(v).to(device) for v in feeds.values()])
    except Exception as exc:
        raise EngineError("unsupported", f"torch cannot run this model in bf16 here: {first_line(exc)}") from None
    output = export_torchscript(module, feeds, job.work_dir / "model.bf16.pt")
    ctx.progress(1.0, "converted to bf16")
    facts: dict[str, Any] = {"name": "bf16", "weights": "bfloat16", "io": "float32", "runtime": "torch"}
    if device.type == "cpu" and not _cpu_has_native_bf16():
        facts["notes"] = ["this CPU has no native bf16 instructions (AVX512-BF16/AMX): torch emulates them, "
                          "expect bf16 to be slower here than on a CPU that has them"]
    return Artifact(output, "torchscript", facts)


def _dynamic_int8(job: PreparedJob, config: DynamicInt8Config, ctx: RunContext, output_format: str) -> Artifact:
    if output_format == "torchscript":
        return _torch_dynamic_int8(job, config, ctx)
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
        runtime="onnxruntime",
        per_channel=config.per_channel,
        weight_type="int8",
        activations="dynamic (quantized at run time)",
        op_types=op_types,
        quantized_ops=_quantized_op_counts(output),
    )
    return Artifact(output, "onnx", facts)


def _torch_dynamic_int8(job: PreparedJob, config: DynamicInt8Config, ctx: RunContext) -> Artifact:
    from torch.ao.quantization import (
        default_dynamic_qconfig,
        float_qparams_weight_only_qconfig,
        per_channel_dynamic_qconfig,
        quantize_dynamic,
    )

    if torch_device(job.device).type == "cuda":
        raise EngineError(
            "unsupported", "torch's dynamic int8 kernels run on the CPU only: use device cpu, or output_format onnx"
        )
    checkpoint(ctx, 0.0, "converting the model to torch")
    module = job.trainable().eval()
    layers = Counter(type(m).__name__ for m in module.modules() if isinstance(m, (nn.Linear, nn.Embedding)))
    if not layers:
        raise EngineError(
            "unsupported",
            "torch dynamic int8 quantizes Linear and Embedding layers and this model has none: use output_format onnx",
        )
    checkpoint(ctx, 0.3, "quantizing (torch dynamic int8)")
    qconfig = per_channel_dynamic_qconfig if config.per_channel else default_dynamic_qconfig
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated in favour of torchao
        quantized = quantize_dynamic(
            module, {nn.Linear: qconfig, nn.Embedding: float_qparams_weight_only_qconfig}, dtype=torch.qint8
        )
    output = export_torchscript(quantized, job.example_feeds(), job.work_dir / "model.dynamic_int8.pt")
    ctx.progress(1.0, "quantized")
    facts: dict[str, Any] = {
        "name": "dynamic_int8",
        "runtime": "torch",
        "per_channel": config.per_channel,
        "weight_type": "int8",
        "activations": "dynamic (quantized at run time)",
        "quantized_modules": dict(sorted(layers.items())),
    }
    convs = sum(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules())
    if convs:
        facts["notes"] = [f"torch dynamic int8 covers Linear and Embedding layers only: the {convs} convolutions "
                          "stay fp32 (static_int8 quantizes them)"]
    return Artifact(output, "torchscript", facts)


def _static_int8(job: PreparedJob, config: StaticInt8Config | AutoConfig, ctx: RunContext, output_format: str
                 ) -> Artifact:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if job.dataset is None:
        raise EngineError("invalid_dataset", "static_int8 needs a calibration dataset")
    calibration = _calibration_feeds(job.dataset.train.x, config.calibration.samples)
    # Per-channel QDQ (DequantizeLinear with an axis) exists from opset 13; per-tensor from opset 10.
    source, facts = _prepare(job, ctx, min_opset=13 if config.per_channel else 10)
    checkpoint(ctx, 0.2, "calibrating")
    reader = _CalibrationReader(calibration, fixed_batch_size(job.inputs), ctx, start=0.2, end=0.8)
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
        runtime="onnxruntime",
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


def _fp16(job: PreparedJob, config: MethodConfig, ctx: RunContext, output_format: str) -> Artifact:
    if output_format == "torchscript":
        checkpoint(ctx, 0.0, "converting the model to torch")
        module = _HalfPrecision(job.trainable(), torch.float16)
        checkpoint(ctx, 0.5, "writing the fp16 model")
        output = export_torchscript(module, job.example_feeds(), job.work_dir / "model.fp16.pt")
        ctx.progress(1.0, "converted to fp16")
        return Artifact(output, "torchscript", {"name": "fp16", "weights": "float16", "io": "float32",
                                                "runtime": "torch"})
    from onnxconverter_common import float16

    checkpoint(ctx, 0.0, "converting the model to fp16")
    proto = copy.deepcopy(job.onnx.proto)
    try:
        with _quiet():
            converted = float16.convert_float_to_float16(proto, keep_io_types=True)
        onnx.checker.check_model(converted)
    except Exception as exc:
        raise EngineError("unsupported", f"onnxconverter-common could not convert this model to fp16: "
                                         f"{first_line(exc)}") from None
    output = job.work_dir / "model.fp16.onnx"
    onnx.save(converted, str(output))
    ctx.progress(1.0, "converted to fp16")
    facts = {
        "name": "fp16",
        "weights": "float16",
        "io": "float32",
        "runtime": "onnxruntime",
        "notes": ["ONNX Runtime on CPU has few fp16 kernels: it computes most ops in fp32 between casts, so fp16 "
                  "halves the file but rarely speeds it up there (GPUs run fp16 natively)"],
    }
    return Artifact(output, "onnx", facts)


class _HalfPrecision(nn.Module):
    """`module` in a half-precision dtype behind float32 inputs and outputs (integer inputs pass unchanged)."""

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module = module.to(dtype).eval()
        self.dtype = dtype

    def forward(self, *inputs: torch.Tensor):
        out = self.module(*[x.to(self.dtype) if x.is_floating_point() else x for x in inputs])
        if isinstance(out, tuple):
            return tuple(o.float() if o.is_floating_point() else o for o in out)
        return out.float() if out.is_floating_point() else out


def _cpu_has_native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# --- auto ------------------------------------------------------------------------------------------------------


_AUTO_BUILDERS: dict[str, tuple[Builder, tuple[str, ...]]] = {
    "dynamic_int8": (_dynamic_int8, DynamicInt8Config.output_formats),
    "static_int8": (_static_int8, StaticInt8Config.output_formats),
    "fp16": (_fp16, Fp16Config.output_formats),
}


@register(AutoConfig)
def quantize_auto(job: PreparedJob, config: AutoConfig, ctx: RunContext) -> Artifact:
    """Build every candidate that applies (dynamic_int8, static_int8 when there is a dataset, fp16), each in
    output_format when the config names one, else in the upload's format where the method writes it (static_int8:
    ONNX). Measure each on the evaluation rows (accuracy, or fidelity without labels), then time all of them and the
    upload in each candidate's runtime together, alternating, at the largest benchmark batch. Keep the fastest
    (lowest latency) of those within the accuracy budget (max_accuracy_drop, or agreement and cosine >= 0.99
    without labels) that are at least 5% faster than the upload in the same runtime; if none is, keep the most
    faithful within the budget (or of all) and flag it."""
    plan = []
    for name, (builder, formats) in _AUTO_BUILDERS.items():
        if name == "static_int8" and job.dataset is None:
            continue
        fmt = job.output_format if config.output_format is not None else (
            job.model_format if job.model_format in formats else "onnx")
        if fmt in formats:
            plan.append((name, builder, fmt))
    fixed_batch = fixed_batch_size(job.inputs)
    evaluation = job.evaluation
    batch_sizes, _ = plan_batch_sizes(config.benchmark.batch_sizes, len(evaluation), fixed_batch)

    checkpoint(ctx, 0.0, "running the original model")
    reference = predict(job.runner(job.model_format), evaluation.feeds, fixed_batch, ctx)
    labels = evaluation.labels if reference.ndim == 2 and reference.shape[1] > 1 else None
    base_accuracy = classification_metrics(reference, labels)["accuracy"] if labels is not None else None

    candidates: list[dict[str, Any]] = []
    built: list[tuple[dict[str, Any], Artifact, Any]] = []  # (figures, artifact, runner)
    for i, (name, builder, fmt) in enumerate(plan):
        span = scoped_context(ctx, 0.05 + 0.75 * i / len(plan), 0.05 + 0.75 * (i + 1) / len(plan))
        checkpoint(span, 0.0, f"auto: building {name} ({fmt})")
        try:
            artifact = builder(job, config, scoped_context(span, 0.0, 0.7), fmt)
        except EngineError as exc:
            if exc.code == "cancelled":
                raise
            candidates.append({"method": name, "format": fmt, "error": exc.message})
            continue
        checkpoint(span, 0.7, f"auto: measuring the accuracy of {name}")
        runner = _load_runner(job, artifact)
        outputs = predict(runner, evaluation.feeds, fixed_batch, span)
        figures: dict[str, Any] = {"method": name, "format": artifact.format, "runtime": runner.provider,
                                   "size_bytes": runner.size_bytes, **fidelity_metrics(reference, outputs)}
        if labels is not None:
            figures["accuracy"] = classification_metrics(outputs, labels)["accuracy"]
            figures["accuracy_drop"] = round(base_accuracy - figures["accuracy"], 6)
            figures["within_budget"] = figures["accuracy_drop"] <= config.max_accuracy_drop + 1e-9
        else:
            figures["within_budget"] = (figures.get("agreement", 1.0) >= AUTO_FIDELITY_FLOOR
                                        and figures["cosine"] >= AUTO_FIDELITY_FLOOR)
        candidates.append(figures)
        built.append((figures, artifact, runner))
    if not built:
        errors = "; ".join(f"{c['method']}: {c['error']}" for c in candidates)
        raise EngineError("unsupported", f"auto: no quantization candidate applies to this model ({errors})")

    checkpoint(ctx, 0.8, f"auto: timing the candidates at batch {max(batch_sizes)}")
    formats = sorted({artifact.format for _, artifact, _ in built})
    baselines = {fmt: job.runner(fmt) for fmt in formats}
    stats = measure_latency(
        [*baselines.values(), *(runner for _, _, runner in built)], batch_of(evaluation.feeds, max(batch_sizes)),
        config.benchmark.repeats, config.benchmark.warmup, check=lambda: raise_if_cancelled(ctx, "measuring latency"),
    )
    base_p50 = {fmt: s["p50"] for fmt, s in zip(formats, stats)}
    for (figures, artifact, _), candidate_stats in zip(built, stats[len(formats):]):
        figures["latency_ms_p50"] = candidate_stats["p50"]
        figures["baseline_latency_ms_p50"] = base_p50[artifact.format]
        figures["speedup"] = round(base_p50[artifact.format] / candidate_stats["p50"], 4)
        figures["faster"] = figures["speedup"] >= AUTO_MIN_SPEEDUP

    chosen, reason, flagged = _choose([f for f, _, _ in built], labels is not None, config.max_accuracy_drop)
    for figures, artifact, _ in built:
        if figures is not chosen:
            artifact.path.unlink(missing_ok=True)
    winner = next(artifact for figures, artifact, _ in built if figures is chosen)
    ctx.progress(1.0, f"auto: kept {chosen['method']}")
    facts = {
        "name": "auto",
        "chosen": chosen["method"],
        "reason": reason,
        "flagged": flagged,
        "criterion": (
            f"fastest at batch {max(batch_sizes)} among candidates "
            + (f"within max_accuracy_drop {config.max_accuracy_drop}" if labels is not None else
               f"with agreement and cosine >= {AUTO_FIDELITY_FLOOR} (no labels)")
            + f" and at least {AUTO_MIN_SPEEDUP}x the baseline's speed in the same runtime"
        ),
        "batch_size": max(batch_sizes),
        "candidates": candidates,
        "chosen_method": {k: v for k, v in winner.facts.items() if k != "notes"},
    }
    if winner.facts.get("notes"):
        facts["notes"] = winner.facts["notes"]
    return Artifact(winner.path, winner.format, facts)


def _load_runner(job: PreparedJob, artifact: Artifact) -> OnnxRunner | TorchRunner:
    if artifact.format == "onnx":
        model = load_onnx_model(artifact.path, error_code="result_invalid")
        return OnnxRunner(model, job.device, error_code="result_invalid")
    return TorchRunner(load_torchscript_model(artifact.path, job.inputs, error_code="result_invalid"), job.device)


def _choose(measured: list[dict[str, Any]], labelled: bool, max_drop: float) -> tuple[dict[str, Any], str, bool]:
    """(the kept candidate, why, whether it is flagged)."""
    within = [c for c in measured if c["within_budget"]]
    fast = [c for c in within if c["faster"]]
    budget = f"accuracy drop <= {max_drop}" if labelled else f"agreement and cosine >= {AUTO_FIDELITY_FLOOR}"
    if fast:
        best = min(fast, key=lambda c: c["latency_ms_p50"])
        return best, (f"fastest candidate within the budget ({budget}): {best['speedup']}x the baseline's speed in "
                      f"{best['runtime']}"), False

    def fidelity(c: dict[str, Any]) -> tuple:
        return (c.get("accuracy", 0.0), c.get("agreement", 0.0), c["cosine"])

    if within:  # none is clearly faster: the least slow of them, never a slower one for its accuracy
        best = min(within, key=lambda c: c["latency_ms_p50"])
        return best, (f"no candidate within the budget ({budget}) was at least {AUTO_MIN_SPEEDUP}x faster than "
                      f"the baseline: kept the fastest of them ({best['speedup']}x)"), True
    best = max(measured, key=fidelity)
    return best, f"no candidate stayed within the budget ({budget}): kept the most faithful one", True


def _prepare(job: PreparedJob, ctx: RunContext, min_opset: int | None = None) -> tuple[Path, dict[str, Any]]:
    """Write the checked model to the scratch folder, upgrade its opset to `min_opset` if it is older, and run
    onnxruntime's pre-processing (shape inference and graph cleanup). If pre-processing fails the model is quantized
    as it is."""
    from onnxruntime.quantization import quant_pre_process

    checkpoint(ctx, 0.0, "preparing the model for quantization")
    facts: dict[str, Any] = {}
    original = job.scratch_dir / "model.onnx"
    model = job.onnx
    opset = model.opset
    if min_opset is not None and opset is not None and opset < min_opset:
        try:
            upgraded = onnx.version_converter.convert_version(model.proto, min_opset)
            onnx.checker.check_model(upgraded)
        except Exception as exc:
            raise EngineError(
                "unsupported",
                f"the model uses opset {opset}; this method needs opset >= {min_opset} and the upgrade failed: "
                f"{first_line(exc)}",
            ) from None
        onnx.save(upgraded, str(original))
        facts["opset_upgraded"] = {"from": opset, "to": min_opset}
    else:
        original.write_bytes(model.raw)
    prepared = job.scratch_dir / "model.prepared.onnx"
    source, target = str(original.resolve()), str(prepared.resolve())
    try:
        # onnxruntime's symbolic shape inference saves a debug copy of the model (with a multi-MB external data
        # file) into the working directory when it cannot infer every shape: keep that inside the scratch folder.
        with _quiet(), contextlib.chdir(job.scratch_dir):
            quant_pre_process(source, target)
        onnx.checker.check_model(onnx.load(str(prepared), load_external_data=False))
    except Exception as exc:
        return original, {**facts, "preprocessed": False, "preprocess_error": first_line(exc)}
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
        raise EngineError("unsupported", f"onnxruntime could not quantize this model: {first_line(exc)}") from None


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
    """onnxruntime.quantization and onnxconverter-common log, print and warn freely; keep the worker's output
    readable."""
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)

