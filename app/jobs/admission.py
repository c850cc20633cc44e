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

A distill student that is not the teacher's own architecture (an mlp or cnn student, or another uploaded model) is
not bounded by the teacher's size, so it is counted on its own, and the teacher at factor 2 (its fp32 weights and
the runtime session that runs it):

    estimate = weights x 2 + student + dataset arrays
    student  = parameters x TRAIN_BYTES_PER_PARAM[optimizer] + batch x activations per row x 4

The parameters of an mlp or cnn student come from its config, built as worker/engine/students.py builds it (the
input's row shape from the dataset or the model's declared input, the classes from the model's output or the
labels; unknown sizes count as 1, so the estimate stays a floor); another uploaded model's from its inspection.
Per parameter, training holds fp32 weights and gradients plus the optimizer's state (adam, adamw: two moments;
sgd: momentum). Activations count each layer's output once, at the largest batch the job can form (its batch_size,
at most half the dataset's rows). Everything is Python int arithmetic, exact at any size.
"""
from __future__ import annotations

import math

from sqlalchemy.orm import Session

from app.core.db import cutoff
from app.core.errors import Unprocessable
from app.core.tables import DatasetRow, ModelRow
from app.datasets import repository as datasets_repo
from app.methods import CnnStudent, MlpStudent, ModelStudent
from app.models import repository as models_repo
from app.fleet import repository as workers_repo

FACTOR = {"quantize": 3.0, "prune": 3.0, "distill": 4.0}
FINE_TUNE_FACTOR = 4.0
# float32 images (N, 1, 28, 28) / (N, 1, 8, 8) plus int64 labels, train + test, as the worker loads them
BUILTIN_DATASET_BYTES = {"mnist": 70_000 * (784 * 4 + 8), "fashion-mnist": 70_000 * (784 * 4 + 8),
                         "digits": 1_797 * (64 * 4 + 8)}
#: per-row shape (as shipped) and training rows of the built-in datasets, and their classes
BUILTIN_ROWS = {"mnist": ((1, 28, 28), 60_000), "fashion-mnist": ((1, 28, 28), 60_000), "digits": ((1, 8, 8), 1_437)}
BUILTIN_CLASSES = 10
#: bytes per trainable parameter while training: fp32 weights and gradients, plus the optimizer's state
TRAIN_BYTES_PER_PARAM = {"adam": 16, "adamw": 16, "sgd": 12}
TEACHER_FACTOR_WITH_STUDENT = 2.0
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


def estimate(kind: str, config, model: ModelRow, dataset: DatasetRow | None, builtin: str | None,
             student_model: ModelRow | None = None) -> dict:
    factor = FACTOR.get(kind, 3.0)
    if kind == "prune" and getattr(config, "fine_tune", None) is not None:
        factor = FINE_TUNE_FACTOR
    weights = weights_bytes(model)
    data = dataset_bytes(dataset, builtin)
    student = student_need(config, model, dataset, builtin, student_model) if kind == "distill" else None
    if student is None:
        return {"estimate_bytes": int(weights * factor) + data, "weights_bytes": weights, "factor": factor,
                "dataset_bytes": data}
    factor = TEACHER_FACTOR_WITH_STUDENT
    return {"estimate_bytes": int(weights * factor) + student["bytes"] + data, "weights_bytes": weights,
            "factor": factor, "dataset_bytes": data, "student": student}


def student_need(config, model: ModelRow, dataset: DatasetRow | None, builtin: str | None,
                 student_model: ModelRow | None = None) -> dict | None:
    """What training the distill student holds: its parameters (from an mlp / cnn config, or another uploaded
    model's inspection) x TRAIN_BYTES_PER_PARAM, plus each layer's output at the batch size. None for a shrink
    student (the teacher's architecture, narrower: bounded by the teacher's factor)."""
    student = getattr(config, "student", None)
    row_shape = _row_shape(model, dataset, builtin)
    classes = _classes(model, dataset, builtin)
    if isinstance(student, MlpStudent):
        arch = "mlp"
        params, per_row = _mlp_size(math.prod(row_shape) if row_shape else 1, list(student.hidden), classes)
    elif isinstance(student, CnnStudent):
        arch = "cnn"
        image = row_shape if row_shape is not None and len(row_shape) == 3 else [1, 1, 1]
        params, per_row = _cnn_size(image, list(student.channels), list(student.hidden), classes)
    elif isinstance(student, ModelStudent) and student_model is not None:
        arch, params, per_row = "model", weights_bytes(student_model) // 4, 0
    else:
        return None
    optimizer = getattr(config, "optimizer", "adam")
    per_param = TRAIN_BYTES_PER_PARAM.get(optimizer, 16)
    batch = _largest_batch(config, dataset, builtin)
    activations = batch * per_row * 4
    return {"arch": arch, "params": params, "bytes": params * per_param + activations,
            "bytes_per_param": per_param, "optimizer": optimizer, "activation_bytes": activations,
            "batch_size": batch}


def _mlp_size(in_features: int, hidden: list[int], classes: int) -> tuple[int, int]:
    """(parameters, activations per row) of distill.build_mlp: Linear layers in -> hidden... -> classes."""
    widths = [in_features, *hidden, classes]
    params = sum(a * b + b for a, b in zip(widths, widths[1:]))
    return params, sum(widths[1:])


def _cnn_size(image: list[int], channels: list[int], hidden: list[int], classes: int) -> tuple[int, int]:
    """(parameters, activations per row) of distill.build_cnn: conv3x3 (no bias) + BatchNorm per channel entry, 2x2
    max-pooling while both sides are at least 2, then an MLP head over the flattened features."""
    c_in, h, w = image
    params = per_row = 0
    for c in channels:
        params += c_in * c * 9 + 2 * c
        per_row += c * h * w
        if h >= 2 and w >= 2:
            h, w = h // 2, w // 2
        c_in = c
    head_params, head_per_row = _mlp_size(c_in * h * w, hidden, classes)
    return params + head_params, per_row + head_per_row


def _row_shape(model: ModelRow, dataset: DatasetRow | None, builtin: str | None) -> list[int] | None:
    """The per-row shape of the model's single input: the dataset's array, else the model's declared input."""
    if builtin:
        return list(BUILTIN_ROWS[builtin][0]) if builtin in BUILTIN_ROWS else None
    info = (dataset.info or {}) if dataset is not None else {}
    inputs, arrays = info.get("inputs") or [], info.get("arrays") or {}
    if len(inputs) == 1 and isinstance(arrays.get(inputs[0]), dict):
        dims = arrays[inputs[0]].get("shape") or []
        if len(dims) >= 2 and all(isinstance(d, int) and d > 0 for d in dims[1:]):
            return [int(d) for d in dims[1:]]
    model_inputs = (model.info or {}).get("inputs") or []
    if len(model_inputs) == 1:
        dims = model_inputs[0].get("shape") or []
        if len(dims) >= 2 and all(isinstance(d, int) and d > 0 for d in dims[1:]):
            return [int(d) for d in dims[1:]]
    return None


def _classes(model: ModelRow, dataset: DatasetRow | None, builtin: str | None) -> int:
    """The student's output width: the model's (batch, classes) output, else the labels' count (labels are checked
    to be below the model's outputs), else 1."""
    known = output_classes(model.info or {})
    if known is not None:
        return known
    if builtin:
        return BUILTIN_CLASSES
    labels = ((dataset.info or {}) if dataset is not None else {}).get("num_classes")
    return labels if isinstance(labels, int) and labels > 0 else 1


def output_classes(model_info: dict) -> int | None:
    """The fixed last dim of the model's first output when that output is (batch, classes), else None."""
    outputs = model_info.get("outputs") or []
    shape = outputs[0].get("shape") if outputs and isinstance(outputs[0], dict) else None
    if isinstance(shape, list) and len(shape) == 2 and isinstance(shape[1], int) and shape[1] > 0:
        return shape[1]
    return None


def _largest_batch(config, dataset: DatasetRow | None, builtin: str | None) -> int:
    """The largest training batch the job certainly forms: its batch_size, but at most half the dataset's rows (the
    training rows left after a held-out and a validation split) and at most train_samples when set."""
    batch = int(getattr(config, "batch_size", 1))
    if builtin in BUILTIN_ROWS:
        rows = BUILTIN_ROWS[builtin][1]
    else:
        rows = ((dataset.info or {}) if dataset is not None else {}).get("n_samples")
    if isinstance(rows, int) and rows > 0:
        batch = min(batch, max(1, rows // 2))
    samples = getattr(config, "train_samples", 0)
    if isinstance(samples, int) and samples > 0:
        batch = min(batch, max(1, samples // 2))
    return max(1, batch)


def memory_limit(session: Session, queue: str, default: int, live_within_s: float) -> tuple[int, str]:
    """The job memory limit that applies on `queue`: the largest one the live workers of that queue publish (a job
    that fits none of them can never finish), else this process's `job_memory_limit_bytes`."""
    rows = workers_repo.seen_since(session, cutoff(live_within_s))
    published = [int(r.info["job_memory_limit_bytes"]) for r in rows
                 if queue in r.queues.split(",") and isinstance((r.info or {}).get("job_memory_limit_bytes"), int)]
    if published:
        return max(published), f"the live {queue} workers"
    return default, "job_memory_limit_bytes"


def check_memory(session: Session, settings, *, kind: str, config, model: ModelRow, dataset_id: str | None,
                 builtin: str | None, queue: str) -> None:
    dataset = datasets_repo.by_id(session, dataset_id) if dataset_id else None
    student = getattr(config, "student", None)
    student_model = models_repo.by_id(session, student.model_id) if isinstance(student, ModelStudent) else None
    need = estimate(kind, config, model, dataset, builtin, student_model)
    limit, source = memory_limit(session, queue, settings.job_memory_limit_bytes, settings.worker_lost_after_s)
    if need["estimate_bytes"] > limit:
        trained = need.get("student")
        raise InsufficientMemory(
            f"this {kind} job needs at least an estimated {_fmt(need['estimate_bytes'])} of memory "
            f"({_fmt(need['weights_bytes'])} of fp32 weights x {need['factor']:g}"
            + (f" + {_fmt(trained['bytes'])} to train the {_student_name(trained)} of {trained['params']} "
               f"parameters ({trained['bytes_per_param']} bytes each: fp32 weights, gradients and "
               f"{trained['optimizer']} state"
               + (f"; plus {_fmt(trained['activation_bytes'])} of activations at batch size {trained['batch_size']}"
                  if trained["activation_bytes"] else "") + ")" if trained else "")
            + (f" + {_fmt(need['dataset_bytes'])} of dataset arrays" if need["dataset_bytes"] else "")
            + f"), over the job memory limit of {_fmt(limit)} ({source}); it would be killed with out_of_memory. "
            + ("Use a smaller student, model or dataset" if trained else "Use a smaller model or dataset")
            + ", or run it on workers with a larger DISTILLERY_JOB_MEMORY_LIMIT_BYTES",
            detail={**need, "limit_bytes": limit, "limit_source": source, "queue": queue})


def _student_name(student: dict) -> str:
    return "student model" if student["arch"] == "model" else f"{student['arch']} student"


def _fmt(n: int) -> str:
    return f"{n} bytes ({n / 1024**3:.2f} GiB)" if n >= 1024**3 else f"{n} bytes ({n / 1024**2:.1f} MiB)"


# --- input shapes -------------------------------------------------------------------------------------------------
#
# A job whose dataset cannot feed the model fails on the worker (invalid_dataset) only after it has queued and
# loaded. When both sides are known at submission they are compared here, as the worker's loader compares them
# (worker/engine/data.py): the same rank, and every fixed dim after the first (the rows) equal. Dims that are not a
# positive int (None, a symbolic name such as "N", -1) match anything; an input of unknown rank is not checked.
# The model's side: an ONNX model's declared inputs; a TorchScript model's traced example inputs (a traced graph is
# specialised to them; a scripted model declares nothing and is not checked). The dataset's side: the array that
# feeds each input (`x`, or the one named after it; one per input by name when there are several), or a built-in
# dataset's images, which the worker reshapes for an ONNX input when the element counts match and feeds to a
# TorchScript model as (N, 1, H, W).


class InputShapeMismatch(Unprocessable):
    code = "input_shape_mismatch"


def model_input_shapes(model: ModelRow) -> tuple[list[dict], str]:
    """(the model's inputs {name, dtype, shape}, where their shapes come from: "declared" or "traced")."""
    info = model.info or {}
    if model.format == "torchscript":
        specs, source = info.get("traced_inputs") or [], "traced"
    else:
        specs, source = info.get("inputs") or [], "declared"
    return [s for s in specs if isinstance(s, dict) and isinstance(s.get("name"), str)], source


def _fixed(dim) -> bool:
    return type(dim) is int and dim > 0


def _shape_problem(model_shape: list, data_shape: list) -> str | None:
    if len(model_shape) != len(data_shape):
        return f"rank {len(data_shape)}, not {len(model_shape)}"
    for axis, (want, got) in enumerate(zip(model_shape[1:], data_shape[1:]), start=1):
        if _fixed(want) and want != got:
            return f"dim {axis} is {got}, not {want}"
    return None


def _builtin_problem(name: str, spec_shape: list, source: str) -> str | None:
    """What the worker makes of a built-in's images (1, H, W) for this input, as data._builtin_row_shape does: an
    ONNX input gets the images laid out for its rank when its fixed dims agree, or reshaped when it fixes every dim
    and the element counts match; a TorchScript model gets them as they are."""
    image = list(BUILTIN_ROWS[name][0])
    wanted, size = spec_shape[1:], math.prod(BUILTIN_ROWS[name][0])
    if source == "traced":
        return _shape_problem(spec_shape, ["N", *image])
    natural = {3: image, 2: image[1:], 1: [size]}.get(len(wanted))
    if natural is not None and all(not _fixed(d) or d == n for d, n in zip(wanted, natural)):
        return None
    if wanted and all(_fixed(d) for d in wanted) and math.prod(wanted) == size:
        return None
    return f"its {image} images ({size} values per row) cannot be laid out as {wanted} per row"


def check_input_shapes(session: Session, *, model: ModelRow, dataset_id: str | None, builtin: str | None,
                       config=None) -> None:
    """422 `input_shape_mismatch` when the job's dataset cannot feed the model's (or a distill student model's)
    inputs; nothing when either side's shapes are unknown."""
    dataset = datasets_repo.by_id(session, dataset_id) if dataset_id else None
    student = getattr(config, "student", None)
    checked = [(model, "the model")]
    if isinstance(student, ModelStudent):
        student_model = models_repo.by_id(session, student.model_id)
        if student_model is not None:
            checked.append((student_model, "the student model"))
    for row, role in checked:
        if builtin:
            _check_builtin(row, role, builtin)
        elif dataset is not None:
            _check_dataset(row, role, dataset)


def _check_builtin(model: ModelRow, role: str, builtin: str) -> None:
    specs, source = model_input_shapes(model)
    if builtin not in BUILTIN_ROWS or not specs:
        return
    if len(specs) != 1:
        names = [s["name"] for s in specs]
        raise Unprocessable(f"builtin:{builtin} feeds one image input; {role} {model.id} has {len(specs)} inputs "
                            f"{names}", code="dataset_mismatch",
                            detail={"model_inputs": names, "dataset_inputs": ["x"], "model_id": model.id})
    spec = specs[0]
    shape = spec.get("shape")
    if not isinstance(shape, list) or not shape:
        return
    problem = _builtin_problem(builtin, shape, source)
    if problem is None:
        return
    rows, image = BUILTIN_ROWS[builtin][1], list(BUILTIN_ROWS[builtin][0])
    dataset_shape = [rows, *image]
    raise _mismatch(model, role, source, spec["name"], shape, f"builtin:{builtin}", "x", dataset_shape, problem)


def _check_dataset(model: ModelRow, role: str, dataset: DatasetRow) -> None:
    specs, source = model_input_shapes(model)
    arrays = (dataset.info or {}).get("arrays") or {}
    for spec in specs:
        shape = spec.get("shape")
        if not isinstance(shape, list) or not shape:
            continue  # rank unknown
        candidates = ("x", spec["name"]) if len(specs) == 1 else (spec["name"],)
        key = next((k for k in candidates if isinstance(arrays.get(k), dict)), None)
        if key is None:
            continue  # no array for it: dataset_mismatch, checked with the dataset
        data_shape = arrays[key].get("shape")
        if not isinstance(data_shape, list):
            continue
        problem = _shape_problem(shape, data_shape)
        if problem is not None:
            raise _mismatch(model, role, source, spec["name"], shape, f"dataset {dataset.id}", key, data_shape,
                            problem)


def _mismatch(model: ModelRow, role: str, source: str, name: str, model_shape: list, dataset: str, array: str,
              dataset_shape: list, reason: str) -> InputShapeMismatch:
    subject = f"{dataset}'s array {array!r}" if dataset.startswith("dataset ") else dataset
    how = "expects" if source == "declared" else "was traced with an example of shape"
    return InputShapeMismatch(
        f"{subject} has shape {dataset_shape}, but {role}'s input {name!r} {how} {model_shape}: {reason} (the first "
        "dim counts rows and may differ; the others must match where the model fixes them). The job would fail on "
        "the worker with invalid_dataset; give it data of the model's input shape",
        detail={"input": name, "model_shape": model_shape, "dataset_shape": dataset_shape, "array": array,
                "dataset": dataset, "model_id": model.id, "shape_source": source})
