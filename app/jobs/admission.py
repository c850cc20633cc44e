"""Memory-aware admission: a job that cannot fit the workers' memory limit is refused when it is submitted, with the
numbers, instead of being killed with `out_of_memory` after it has queued and loaded for a long time.

The estimate is a floor of what the job's process must hold at once, so only jobs that certainly cannot fit are
refused (the runtime's own memory, roughly 0.1-0.4 GB for Python, ONNX Runtime and PyTorch, is left out: it differs
per machine and is what the limit's headroom is for):

    weights  = max(file size, 4 bytes x parameters)     (the engine works on fp32 weights)
    estimate = weights x FACTOR[kind] + dataset arrays

FACTOR counts the copies of the weights that coexist: quantize 3 (the fp32 model, the quantized copy being built,
and the inference sessions that measure both), prune 3 (the model, its pruned copy, the sessions) and 4 with a
fine-tune (gradients and the optimizer's two moments on top of the weights), distill 4 (the teacher, the student
with its gradients and optimizer state, bounded by the teacher's size). Dataset arrays count at their stored size
(uploaded .npz: the product of each array's shape and item size, from the header) or, for a built-in dataset, at
the float32 size the worker loads. docs/api.md carries the same table.
"""
from __future__ import annotations

import math

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.errors import Unprocessable
from app.core.tables import DatasetRow, ModelRow, WorkerRow
from app.jobs import repository as repo

FACTOR = {"quantize": 3.0, "prune": 3.0, "distill": 4.0}
FINE_TUNE_FACTOR = 4.0
# float32 images (N, 1, 28, 28) / (N, 1, 8, 8) plus int64 labels, train + test, as the worker loads them
BUILTIN_DATASET_BYTES = {"mnist": 70_000 * (784 * 4 + 8), "fashion-mnist": 70_000 * (784 * 4 + 8),
                         "digits": 1_797 * (64 * 4 + 8)}
_ITEMSIZE = {"bool": 1, "int8": 1, "uint8": 1, "int16": 2, "uint16": 2, "float16": 2, "int32": 4, "uint32": 4,
             "float32": 4, "int64": 8, "uint64": 8, "float64": 8, "complex64": 8, "complex128": 16}


class InsufficientMemory(Unprocessable):
    code = "insufficient_memory"


def weights_bytes(model: ModelRow) -> int:
    params = (model.info or {}).get("params")
    return max(int(model.size_bytes), 4 * int(params)) if params else int(model.size_bytes)


def dataset_bytes(dataset: DatasetRow | None, builtin: str | None) -> int:
    if builtin:
        return BUILTIN_DATASET_BYTES.get(builtin, 0)
    if dataset is None:
        return 0
    total = 0
    for spec in (dataset.info or {}).get("arrays", {}).values():
        dims = [int(d) for d in spec.get("shape", [])]
        total += math.prod(dims) * _ITEMSIZE.get(str(spec.get("dtype", "")).lstrip("<>|="), 4)
    return total


def estimate(kind: str, config, model: ModelRow, dataset: DatasetRow | None, builtin: str | None) -> dict:
    factor = FACTOR.get(kind, 3.0)
    if kind == "prune" and getattr(config, "fine_tune", None) is not None:
        factor = FINE_TUNE_FACTOR
    weights = weights_bytes(model)
    data = dataset_bytes(dataset, builtin)
    return {"estimate_bytes": int(weights * factor) + data, "weights_bytes": weights, "factor": factor,
            "dataset_bytes": data}


def memory_limit(session: Session, queue: str, default: int, live_within_s: float) -> tuple[int, str]:
    """The job memory limit that applies on `queue`: the largest one the live workers of that queue publish (a job
    that fits none of them can never finish), else this process's `job_memory_limit_bytes`."""
    rows = session.scalars(select(WorkerRow).where(WorkerRow.last_seen_at > repo.cutoff(live_within_s)))
    published = [int(r.info["job_memory_limit_bytes"]) for r in rows
                 if queue in r.queues.split(",") and isinstance((r.info or {}).get("job_memory_limit_bytes"), int)]
    if published:
        return max(published), f"the live {queue} workers"
    return default, "job_memory_limit_bytes"


def check_memory(session: Session, settings, *, kind: str, config, model: ModelRow, dataset_id: str | None,
                 builtin: str | None, queue: str) -> None:
    dataset = session.get(DatasetRow, dataset_id) if dataset_id else None
    need = estimate(kind, config, model, dataset, builtin)
    limit, source = memory_limit(session, queue, settings.job_memory_limit_bytes, settings.worker_lost_after_s)
    if need["estimate_bytes"] > limit:
        raise InsufficientMemory(
            f"this {kind} job needs at least an estimated {_fmt(need['estimate_bytes'])} of memory "
            f"({_fmt(need['weights_bytes'])} of fp32 weights x {need['factor']:g}"
            + (f" + {_fmt(need['dataset_bytes'])} of dataset arrays" if need["dataset_bytes"] else "")
            + f"), over the job memory limit of {_fmt(limit)} ({source}); it would be killed with out_of_memory. "
            "Use a smaller model or dataset, or run it on workers with a larger DISTILLERY_JOB_MEMORY_LIMIT_BYTES",
            detail={**need, "limit_bytes": limit, "limit_source": source, "queue": queue})


def _fmt(n: int) -> str:
    return f"{n} bytes ({n / 1024**3:.2f} GiB)" if n >= 1024**3 else f"{n} bytes ({n / 1024**2:.1f} MiB)"
