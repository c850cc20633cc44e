"""Metrics that compare a compressed model with its baseline, measured in the same run on the same device.

Format-neutral: a model is anything with `run(feeds) -> [outputs]`, `size_bytes`, `params` and
`peak_memory_bytes(feeds)` (a `Runner`: onnx_io.OnnxRunner, torch_io.TorchRunner), so ONNX and TorchScript are
measured alike. Quality is computed on the first output; timing runs the models alternately so that machine noise
hits all alike. When the result runs in another runtime than the upload, the upload converted to the result's
runtime is measured too, and speedups compare the result with that: like with like.

Peak memory is what one inference at the largest benchmarked batch needs beyond what is already allocated (the
weights): torch's allocator peak on cuda; on the CPU the growth of this process's resident memory during the
model's first run at that batch (sampled every millisecond, freed heap returned to the OS first). It is measured
before any other run at that batch, so arenas the runtimes keep (onnxruntime's) are counted once; it is approximate.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from app.methods import BenchmarkConfig

from .core import RunContext, checkpoint, raise_if_cancelled
from .data import Feeds, batch_of, feeds_length, iter_batches

#: SQNR is reported within +-SQNR_CAP_DB (identical outputs would otherwise be +inf).
SQNR_CAP_DB = 200.0
#: Rows per call when running a dynamic-batch model over a whole split.
EVAL_BATCH = 256


#: How often the CPU peak-memory sampler reads the resident set size.
RSS_SAMPLE_SECONDS = 0.001


class Runner(Protocol):
    format: str  # "onnx" | "torchscript"
    provider: str

    @property
    def size_bytes(self) -> int: ...

    @property
    def params(self) -> int: ...  # weight and bias elements (quantization scales and zero points not counted)

    @property
    def quant_params(self) -> int: ...  # scales and zero points a quantized model adds (0 for a float model)

    def run(self, feeds: Feeds) -> list[np.ndarray]: ...

    def peak_memory_bytes(self, feeds: Feeds) -> int: ...


@dataclass(frozen=True)
class Evaluation:
    """The rows both models are measured on: the dataset's test split, or seeded random inputs."""

    feeds: Feeds
    labels: np.ndarray | None
    source: str  # "held-out", "seeded 80/20 split" or "synthetic"

    def __len__(self) -> int:
        return feeds_length(self.feeds)


class NotBatchedError(ValueError):
    """The first output does not have one row per input row, so outputs cannot be compared row by row."""


