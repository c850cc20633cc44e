"""Metrics that compare a compressed model with its baseline, measured in the same run on the same device.

Format-neutral: a model is anything with `run(feeds) -> [outputs]`, `size_bytes` and `params` (a `Runner`), so the
same code measures ONNX and, later, TorchScript results. Quality is computed on the first output; timing runs the
two models alternately so that machine noise hits both alike.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .config import BenchmarkConfig
from .core import RunContext, checkpoint, raise_if_cancelled
from .data import Feeds, batch_of, feeds_length, iter_batches

#: SQNR is reported within +-SQNR_CAP_DB (identical outputs would otherwise be +inf).
SQNR_CAP_DB = 200.0
#: Rows per call when running a dynamic-batch model over a whole split.
EVAL_BATCH = 256


class Runner(Protocol):
    provider: str

    @property
    def size_bytes(self) -> int: ...

    @property
    def params(self) -> int: ...

    def run(self, feeds: Feeds) -> list[np.ndarray]: ...


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


def measure_latency(
    runners: Sequence[Runner], feeds: Feeds, repeats: int, warmup: int, check: Callable[[], None] = lambda: None
) -> list[dict[str, float]]:
    """Per-call latency of each runner on the same feeds. Warm-up calls first; then each repeat calls every runner
    once, in alternating order, so drift and noise fall on all of them alike. `check` runs between repeats (it
    raises to stop, e.g. on cancellation)."""
    for _ in range(warmup):
        check()
        for runner in runners:
            runner.run(feeds)
    times: list[list[float]] = [[] for _ in runners]
    order = list(range(len(runners)))
    for repeat in range(repeats):
        check()
        for i in order if repeat % 2 == 0 else reversed(order):
            start = time.perf_counter()
            runners[i].run(feeds)
            times[i].append(time.perf_counter() - start)
    return [latency_stats(t) for t in times]


def compare_models(
    baseline: Runner,
    result: Runner,
    evaluation: Evaluation,
    benchmark: BenchmarkConfig,
    fixed_batch: int | None,
    max_accuracy_drop: float,
    ctx: RunContext,
) -> dict[str, Any]:
    """Measure both models on `evaluation`: size, params, quality, fidelity and latency, then the ratios.

    `ctx` reports progress over 0..1 of this step and is checked for cancellation between steps."""
    notes: list[str] = []
    base: dict[str, Any] = {"size_bytes": int(baseline.size_bytes), "params": int(baseline.params)}
    res: dict[str, Any] = {"size_bytes": int(result.size_bytes), "params": int(result.params)}

    checkpoint(ctx, 0.0, "measuring accuracy (baseline and result)")
    accuracy_drop = None
    try:
        base_out = predict(baseline, evaluation.feeds, fixed_batch, ctx)
        checkpoint(ctx, 0.15, "measuring accuracy (result)")
        res_out = predict(result, evaluation.feeds, fixed_batch, ctx)
    except NotBatchedError as exc:
        notes.append(f"quality metrics skipped: {exc}")
    else:
        res.update(fidelity_metrics(base_out, res_out))
        if evaluation.labels is None:
            notes.append("no labels: accuracy not measured (fidelity to the baseline only)")
        elif base_out.ndim != 2 or base_out.shape[1] < 2:
            shape = list(base_out.shape)
            notes.append(f"accuracy not measured: the first output has shape {shape}, not (rows, classes)")
        else:
            base.update(classification_metrics(base_out, evaluation.labels))
            res.update(classification_metrics(res_out, evaluation.labels))
            accuracy_drop = base["accuracy"] - res["accuracy"]

    batch_sizes, batch_notes = plan_batch_sizes(benchmark.batch_sizes, len(evaluation), fixed_batch)
    notes.extend(batch_notes)
    base["latency_ms"], res["latency_ms"] = {}, {}
    for i, size in enumerate(batch_sizes):
        checkpoint(ctx, 0.3 + 0.7 * i / len(batch_sizes), f"measuring latency at batch {size} (baseline and result)")
        base_stats, res_stats = measure_latency(
            [baseline, result],
            batch_of(evaluation.feeds, size),
            benchmark.repeats,
            benchmark.warmup,
            check=lambda: raise_if_cancelled(ctx, "measuring latency"),
        )
        base["latency_ms"][str(size)] = base_stats
        res["latency_ms"][str(size)] = res_stats
    ctx.progress(1.0, "measured")

    speedup = {
        key: _ratio(base["latency_ms"][key]["p50"], res["latency_ms"][key]["p50"]) for key in base["latency_ms"]
    }
    metrics: dict[str, Any] = {
        "baseline": base,
        "result": res,
        "ratios": {
            "size": _ratio(res["size_bytes"], base["size_bytes"]),
            "params": _ratio(res["params"], base["params"]),
            "speedup": speedup,
        },
        "slower_than_baseline": any(s is not None and s < 1.0 for s in speedup.values()),
        "max_accuracy_drop": max_accuracy_drop,
        "evaluation": {"data": evaluation.source, "rows": len(evaluation), "labels": evaluation.labels is not None},
        "benchmark": {
            "batch_sizes": batch_sizes,
            "requested_batch_sizes": list(benchmark.batch_sizes),
            "repeats": benchmark.repeats,
            "warmup": benchmark.warmup,
            "order": "alternating",
        },
        "notes": notes,
    }
    if accuracy_drop is not None:
        metrics["accuracy_drop"] = accuracy_drop
        metrics["within_accuracy_budget"] = accuracy_drop <= max_accuracy_drop + 1e-9
    return metrics


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