def predict(runner: Runner, feeds: Feeds, fixed_batch: int | None, ctx: RunContext | None = None) -> np.ndarray:
    """The first output over every row, run in batches."""
    parts = []
    for batch, real in iter_batches(feeds, EVAL_BATCH, fixed_batch):
        if ctx is not None:
            raise_if_cancelled(ctx, "evaluating")
        out = runner.run(batch)[0]
        if out.ndim == 0 or out.shape[0] != feeds_length(batch):
            raise NotBatchedError(f"first output has shape {list(out.shape)} for a batch of {feeds_length(batch)}")
        parts.append(out[:real])
    return np.concatenate(parts)


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Top-1 accuracy and macro F1 of argmax(first output) against integer labels."""
    from sklearn.metrics import f1_score

    pred = logits.reshape(len(logits), -1).argmax(axis=1)
    return {
        "accuracy": float((pred == labels).mean()),
        "f1_macro": float(f1_score(labels, pred, average="macro", zero_division=0)),
    }


def fidelity_metrics(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """How closely `candidate` reproduces `reference`: top-1 agreement (when there is a class axis), mean
    per-row cosine similarity, and SQNR in dB (signal power over error power)."""
    ref = reference.reshape(len(reference), -1).astype(np.float64)
    cand = candidate.reshape(len(candidate), -1).astype(np.float64)
    out: dict[str, float] = {}
    if ref.shape[1] > 1:
        out["agreement"] = float((ref.argmax(axis=1) == cand.argmax(axis=1)).mean())
    dot = (ref * cand).sum(axis=1)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    both_zero = (np.abs(ref).sum(axis=1) == 0) & (np.abs(cand).sum(axis=1) == 0)
    cosine = np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), np.where(both_zero, 1.0, 0.0))
    out["cosine"] = float(cosine.mean())
    signal = float((ref**2).sum())
    noise = float(((ref - cand) ** 2).sum())
    if noise == 0.0:
        sqnr = SQNR_CAP_DB
    elif signal == 0.0:
        sqnr = -SQNR_CAP_DB
    else:
        sqnr = 10.0 * math.log10(signal / noise)
    out["sqnr_db"] = float(min(max(sqnr, -SQNR_CAP_DB), SQNR_CAP_DB))
    return out


def plan_batch_sizes(requested: Sequence[int], available: int, fixed_batch: int | None) -> tuple[list[int], list[str]]:
    """The batch sizes to time, and notes on any that were changed or skipped."""
    notes: list[str] = []
    if fixed_batch is not None:
        if list(requested) != [fixed_batch]:
            notes.append(f"the model has a fixed batch dim of {fixed_batch}: latency measured at that batch only")
        return [fixed_batch], notes
    used: list[int] = []
    for size in requested:
        clipped = min(size, available)
        if clipped != size:
            notes.append(f"batch size {size} clipped to {clipped}, the number of evaluation rows")
        if clipped not in used:
            used.append(clipped)
    return used, notes


def latency_stats(seconds: Sequence[float]) -> dict[str, float]:
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    return {
        "p50": round(float(np.percentile(ms, 50)), 4),
        "p95": round(float(np.percentile(ms, 95)), 4),
        "mean": round(float(ms.mean()), 4),
    }


#: Timed calls per turn, and untimed calls before each turn.
LATENCY_BLOCK = 10
LATENCY_BLOCK_WARMUP = 2


def measure_latency(
    runners: Sequence[Runner], feeds: Feeds, repeats: int, warmup: int, check: Callable[[], None] = lambda: None
) -> list[dict[str, float]]:
    """Per-call latency of each runner on the same feeds. Warm-up calls first; then the runners take turns in blocks
    of up to LATENCY_BLOCK timed calls (each after LATENCY_BLOCK_WARMUP untimed ones), the order reversed every
    round, until each has `repeats` timings: drift and noise fall on all of them alike, while each runs as it would
    alone (alternating single calls lets one ONNX Runtime session's spinning idle threads slow the next one's run:
    on 2 cores that made an int8 CNN read 0.85x of fp32 where it runs at 0.96x alone). `check` runs before each
    block (it raises to stop, e.g. on cancellation)."""
    for _ in range(warmup):
        check()
        for runner in runners:
            runner.run(feeds)
    times: list[list[float]] = [[] for _ in runners]
    order = list(range(len(runners)))
    done, rounds = 0, 0
    while done < repeats:
        block = min(LATENCY_BLOCK, repeats - done)
        for i in order if rounds % 2 == 0 else reversed(order):
            check()
            for _ in range(LATENCY_BLOCK_WARMUP):
                runners[i].run(feeds)
            for _ in range(block):
                start = time.perf_counter()
                runners[i].run(feeds)
                times[i].append(time.perf_counter() - start)
        done, rounds = done + block, rounds + 1
    return [latency_stats(t) for t in times]


def compare_models(
    baseline: Runner,
    result: Runner,
    evaluation: Evaluation,
    benchmark: BenchmarkConfig,
    fixed_batch: int | None,
    max_accuracy_drop: float,
    ctx: RunContext,
    same_runtime: Runner | None = None,
) -> dict[str, Any]:
    """Measure the models on `evaluation`: size, params, peak memory, quality, fidelity and latency, then the ratios.

    `same_runtime` is the baseline converted to the result's runtime, when the result runs in another one than the
    baseline: it is measured alike (metrics["baseline_same_runtime"]) and the speedup is computed against it.
    `ctx` reports progress over 0..1 of this step and is checked for cancellation between steps."""
    notes: list[str] = []
    sides = {"baseline": baseline, "result": result}
    if same_runtime is not None:
        sides["baseline_same_runtime"] = same_runtime
    measured: dict[str, dict[str, Any]] = {
        name: {
            "size_bytes": int(runner.size_bytes),
            "params": int(runner.params),
            "quant_params": int(getattr(runner, "quant_params", 0)),
        }
        for name, runner in sides.items()
    }
    base, res = measured["baseline"], measured["result"]
    if same_runtime is not None:
        measured["baseline_same_runtime"]["format"] = same_runtime.format
        notes.append(
            f"the result runs in {result.provider}, the upload in {baseline.provider}: speedups compare the result "
            f"with the upload converted to {same_runtime.format} (baseline_same_runtime), like with like"
        )

    batch_sizes, batch_notes = plan_batch_sizes(benchmark.batch_sizes, len(evaluation), fixed_batch)
    notes.extend(batch_notes)
    checkpoint(ctx, 0.0, "measuring peak memory")
    largest = batch_of(evaluation.feeds, max(batch_sizes))
    for name, runner in sides.items():
        measured[name]["peak_memory_bytes"] = int(runner.peak_memory_bytes(largest))

    checkpoint(ctx, 0.05, "measuring accuracy (baseline and result)")
    accuracy_drop = None
    try:
        outputs = {}
        for i, (name, runner) in enumerate(sides.items()):
            checkpoint(ctx, 0.05 + 0.25 * i / len(sides), f"measuring accuracy ({name.replace('_', ' ')})")
            outputs[name] = predict(runner, evaluation.feeds, fixed_batch, ctx)
    except NotBatchedError as exc:
        notes.append(f"quality metrics skipped: {exc}")
    else:
        base_out = outputs["baseline"]
        for name in sides:
            if name != "baseline":
                measured[name].update(fidelity_metrics(base_out, outputs[name]))
        if evaluation.labels is None:
            notes.append("no labels: accuracy not measured (fidelity to the baseline only)")
        elif base_out.ndim != 2 or base_out.shape[1] < 2:
            shape = list(base_out.shape)
            notes.append(f"accuracy not measured: the first output has shape {shape}, not (rows, classes)")
        else:
            for name in sides:
                measured[name].update(classification_metrics(outputs[name], evaluation.labels))
            accuracy_drop = base["accuracy"] - res["accuracy"]

    # Models compared with each other are timed together (alternating); the upload in another runtime alone, so
    # that one runtime's worker threads do not slow the other's runs.
    groups = [["baseline", "result"]]
    if same_runtime is not None:
        groups = [["baseline_same_runtime", "result"], ["baseline"]]
    for name in sides:
        measured[name]["latency_ms"] = {}
    for i, size in enumerate(batch_sizes):
        checkpoint(ctx, 0.3 + 0.7 * i / len(batch_sizes), f"measuring latency at batch {size} (baseline and result)")
        for group in groups:
            stats = measure_latency(
                [sides[name] for name in group],
                batch_of(evaluation.feeds, size),
                benchmark.repeats,
                benchmark.warmup,
                check=lambda: raise_if_cancelled(ctx, "measuring latency"),
            )
            for name, side_stats in zip(group, stats):
                measured[name]["latency_ms"][str(size)] = side_stats
    ctx.progress(1.0, "measured")

    reference = measured["baseline_same_runtime" if same_runtime is not None else "baseline"]
    speedup = {
        key: _ratio(reference["latency_ms"][key]["p50"], res["latency_ms"][key]["p50"]) for key in res["latency_ms"]
    }
    metrics: dict[str, Any] = {
        **measured,
        "ratios": {
            "size": _ratio(res["size_bytes"], base["size_bytes"]),
            "params": _ratio(res["params"], base["params"]),
            "peak_memory": _ratio(res["peak_memory_bytes"], reference["peak_memory_bytes"]),
            "speedup": speedup,
        },
        "peak_memory": {"batch_size": max(batch_sizes), "measure": _peak_memory_measure(result)},
        "slower_than_baseline": any(s is not None and s < 1.0 for s in speedup.values()),
        "max_accuracy_drop": max_accuracy_drop,
        "evaluation": {"data": evaluation.source, "rows": len(evaluation), "labels": evaluation.labels is not None},
        "benchmark": {
            "batch_sizes": batch_sizes,
            "requested_batch_sizes": list(benchmark.batch_sizes),
            "repeats": benchmark.repeats,
            "warmup": benchmark.warmup,
            "order": f"turns of {LATENCY_BLOCK} timed calls, alternating",
        },
        "notes": notes,
    }
    if accuracy_drop is not None:
        metrics["accuracy_drop"] = accuracy_drop
        metrics["within_accuracy_budget"] = accuracy_drop <= max_accuracy_drop + 1e-9
    return metrics


def rss_peak_growth(run: Callable[[], Any]) -> int:
    """How far this process's resident set grew above its level before `run()`, at its peak during the call
    (sampled every RSS_SAMPLE_SECONDS, and once after). Freed heap is returned to the OS first (glibc malloc_trim),
    so memory a previous run freed does not hide this one's."""
    import psutil

    process = psutil.Process()
    _trim_heap()
    start = process.memory_info().rss
    peak = start
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            done.wait(RSS_SAMPLE_SECONDS)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        run()
    finally:
        done.set()
        sampler.join()
    return max(0, max(peak, process.memory_info().rss) - start)


def _trim_heap() -> None:
    name = ctypes.util.find_library("c")
    if name:
        libc = ctypes.CDLL(name)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)


def _peak_memory_measure(runner: Runner) -> str:
    if runner.provider == "torch (cuda)":
        return "torch cuda allocator peak above the memory allocated before the run"
    return "growth of the process resident memory during the first run at this batch (approximate)"


def _ratio(numerator: float, denominator: float) -> float | None:
    if not denominator:
        return None
    return round(float(numerator) / float(denominator), 4)


def json_safe(value: Any) -> Any:
    """Plain Python for json.dumps(allow_nan=False): numpy scalars and arrays unwrapped, tuples as lists, paths as
    strings, non-finite floats as None."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value
